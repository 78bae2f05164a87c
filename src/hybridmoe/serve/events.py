"""Events from the engine's worker thread to a request's handler on the event loop, and the handle that carries them.

The worker posts with ``loop.call_soon_threadsafe``; the handler awaits :meth:`Handle.events`. A request with ``n``
choices gets ``Delta`` events tagged with the choice ``index`` and one ``Finished`` per choice, or one ``Failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hybridmoe.generation import StopReason

from .sampling import TokenLogprob


@dataclass
class Delta:
    text: str
    index: int = 0  # which of the request's n choices
    logprobs: list[TokenLogprob] | None = None  # the tokens accepted since the last Delta, when asked for


@dataclass
class Finished:
    stop_reason: StopReason
    prompt_tokens: int
    completion_tokens: int
    index: int = 0


@dataclass
class Failed:
    message: str
    code: str  # "non_finite_logits", "out_of_memory", "internal_error", "shutting_down", "timeout"


Event = Delta | Finished | Failed



class Handle:
    """One submitted request as seen by the asyncio side: an event stream and a cancel switch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int = 1, on_failure=None) -> None:
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.n = n  # choices: the stream ends after n Finished events (or the first Failed)
        self.cancelled = threading.Event()  # set by the handler (client gone); the worker drops the request
        self._on_failure = on_failure  # called with the code of the request's first Failed (metrics)

    def post(self, event: Event) -> None:
        """Called from the worker thread."""
        if isinstance(event, Failed) and self._on_failure is not None:
            self._on_failure(event.code)
            self._on_failure = None  # one request, one failure (its other choices end with it)
        with contextlib.suppress(RuntimeError):  # the event loop is closed (server shut down): nobody listens
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        """The request's events, ending after ``n`` :class:`Finished` (one per choice) or one :class:`Failed`."""
        left = self.n
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Failed):
                return
            if isinstance(event, Finished):
                left -= 1
                if not left:
                    return

    def cancel(self) -> None:
        self.cancelled.set()
