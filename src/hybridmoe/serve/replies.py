"""Engine events -> OpenAI responses: whole replies and server-sent event streams, for chat and text completions.

Each request's events (:mod:`hybridmoe.serve.engine`) carry a choice ``index``; a :class:`Choice` gathers one choice's
text, logprobs and finish reason. Chat replies with ``tools`` are parsed for ``<tool_call>`` blocks
(:func:`~hybridmoe.serve.constrained.parse_tool_calls`); in a stream, text from a possible ``<tool_call>`` on is
held back and the calls go out as one ``tool_calls`` delta at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from . import schemas
from .constrained import TOOL_CALL_START, parse_tool_calls
from .events import Delta, Failed, Handle
from .sampling import TokenLogprob


class StreamFailed(Exception):
    """A request failed in the engine; ``event`` says why (the route turns it into an error response)."""

    def __init__(self, event: Failed) -> None:
        super().__init__(event.message)
        self.event = event


@dataclass
class Choice:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    tokens: int = 0


async def collect(handles: list[Handle]) -> tuple[list[Choice], int, int]:
    """Wait for every choice of every handle (choice index = handle i x n + event index); returns (choices,
    prompt tokens of all handles, completion tokens). Raises :class:`StreamFailed` on the first failure."""
    choices: list[Choice] = []
    prompt = 0
    for handle in handles:
        base = len(choices)
        choices += [Choice() for _ in range(handle.n)]
        async for ev in handle.events():
            if isinstance(ev, Failed):
                raise StreamFailed(ev)
            c = choices[base + ev.index]
            if isinstance(ev, Delta):
                c.text += ev.text
                c.logprobs += ev.logprobs or []
            else:
                c.finish, c.tokens = schemas.FINISH_REASON[ev.stop_reason], ev.completion_tokens
                prompt_tokens = ev.prompt_tokens
        prompt += prompt_tokens
    return choices, prompt, sum(c.tokens for c in choices)


class TokenText:
    """Token ids -> the strings and bytes logprobs report (one token decoded alone, as vLLM does)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat(self, entries: list[TokenLogprob]) -> dict:
        """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        def item(tid: int, lp: float) -> dict:
            s = self(tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def completion(self, entries: list[TokenLogprob], offset: int = 0) -> dict:
        """The legacy completions ``logprobs``: parallel lists, ``text_offset`` counted from ``offset``."""
        tokens = [self(e.token_id) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def chat_message(c: Choice, tools: bool) -> tuple[dict, str]:
    """The assistant message of a finished choice and its finish reason (``tool_calls`` when it called tools)."""
    if tools:
        content, calls = parse_tool_calls(c.text)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": c.text}, c.finish


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _held_back(text: str, start: int) -> int:
    """The end of what can be streamed as content from ``text[start:]`` while a ``<tool_call>`` may begin."""
    at = text.find(TOOL_CALL_START, start)
    if at >= 0:
        return at
    for k in range(min(len(TOOL_CALL_START) - 1, len(text) - start), 0, -1):  # a tail that could grow into it
        if TOOL_CALL_START.startswith(text[-k:]):
            return len(text) - k
    return len(text)


async def chat_stream(handle: Handle, model: str, include_usage: bool, tokens: TokenText, tools: bool,
                      error_body) -> AsyncIterator[str]:
    """Server-sent events: per choice a role chunk, content chunks, a finish chunk; [a usage chunk,] ``[DONE]``.
    ``error_body(Failed) -> dict`` makes the final error event of a failed request."""
    cid, created = schemas.completion_id(), int(time.time())
    texts = [""] * handle.n
    sent = [0] * handle.n  # characters of texts[i] streamed as content
    completion = finished = 0
    try:
        for i in range(handle.n):
            yield _event(schemas.chunk(cid, model, created, {"role": "assistant", "content": ""}, index=i))
        async for ev in handle.events():
            if isinstance(ev, Failed):
                yield _event(error_body(ev))
                return
            i = ev.index
            if isinstance(ev, Delta):
                texts[i] += ev.text
                end = _held_back(texts[i], sent[i]) if tools else len(texts[i])
                logprobs = tokens.chat(ev.logprobs) if ev.logprobs else None
                if end > sent[i] or logprobs:
                    yield _event(schemas.chunk(cid, model, created, {"content": texts[i][sent[i]:end]}, index=i,
                                               logprobs=logprobs))
                    sent[i] = end
                continue
            completion += ev.completion_tokens
            finish = schemas.FINISH_REASON[ev.stop_reason]
            calls = parse_tool_calls(texts[i])[1] if tools else []
            if calls:
                delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                yield _event(schemas.chunk(cid, model, created, delta, index=i))
                finish = "tool_calls"
            elif sent[i] < len(texts[i]):
                yield _event(schemas.chunk(cid, model, created, {"content": texts[i][sent[i]:]}, index=i))
            yield _event(schemas.chunk(cid, model, created, {}, finish, index=i))
            finished += 1
            if finished == handle.n:
                if include_usage:
                    yield _event(schemas.chunk(cid, model, created, None,
                                               usage_=schemas.usage(ev.prompt_tokens, completion)))
                yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # the client went away mid-stream: stop generating for it


async def completion_stream(handles: list[tuple[Handle, str]], model: str, include_usage: bool, tokens: TokenText,
                            want_logprobs: bool, error_body) -> AsyncIterator[str]:
    """Server-sent ``text_completion`` events for (handle, echo prefix) pairs, handle after handle."""
    cid, created = schemas.completion_id("cmpl"), int(time.time())
    prompt = completion = 0
    try:
        for h, (handle, echo) in enumerate(handles):
            offsets = [len(echo)] * handle.n
            if echo:
                for j in range(handle.n):
                    yield _event(schemas.text_chunk(cid, model, created, h * handle.n + j, echo))
            async for ev in handle.events():
                if isinstance(ev, Failed):
                    yield _event(error_body(ev))
                    return
                index = h * handle.n + ev.index
                if isinstance(ev, Delta):
                    lp = tokens.completion(ev.logprobs or [], offsets[ev.index]) if want_logprobs else None
                    offsets[ev.index] += len(ev.text)
                    yield _event(schemas.text_chunk(cid, model, created, index, ev.text, logprobs=lp))
                else:
                    completion += ev.completion_tokens
                    prompt_tokens = ev.prompt_tokens
                    yield _event(schemas.text_chunk(cid, model, created, index, "",
                                                    schemas.FINISH_REASON[ev.stop_reason]))
            prompt += prompt_tokens
        if include_usage:
            yield _event(schemas.text_chunk(cid, model, created, None, usage_=schemas.usage(prompt, completion)))
        yield "data: [DONE]\n\n"
    finally:
        for handle, _ in handles:
            handle.cancel()
