"""The OpenAI chat-completions wire format: the request we accept and the responses we build.

Requests are validated strictly (pydantic): a wrong type, an out-of-range value or an argument we do not implement
is a 400 naming the parameter, never silently ignored. Accepted for compatibility with clients that always send
them: ``n`` (1 only), ``presence_penalty`` / ``frequency_penalty`` (0 only), ``logprobs`` (false only), ``user``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hybridmoe.generation import StopReason

Strict = Field(strict=True)  # no "1" -> 1, no true -> 1


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # "developer" is what newer OpenAI clients call the system prompt
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Strict] | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        """The message as the tokenizer's chat template takes it: role and plain text."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. ``temperature`` defaults to 1 as in OpenAI's API; 0 is greedy."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    temperature: Annotated[float, Strict, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Strict, Field(gt=0, le=1)] = 1.0
    max_tokens: Annotated[int, Strict, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Strict, Field(ge=1)] | None = None
    stop: Any = None  # a string or up to 4 strings; checked below for one clear message
    seed: Annotated[int, Strict, Field(ge=0, lt=2**64)] | None = None
    stream: Annotated[bool, Strict] = False
    stream_options: StreamOptions | None = None
    # accepted only at the value that means "off" (clients send them by default)
    n: Annotated[int, Strict] = 1
    presence_penalty: Annotated[float, Strict] = 0.0
    frequency_penalty: Annotated[float, Strict] = 0.0
    logprobs: Annotated[bool, Strict] = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(x, str) and x for x in stops):
            raise ValueError("must be a non-empty string or a list of 1 to 4 non-empty strings")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported (one choice per request; send several requests instead)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError("presence and frequency penalties are not implemented; only 0 is accepted")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not implemented; only false is accepted")
        return v

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ---------------------------------------------------------------------------------------------------
FINISH_REASON: dict[StopReason, str] = {"eos": "stop", "stop_string": "stop", "length": "length"}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, stop_reason: StopReason, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """A whole ``chat.completion`` object."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": FINISH_REASON[stop_reason]}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """One ``chat.completion.chunk``; with ``delta=None`` the usage-only chunk (``choices: []``)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
