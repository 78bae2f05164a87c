"""The generation engine: one worker thread owns the model and interleaves many requests.

Scheduling, one loop iteration at a time:

1. **Admit.** Waiting requests (FIFO) are prefilled one by one, batch 1, while fewer than ``max_batch_size``
   sequences are running. Prefill samples the first token; a request that is not finished then joins the
   :class:`~hybridmoe.serve.batch.DecodeBatch` of its adapter (a new one if that is full or missing).
2. **Decode.** One decode step of one batch, taking the batches round-robin: every adapter group gets a step in
   turn, whatever its size. Each batch runs with its adapter active (:class:`~hybridmoe.serve.adapters.AdapterSet`),
   so requests for different adapters are never mixed in one forward.

Per-request state is a :class:`~hybridmoe.generate.TokenStream`, the same sampling / stop / text code as
``hybridmoe chat``. A failure in one sequence (non-finite logits: :class:`~hybridmoe.errors.NonFiniteError`) fails
that request only; an unexpected exception in a batched forward fails that batch's requests; the loop goes on.

Results go back to the asyncio side through :class:`Handle`: the worker posts events with
``loop.call_soon_threadsafe``, the HTTP handler awaits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from hybridmoe.errors import NonFiniteError
from hybridmoe.generate import SamplingConfig, StopReason, TokenStream, input_device, prefill

from .adapters import AdapterSet
from .batch import DecodeBatch, batchable

log = logging.getLogger("hybridmoe.serve")


# -- events: worker thread -> request handler ------------------------------------------------------------------------
@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    stop_reason: StopReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    code: str  # "non_finite_logits", "out_of_memory", "internal_error", "shutting_down"


Event = Delta | Finished | Failed


def _out_of_memory(model, tokens: int, max_new_tokens: int) -> Failed:
    """The failure of a request that ran the GPU out of memory: one logged line, with what fits (no traceback)."""
    from hybridmoe.chat import generation_oom_line

    line = generation_oom_line(model, tokens, max_new_tokens, advice="send shorter prompts or a lower max_tokens, or "
                               "start the server with a lower --max-batch-size")
    log.error("%s", line)
    return Failed(line, "out_of_memory")


class Handle:
    """One submitted request as seen by the asyncio side: an event stream and a cancel switch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()  # set by the handler (client gone); the worker drops the request

    def post(self, event: Event) -> None:
        """Called from the worker thread."""
        with contextlib.suppress(RuntimeError):  # the event loop is closed (server shut down): nobody listens
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        """The request's events, ending with one :class:`Finished` or :class:`Failed`."""
        while True:
            event = await self._events.get()
            yield event
            if not isinstance(event, Delta):
                return

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Request:
    prompt_ids: list[int]
    adapter: str | None  # None = the base model
    cfg: SamplingConfig
    handle: Handle
    stream: TokenStream | None = None  # set at prefill


@dataclass
class _Group:
    adapter: str | None
    batch: DecodeBatch
    requests: list[_Request] = field(default_factory=list)  # row i of the batch is requests[i]


class Engine:
    """Owns the model on a worker thread; :meth:`submit` is safe to call from the event loop."""

    def __init__(self, adapters: AdapterSet, tokenizer, max_batch_size: int = 16) -> None:
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._waiting: queue.Queue[_Request | None] = queue.Queue()  # None wakes the worker to stop
        self._groups: list[_Group] = []
        self._next = 0  # round-robin cursor into _groups
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hybridmoe-engine", daemon=True)
        self.batchable: bool | None = None  # learnt from the first prefilled cache
        # counters for /health and the load benchmark (written by the worker only)
        self.stats = {"prefills": 0, "prefill_s": 0.0, "decode_steps": 0, "decode_s": 0.0, "decoded_tokens": 0,
                      "max_batch": 0}

    # -- control, from any thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._waiting.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def running(self) -> int:
        return sum(len(g.requests) for g in self._groups)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def submit(self, prompt_ids: list[int], adapter: str | None, cfg: SamplingConfig) -> Handle:
        """Queue a request; call from a running event loop (its events are delivered there)."""
        handle = Handle(asyncio.get_running_loop())
        if not self.alive:
            handle.post(Failed("the server is shutting down", "shutting_down"))
            return handle
        self._waiting.put(_Request(prompt_ids, adapter, cfg, handle))
        return handle

    # -- the worker --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception as e:  # a bug in the scheduler itself: fail what is running, keep serving
                    log.exception("engine iteration failed")
                    self._fail_running(f"internal error: {type(e).__name__}: {e}", "internal_error")
        self._fail_running("the server is shutting down", "shutting_down")
        self._fail_waiting("the server is shutting down", "shutting_down")

    def _iteration(self) -> None:
        self._admit(block=not self._groups)
        if self._groups:
            i = self._next % len(self._groups)
            group = self._groups[i]
            self._decode(group)
            self._next = i + 1 if group in self._groups else i  # a finished group's turn passes on

    def _admit(self, block: bool) -> None:
        while self.running < self.max_batch_size:
            try:
                req = self._waiting.get(block=block)
            except queue.Empty:
                return
            if req is None:  # stop() woke us
                return
            block = False
            if not req.handle.cancelled.is_set():
                self._prefill(req)

    def _prefill(self, req: _Request) -> None:
        from transformers import DynamicCache

        model = self.adapters.model
        t0 = time.perf_counter()
        try:
            self.adapters.activate(req.adapter)
            prompt = torch.tensor([req.prompt_ids], dtype=torch.long, device=input_device(model))  # [1, T]
            req.stream = TokenStream(model, self.tokenizer, prompt, req.cfg, diagnose=_diagnosis(req.adapter))
            logits, cache = prefill(model, prompt, DynamicCache(config=model.config))  # [1, V]
            self._emit(req, req.stream.accept(logits))  # accept() syncs (.item()), so the timing below is real
            self.stats["prefills"] += 1
            self.stats["prefill_s"] += time.perf_counter() - t0
        except NonFiniteError as e:
            req.handle.post(Failed(str(e), "non_finite_logits"))
            return
        except torch.cuda.OutOfMemoryError:  # this request fails with an estimate of what fits; the server goes on
            req.handle.post(_out_of_memory(model, len(req.prompt_ids), req.cfg.max_new_tokens))
            return
        except Exception as e:  # a bug: this request fails, the server keeps serving
            log.exception("prefill failed")
            req.handle.post(Failed(f"internal error during prefill: {type(e).__name__}: {e}", "internal_error"))
            return
        if req.stream.stop_reason is not None:
            self._finish(req)
            return
        if self.batchable is None:
            self.batchable = batchable(cache)
            if not self.batchable:
                log.warning("this model's KV cache is not a plain DynamicCache; decoding requests one at a time")
        group = self._group_for(req.adapter)
        try:
            group.batch.add(cache, req.stream.length - 1)  # the cache holds the prompt; the sampled token is next
        except Exception as e:  # e.g. out of memory while padding: the batch's caches may be half-updated
            log.exception("joining a decode batch failed")
            for r in [*group.requests, req]:
                r.handle.post(Failed(f"internal error joining a batch: {type(e).__name__}: {e}", "internal_error"))
            self._groups.remove(group)
            return
        group.requests.append(req)

    def _group_for(self, adapter: str | None) -> _Group:
        for g in self._groups:
            if g.adapter == adapter and not g.batch.full():
                return g
        capacity = self.max_batch_size if self.batchable else 1
        g = _Group(adapter, DecodeBatch(self.adapters.model, capacity))
        self._groups.append(g)
        return g

    def _decode(self, group: _Group) -> None:
        cancelled = [i for i, r in enumerate(group.requests) if r.handle.cancelled.is_set()]
        self._drop(group, cancelled)
        if not group.requests:
            return
        self.adapters.activate(group.adapter)
        t0 = time.perf_counter()
        tokens = torch.stack([r.stream.last_id for r in group.requests])  # [B, 1] int64, compute device
        try:
            logits = group.batch.step(tokens)  # [B, V] fp32
        except torch.cuda.OutOfMemoryError:  # the batch's KV caches outgrew the card: its requests fail, one line
            longest = max(r.stream.length for r in group.requests)
            failed = _out_of_memory(self.adapters.model, longest, max(r.cfg.max_new_tokens for r in group.requests))
            for r in group.requests:
                r.handle.post(failed)
            self._drop(group, list(range(len(group.requests))))
            return
        except Exception as e:  # a bug: this batch fails, the server keeps serving
            log.exception("decode step failed")
            for r in group.requests:
                r.handle.post(Failed(f"internal error during decode: {type(e).__name__}: {e}", "internal_error"))
            self._drop(group, list(range(len(group.requests))))
            return
        done = []
        for i, r in enumerate(group.requests):
            try:
                self._emit(r, r.stream.accept(logits[i : i + 1]))  # [1, V]
            except NonFiniteError as e:
                r.handle.post(Failed(str(e), "non_finite_logits"))
                done.append(i)
                continue
            if r.stream.stop_reason is not None:
                self._finish(r)
                done.append(i)
        self.stats["decode_steps"] += 1
        self.stats["decode_s"] += time.perf_counter() - t0  # accept() synced on every row's token
        self.stats["decoded_tokens"] += len(group.requests)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(group.requests))
        self._drop(group, done)

    def _drop(self, group: _Group, rows: list[int]) -> None:
        """Remove ``rows`` from the group's batch; an empty group leaves the round-robin."""
        if rows:
            group.batch.remove(rows)
            group.requests = [r for i, r in enumerate(group.requests) if i not in set(rows)]
        if not group.requests and group in self._groups:
            self._groups.remove(group)

    def _emit(self, req: _Request, delta: str) -> None:
        if delta:
            req.handle.post(Delta(delta))

    def _finish(self, req: _Request) -> None:
        self._emit(req, req.stream.flush())
        s = req.stream
        req.handle.post(Finished(s.stop_reason, s.n_prompt, len(s.token_ids)))

    def _fail_running(self, message: str, code: str) -> None:
        for g in self._groups:
            for r in g.requests:
                r.handle.post(Failed(message, code))
        self._groups = []

    def _fail_waiting(self, message: str, code: str) -> None:
        while True:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                req.handle.post(Failed(message, code))


def _diagnosis(adapter: str | None):
    """The detail added to a non-finite-logits error: which served model produced it."""
    return lambda: f"served model: adapter '{adapter}'" if adapter is not None else "served model: the base model"
