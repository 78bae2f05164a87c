"""``model.generate`` on the fast path: the transformers call users already write, run by :func:`hybridmoe.generation.generate`.

transformers' ``GenerationMixin.generate`` decodes eagerly with a ``DynamicCache``: on a hybrid model that is one
Python-launched kernel at a time and one CPU experts call per MoE layer and token (5 tok/s on V2-Lite where the
static-cache, CUDA-graph decoder of :mod:`hybridmoe.decode_graph` does 31+). :func:`install` gives the model
returned by :func:`hybridmoe.load` a ``generate`` that takes the common transformers arguments for one sequence
(``input_ids``, ``attention_mask`` of ones, ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
``top_k``, ``repetition_penalty``) and runs them through :func:`hybridmoe.generation.generate`, returning what
transformers returns (``[1, prompt + new]`` token ids, EOS included). Anything else (batches, beams, streamers,
logits processors, ``return_dict_in_generate``, ...) goes to transformers' own ``generate``, unchanged.

Greedy output is token for token transformers' (tested); sampling uses the same distribution (temperature, top-k,
top-p as transformers applies them) from hybridmoe's own random stream.
"""

from __future__ import annotations

import types
from typing import Any

import torch

# Arguments handled here; any other keyword sends the call to transformers.
_HANDLED = frozenset({"input_ids", "attention_mask", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                      "repetition_penalty", "pad_token_id", "use_cache"})


def install(model: torch.nn.Module, tokenizer: Any) -> torch.nn.Module:
    """Give `model` (the object :func:`hybridmoe.load` returns) a fast ``generate``; returns `model`."""
    # transformers' (or PEFT's) bound method, kept for everything not handled here
    model._hybridmoe_slow_generate = model.generate

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs):
        if not _handled(input_ids, kwargs):
            slow = self._hybridmoe_slow_generate
            return slow(input_ids, **kwargs) if input_ids is not None else slow(**kwargs)
        return _fast(self, tokenizer, input_ids, kwargs)

    generate.__doc__ = __doc__
    model.generate = types.MethodType(generate, model)
    return model


def _handled(input_ids, kwargs: dict) -> bool:
    if input_ids is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        return False
    if set(kwargs) - _HANDLED or kwargs.get("use_cache", True) is False:
        return False
    mask = kwargs.get("attention_mask")
    return mask is None or bool((mask == 1).all())


def _fast(model, tokenizer, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    from .generation import SamplingConfig, generate

    gen_cfg = getattr(model, "generation_config", None)

    def pick(name: str, default):
        value = kwargs.get(name)
        if value is None:
            value = getattr(gen_cfg, name, None)
        return default if value is None else value

    max_new = kwargs.get("max_new_tokens") or getattr(gen_cfg, "max_new_tokens", None) or 20
    if pick("do_sample", False):
        cfg = SamplingConfig(max_new_tokens=int(max_new), temperature=float(pick("temperature", 1.0)),
                             top_p=float(pick("top_p", 1.0)), top_k=int(pick("top_k", 50)),
                             repetition_penalty=float(pick("repetition_penalty", 1.0)))
    else:
        cfg = SamplingConfig(max_new_tokens=int(max_new), temperature=0.0,
                             repetition_penalty=float(pick("repetition_penalty", 1.0)))
    res = generate(model, tokenizer, input_ids, cfg)
    new = torch.tensor([res.token_ids], dtype=input_ids.dtype, device=input_ids.device)  # [1, n]
    return torch.cat([input_ids, new], dim=1)  # [1, T + n]
