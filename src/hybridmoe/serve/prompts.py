"""Requests -> prompt token ids and per-choice sampling configs (chat template, tokenizer, grammars).

Everything here runs on a worker thread (``run_in_threadpool``), never on the event loop: a chat template over a long
history, the tokenization of a multi-megabyte prompt or a grammar compile must not hold up ``/health`` or the
streams of other requests.
"""

from __future__ import annotations

from dataclasses import replace

from hybridmoe.errors import HybridMoEError

from . import constrained, schemas
from .errors import ApiError
from .sampling import ServeSampling


class GrammarCache:
    """xgrammar compilers for the tokenizer, built on first use (the `structured` extra may be missing)."""

    def __init__(self, tokenizer, engine) -> None:
        self.tokenizer, self.engine = tokenizer, engine
        self._grammars = None

    def get(self) -> constrained.Grammars:
        if self._grammars is None:
            if not constrained.available():
                raise ApiError(400, "'response_format' and 'tools' need constrained decoding, which needs xgrammar: "
                                    "pip install 'hybridmoe[structured]' on the server", code="unsupported")
            from hybridmoe.generation import eos_token_ids

            model = self.engine.adapters.model
            vocab = model.get_output_embeddings().weight.shape[0]  # logits width (may exceed len(tokenizer))
            self._grammars = constrained.Grammars(self.tokenizer, vocab, sorted(eos_token_ids(model, self.tokenizer)))
        return self._grammars


def render(tokenizer, messages: list[schemas.Message], tools: list[dict] | None, generation_prompt: bool = True):
    """Chat-template ``messages`` (and ``tools``) into token ids, or a 400 naming what the template refused."""
    from jinja2 import TemplateError

    template = getattr(tokenizer, "chat_template", None) or ""
    if tools and "tools" not in template:
        raise ApiError(400, "this model's chat template does not render tools; start the server with a "
                            "--chat-template that does", param="tools")
    if any(m.tool_calls for m in messages) and "tool_calls" not in template:  # it would drop them silently
        raise ApiError(400, "this model's chat template does not render the tool calls of assistant messages; "
                            "start the server with a --chat-template that does", param="messages")
    try:
        ids = tokenizer.apply_chat_template([m.as_template_message() for m in messages], tools=tools,
                                            add_generation_prompt=generation_prompt, tokenize=True, return_dict=False)
    except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/user/assistant/..."
        raise ApiError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _budget(n_prompt: int, max_new: int | None, context_length: int | None, what: str) -> int:
    """The completion length: ``max_new``, or what is left of the context; a 400 when they do not fit."""
    if context_length is not None:
        if n_prompt >= context_length:
            raise ApiError(400, f"the prompt is {n_prompt} tokens, which leaves no room in this model's context of "
                                f"{context_length} tokens; shorten the {what}", param=what,
                           code="context_length_exceeded")
        if max_new is None:
            max_new = context_length - n_prompt
        elif n_prompt + max_new > context_length:
            raise ApiError(400, f"this model's context is {context_length} tokens, but the request asks for "
                                f"{n_prompt + max_new} ({n_prompt} in the {what}, {max_new} in the completion); "
                                f"lower max_tokens or shorten the {what}", param="max_tokens",
                           code="context_length_exceeded")
    return max_new if max_new is not None else 4096


def _sampling(body: schemas.SamplingParams, max_new: int, logprobs: int | None, grammar=None) -> list[ServeSampling]:
    """One config per choice; choice i of a seeded request uses seed + i (choices differ, and repeat)."""
    try:
        base = ServeSampling(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                             top_k=max(body.top_k, 0), repetition_penalty=body.repetition_penalty, seed=body.seed,
                             stop_strings=tuple(body.stop or ()), min_p=body.min_p,
                             presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                             logprobs=logprobs, grammar=grammar, ignore_eos=body.ignore_eos)
    except HybridMoEError as e:  # ranges are checked by the schema; this is a second line of defence
        raise ApiError(400, f"invalid sampling settings: {e}", code="invalid_value") from None
    return [replace(base, seed=None if body.seed is None else (body.seed + i) % 2**64) for i in range(body.n)]


def prepare_chat(body: schemas.ChatCompletionRequest, tokenizer, context_length: int | None, grammars: GrammarCache):
    """Prompt token ids and one sampling config per choice, or a 400 naming what is wrong (runs off the loop)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    prompt_ids = render(tokenizer, body.messages, tools)
    max_new = _budget(len(prompt_ids), body.max_new_tokens, context_length, "messages")
    grammar = None
    try:
        choice = body.effective_tool_choice
        if tools and choice != "none":
            grammar = grammars.get().tools(tools, choice, parallel=body.parallel_tool_calls)
        elif body.response_format is not None and body.response_format.type == "json_object":
            grammar = grammars.get().json_object()
        elif body.response_format is not None and body.response_format.type == "json_schema":
            grammar = grammars.get().json_schema(body.response_format.json_schema.schema_)
    except HybridMoEError as e:
        raise ApiError(400, str(e), param="tools" if tools else "response_format", code="invalid_value") from None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return prompt_ids, _sampling(body, max_new, logprobs, grammar)


def prepare_completion(body: schemas.CompletionRequest, tokenizer, context_length: int | None):
    """Per prompt: (token ids, one sampling config per choice, echo prefix), or a 400 (runs off the loop)."""
    out = []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            ids = encode(tokenizer, prompt)
            text = prompt
        else:
            if any(t >= len(tokenizer) for t in prompt):
                raise ApiError(400, f"prompt token ids must be below the vocabulary size {len(tokenizer)}",
                               param="prompt")
            ids, text = prompt, tokenizer.decode(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization; send some text", param="prompt")
        max_new = _budget(len(ids), body.max_tokens, context_length, "prompt")
        out.append((ids, _sampling(body, max_new, body.logprobs), text if body.echo else ""))
    return out
