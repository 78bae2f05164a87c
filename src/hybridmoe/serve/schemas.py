"""The OpenAI wire format (chat and text completions) plus vLLM's extras: the requests we accept, the responses we build.

Requests are validated strictly (pydantic): a wrong type, an out-of-range value or an argument we do not implement
is a 400 naming the parameter, never silently ignored. vLLM's extra sampling parameters (``top_k``, ``min_p``,
``repetition_penalty``) are accepted at the top level, where the openai client's ``extra_body`` puts them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hybridmoe.generation import StopReason

Strict = Field(strict=True)  # no "1" -> 1, no true -> 1


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


Content = Annotated[str, Strict] | list[TextPart]


def _text(content: Content | None) -> str:
    return "" if content is None else content if isinstance(content, str) else "".join(p.text for p in content)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # a JSON object as a string, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json(cls, v):
        try:
            json.loads(v)
        except json.JSONDecodeError:
            raise ValueError("must be a JSON string (the call's arguments)") from None
        return v


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    """A chat message: system/developer/user text, an assistant reply (text and/or ``tool_calls``), or a ``tool``
    result answering the call ``tool_call_id``."""

    model_config = ConfigDict(extra="forbid")
    # "developer" is what newer OpenAI clients call the system prompt
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant only
    tool_call_id: str | None = None  # tool only

    @model_validator(mode="after")
    def _shape(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the 'tool_call_id' of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("'content' is required (it may be null only in an assistant message with tool_calls)")
        return self

    def as_template_message(self) -> dict:
        """The message as chat templates take it (as vLLM passes it): plain text content, and tool-call arguments
        parsed from their JSON string into an object (templates render them with ``tojson``)."""
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": _text(self.content)}
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            msg["name"] = self.name
        return msg


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with 'name' and 'schema'")
        return self


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class SamplingParams(BaseModel):
    """What chat and text completions share: OpenAI's sampling parameters and vLLM's extra ones."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: Annotated[float, Strict, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Strict, Field(gt=0, le=1)] = 1.0
    max_tokens: Annotated[int, Strict, Field(ge=1)] | None = None
    stop: Any = None  # a string or up to 4 strings; checked below for one clear message
    seed: Annotated[int, Strict, Field(ge=0, lt=2**64)] | None = None
    stream: Annotated[bool, Strict] = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Strict, Field(ge=1, le=64)] = 1  # choices; they share the prompt's prefill
    presence_penalty: Annotated[float, Strict, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Strict, Field(ge=-2, le=2)] = 0.0
    user: str | None = None
    # vLLM's extra sampling parameters (openai client: extra_body={...})
    top_k: Annotated[int, Strict, Field(ge=-1)] = -1  # -1 (vLLM) or 0: off
    min_p: Annotated[float, Strict, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Strict, Field(gt=0, le=10)] = 1.0
    ignore_eos: Annotated[bool, Strict] = False  # generate max_tokens whatever the model says (load tests)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(x, str) and x for x in stops):
            raise ValueError("must be a non-empty string or a list of 1 to 4 non-empty strings")
        return stops


class ChatCompletionRequest(SamplingParams):
    """POST /v1/chat/completions. ``temperature`` defaults to 1 as in OpenAI's API; 0 is greedy."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Strict, Field(ge=1)] | None = None
    logprobs: Annotated[bool, Strict] = False
    top_logprobs: Annotated[int, Strict, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("'tool_choice' needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools}:
            raise ValueError(f"'tool_choice' names '{self.tool_choice.function.name}', which is not in 'tools'")
        if self.tools and self.effective_tool_choice != "none" and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("'response_format' and 'tools' cannot both constrain the reply; send one of them")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def effective_tool_choice(self) -> str | dict:
        """OpenAI's default: "auto" when tools are given, "none" without."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()


class CompletionRequest(SamplingParams):
    """POST /v1/completions: raw text in, text out (no chat template). OpenAI's default ``max_tokens`` is 16."""

    prompt: Annotated[str, Strict] | Annotated[list[Annotated[str, Strict]], Field(min_length=1, max_length=64)] \
        | Annotated[list[Annotated[int, Strict, Field(ge=0)]], Field(min_length=1)]
    max_tokens: Annotated[int, Strict, Field(ge=1)] | None = 16
    echo: Annotated[bool, Strict] = False
    logprobs: Annotated[int, Strict, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Strict] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        ok = isinstance(v, str) or (isinstance(v, list) and v and (
            all(isinstance(x, str) for x in v) or all(isinstance(x, int) and not isinstance(x, bool) for x in v)))
        if not ok:
            raise ValueError("must be a string, a non-empty list of strings or a non-empty list of token ids")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v is not None:
            raise ValueError("'suffix' (fill-in-the-middle) is not supported; leave it out and put the text in 'prompt'")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported; use 'n' for several choices")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("'echo' with 'logprobs' would need the prompt's logprobs, which are not computed; "
                             "send one of them")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string, a list of strings, or one list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM): a ``prompt`` string, or chat ``messages`` rendered by the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[Annotated[int, Strict, Field(ge=0)]]


class LoadLoraRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")]
    lora_path: Annotated[str, Field(min_length=1)]
    load_inplace: bool = False


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


# -- responses ---------------------------------------------------------------------------------------------------
FINISH_REASON: dict[StopReason, str] = {"eos": "stop", "stop_string": "stop", "length": "length"}


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, choices: list[dict], usage_: dict, obj: str = "chat.completion") -> dict:
    """A whole ``chat.completion`` (or ``text_completion``) object."""
    return {"id": cid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage_}


def chunk(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict:
    """One ``chat.completion.chunk``; with ``delta=None`` the usage-only chunk (``choices: []``)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def text_chunk(cid: str, model: str, created: int, index: int | None, text: str = "", finish_reason: str | None = None,
               logprobs: dict | None = None, usage_: dict | None = None) -> dict:
    """One streamed ``text_completion`` object; with ``index=None`` the usage-only one."""
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    out = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
