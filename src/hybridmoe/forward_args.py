"""Which keyword arguments a model's forward takes (through PEFT wrappers): shared by the eager and graph decoders."""

from __future__ import annotations

import inspect

import torch


def forward_params(model: torch.nn.Module) -> set[str]:
    """Named keyword arguments the model's forward accepts, looking through wrappers (PEFT) that take ``**kwargs``."""
    params = inspect.signature(model.forward).parameters
    names = set(params)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    get_base = getattr(model, "get_base_model", None)
    if takes_kwargs and callable(get_base):
        base = get_base()
        if base is not model:
            names |= forward_params(base)
    return names
