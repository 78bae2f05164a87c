"""hybridmoe: LoRA fine-tuning and chat for MoE LLMs whose routed experts live in CPU RAM and run on the CPU."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import HybridMoEError


def load(model, adapter=None, device=None, dtype=None, expert_dtype=None, merge: bool = False, progress: bool = True,
         stream_min_tokens=None, stream_slots: int = 2):
    """Load a MoE checkpoint (and optionally a PEFT adapter) for generation; returns ``(model, tokenizer)``.

    model: checkpoint directory. adapter: PEFT adapter directory. device: 'cuda' or 'cpu' (default: cuda if
    available). dtype: 'bfloat16' or 'float32' (default bf16 on cuda, fp32 on cpu). expert_dtype: of the routed
    experts in CPU RAM (default: dtype); 'int8' quantizes them per output row as they load (half the memory and the
    bytes per decoded token; LoRA trains on top of them). merge: fold the adapter into the
    weights on both sides (same outputs, faster). stream_min_tokens: prompts of at least this many tokens run the
    experts on the GPU with their weights streamed in (default 64 on CUDA, 0 = CPU only); stream_slots: layers of
    expert weights the GPU keeps while streaming (>= 2). The returned model's ``generate`` works like a transformers model's.
    """
    from .adapters import load_adapter, merge_adapter
    from .loading import load_model, load_tokenizer

    m = load_model(model, device=device, dtype=dtype, expert_dtype=expert_dtype, progress=progress,
                   stream_min_tokens=stream_min_tokens, stream_slots=stream_slots)
    tok = load_tokenizer(model)
    if adapter is not None:
        m = load_adapter(m, adapter)
        if merge:
            m = merge_adapter(m)
    return m, tok


def train(config, overrides=None):
    """Run LoRA SFT from a config (YAML path, dict or TrainConfig) — the same entry point as `hybridmoe train`."""
    from .training import train as _train

    return _train(config, overrides)


__all__ = ["HybridMoEError", "__version__", "load", "train"]
