"""Constrained decoding for ``response_format`` and ``tools``, through xgrammar (the ``structured`` extra).

Why xgrammar: measured on the test tokenizer (512 tokens) and torch 2.13 CPU, it compiled a JSON schema in 2.5 ms
and filled a token mask in 0.05-0.06 ms per token; llguidance 1.9 built its first mask lazily in 0.6-4 s (then ~0.1
ms a token), and outlines-core 0.2 needs a hand-built byte-level vocabulary for HF BPE tokenizers (its own loader
downloads from the hub). xgrammar also ships each model family's tool-call format as a structural tag.

Tool calls use the Hermes / Qwen format that Qwen2.5, Qwen3 and Qwen3-MoE chat templates render and that
vLLM's ``hermes`` parser reads::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``tool_choice`` ``"auto"`` lets the model write text and, after a ``<tool_call>`` trigger, constrains the call;
``"required"`` forces at least one call; a named tool forces one call of it; ``"none"`` leaves the text free.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from typing import Any

import torch

from hybridmoe.errors import ConfigError

TOOL_CALL_FORMAT = "qwen_3"  # xgrammar's name for the Hermes/Qwen <tool_call>{json}</tool_call> format
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_CALL_START = "<tool_call>"


def available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


class Grammars:
    """Compiles request grammars for one tokenizer (thread-safe; compiled grammars are cached by xgrammar)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)  # 1: compiles run on a request's worker thread
        self._lock = threading.Lock()

    def json_object(self):
        """Any JSON object (``response_format: {"type": "json_object"}``)."""
        return self.json_schema({"type": "object"})

    def json_schema(self, schema: dict):
        """JSON that follows ``schema`` (``response_format: {"type": "json_schema"}``); ConfigError if unsupported."""
        try:
            with self._lock:
                # compact separators and no free whitespace: a small model cannot pad the reply with blanks forever
                return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise ConfigError(f"the JSON schema cannot be compiled: {e}") from None

    def tools(self, tools: list[dict], choice: str | dict, parallel: bool = True):
        """Calls of ``tools`` (OpenAI function tools) as ``tool_choice`` asks; None for ``"none"`` (free text).

        ``"auto"``: free text, and after the ``<tool_call>`` trigger a call of one of the tools (xgrammar's Qwen 3
        structural tag). ``"required"``: only calls, at least one (one if not ``parallel``), separated by newlines,
        then the end, as vLLM's required tool choice. A named tool: exactly one call of it.
        """
        from xgrammar import structural_tag as st

        if choice == "none":
            return None
        if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}}
            name = choice["function"]["name"]
            tools = [t for t in tools if t["function"]["name"] == name]
        calls = [st.TagFormat(begin=f'{TOOL_CALL_START}\n{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
                              content=st.JSONSchemaFormat(json_schema=t["function"].get("parameters") or {"type": "object"},
                                                          max_whitespace_cnt=1),
                              end="}\n</tool_call>") for t in tools]
        if isinstance(choice, dict):
            fmt = calls[0]
        elif choice == "required":
            fmt = st.TagsWithSeparatorFormat(tags=calls, separator="\n", at_least_one=True, stop_after_first=not parallel)
        else:  # auto
            fmt = st.TriggeredTagsFormat(triggers=[TOOL_CALL_START], tags=calls, stop_after_first=not parallel)
        try:
            with self._lock:
                return self._compiler.compile_structural_tag(st.StructuralTag(format=fmt))
        except Exception as e:
            raise ConfigError(f"the tools' parameter schemas cannot be compiled: {e}") from None


def matcher_for(grammar, stop_ids: list[int]):
    """A fresh matcher for one sequence and its token bitmask [1, ceil(V / 32)] int32."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar, override_stop_tokens=stop_ids)
    return matcher, xgr.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)


def apply_mask(matcher, bitmask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` [1, V] fp32 with the tokens the grammar forbids next set to -inf (on the scores' device)."""
    import xgrammar as xgr

    matcher.fill_next_token_bitmask(bitmask)  # [1, ceil(V / 32)] int32 on the CPU, filled by xgrammar
    scores = scores.clone()  # the caller's logits stay raw (logprobs are reported from them)
    # the mask goes where the logits are: V/32 int32 (19 KB for a 150k vocabulary) per row and step. On a GPU,
    # plain torch ops rather than xgrammar's default Triton kernel: no JIT compile on the first request, and no
    # dependence on the Triton build that comes with the installed torch (one row a step: the cost is small)
    backend = "cpu" if scores.device.type == "cpu" else "torch_native"
    xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device), backend=backend)
    return scores


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Split a reply into (content outside the calls or None, OpenAI ``tool_calls``). A block that is not a JSON
    object with a string ``name`` stays in the content."""
    calls, kept, pos = [], [], 0
    for m in _TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None), calls
