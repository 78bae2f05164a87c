"""hybridmoe: LoRA fine-tuning and chat for MoE LLMs whose routed experts live in CPU RAM and run on the CPU."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import HybridMoEError


def load(model, adapter=None, device=None, dtype=None, expert_dtype=None, merge: bool = False, progress: bool = True,
         stream_min_tokens=None, stream_slots: int = 2, stream_cpu_share=None,
         resident_expert_layers: int = 0):
    """Load a MoE checkpoint (and optionally a PEFT adapter) for generation; returns ``(model, tokenizer)``.

    model: checkpoint directory. adapter: PEFT adapter directory. device: 'cuda' or 'cpu' (default: cuda if
    available). dtype: 'bfloat16' or 'float32' (default bf16 on cuda, fp32 on cpu). expert_dtype: of the routed
    experts in CPU RAM (default: dtype); 'int8' quantizes them per output row as they load (half the memory and the
    bytes per decoded token; LoRA trains on top of them). merge: fold the adapter into the
    weights on both sides (same outputs, faster). stream_min_tokens: prompts of at least this many tokens run the
    experts on the GPU with their weights streamed in (default 64 on CUDA, 0 = CPU only); stream_slots: layers of
    expert weights the GPU keeps while streaming (>= 2); stream_cpu_share: share of each layer's experts the CPU
    computes meanwhile in such a prompt (0..1, default by expert format); resident_expert_layers: the first N MoE
    layers keep their experts on the GPU and compute them there for every batch, decode included (GPU memory for
    speed).

    The returned model's ``generate`` takes transformers' arguments; one sequence with the common sampling arguments
    runs hybridmoe's static-cache decoder (CUDA graphs on a GPU, see :mod:`hybridmoe.fast_generate`), anything else
    transformers' own. :func:`generate` is the same path with streaming text and timings.
    """
    from .adapters import load_adapter, merge_adapter
    from .fast_generate import install
    from .loading import load_model, load_tokenizer

    m = load_model(model, device=device, dtype=dtype, expert_dtype=expert_dtype, progress=progress,
                   stream_min_tokens=stream_min_tokens, stream_slots=stream_slots, stream_cpu_share=stream_cpu_share,
                   resident_expert_layers=resident_expert_layers)
    tok = load_tokenizer(model)
    if adapter is not None:
        m = load_adapter(m, adapter)
        if merge:
            m = merge_adapter(m)
    return install(m, tok), tok


def generate(model, tokenizer, input_ids, cfg=None, **kwargs):
    """One reply to ``input_ids`` ([T] or [1, T], already chat-templated) on the fast path: returns a
    :class:`hybridmoe.generation.GenerationResult` (``token_ids``, ``text``, ``stop_reason``, prefill/decode timings).

    cfg: a :class:`hybridmoe.generation.SamplingConfig` (default: temperature 0.7, 256 new tokens), or pass its fields
    as keywords (``max_new_tokens=64, temperature=0``); ``on_text=print`` streams the reply."""
    from .generation import SamplingConfig
    from .generation import generate as _generate

    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in SamplingConfig.__dataclass_fields__}
    if fields:
        cfg = SamplingConfig(**fields) if cfg is None else SamplingConfig(**{**cfg.__dict__, **fields})
    return _generate(model, tokenizer, input_ids, cfg, **kwargs)


def train(config, overrides=None):
    """Run LoRA SFT from a config (YAML path, dict or TrainConfig) — the same entry point as `hybridmoe train`."""
    from .training import train as _train

    return _train(config, overrides)


__all__ = ["HybridMoEError", "__version__", "generate", "load", "train"]
