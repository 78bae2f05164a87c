"""Which part of an MoE model a parameter or adapter tensor belongs to, from its name alone.

This runs on adapter files without the model, so it can only look at names. A name is split on ``.`` and its
*segments* are matched exactly (never as substrings: ``post_attention_layernorm`` is not attention, ``gate_proj``
is not a router ``gate``, ``shared_expert_gate`` is not a shared expert). The first rule that matches wins:

1. ``self_attn`` -- a segment ``self_attn``, ``attention``, ``attn``, ``self_attention``, ``cross_attn`` or
   ``linear_attn``, or an attention projection ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``qkv_proj``,
   ``query_key_value``, or DeepSeek MLA's ``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``.
   Norms *inside* attention (``self_attn.kv_a_layernorm``, ``self_attn.q_norm``) are attention.
2. ``router`` -- a segment ``gate`` (``mlp.gate.weight``, Mixtral v4 ``block_sparse_moe.gate``, DeepSeek-V3
   ``mlp.gate.e_score_correction_bias``), ``router``, or ``shared_expert_gate`` (Qwen2-MoE's sigmoid gate of the
   shared expert: it gates, it is not an expert). Comes before rule 5, which would take ``mlp.gate`` as dense.
3. ``shared_experts`` -- a segment ``shared_experts`` (DeepSeek), ``shared_expert`` (Qwen2-MoE, Llama 4) or
   ``shared_mlp``. Comes before rule 5 (``shared_experts.gate_proj`` holds a dense-MLP name too).
4. ``routed_experts`` -- a segment ``experts``: v5 fused parameters (``mlp.experts.gate_up_proj``), PEFT
   ``target_parameters`` LoRA on them (``mlp.experts.base_layer.lora_A.weight``, ``mlp.experts.lora_A.weight``),
   the per-expert layout (``mlp.experts.3.gate_proj.lora_A.weight``) and Mixtral v4
   (``block_sparse_moe.experts.0.w1``). Comes before rule 5 (``experts.3.gate_proj``). ``shared_experts`` is a
   different segment from ``experts``, so shared experts never land here.
5. ``dense_mlp`` -- what is left under ``mlp``, ``feed_forward`` or ``ffn``, or a ``gate_proj``/``up_proj``/
   ``down_proj``/``gate_up_proj`` segment: the dense MLP of dense-first layers (DeepSeek layer 0) and of dense
   models.
6. ``other`` -- everything else: embeddings, ``lm_head``, layer norms (``input_layernorm``, ``model.norm``),
   rotary buffers.

PEFT wrapper segments (``base_model``, ``lora_A``, ``modules_to_save``, ``default`` ...) never match any rule, so
an adapter key is classified like the base parameter it adapts.
"""

from __future__ import annotations

COMPONENTS = ("self_attn", "dense_mlp", "shared_experts", "routed_experts", "router", "other")

_ATTENTION = frozenset({
    "self_attn", "attention", "attn", "self_attention", "cross_attn", "linear_attn",
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value",
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
})
_ROUTER = frozenset({"gate", "router", "shared_expert_gate"})
_SHARED = frozenset({"shared_experts", "shared_expert", "shared_mlp"})
_ROUTED = frozenset({"experts"})
_DENSE = frozenset({"mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "gate_up_proj"})

# First match wins; the order is the one documented above.
_RULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("self_attn", _ATTENTION),
    ("router", _ROUTER),
    ("shared_experts", _SHARED),
    ("routed_experts", _ROUTED),
    ("dense_mlp", _DENSE),
)


def count_by_component(names) -> dict[str, int]:
    """How many of `names` fall in each component (only components that occur)."""
    counts: dict[str, int] = {}
    for name in names:
        c = component_of(name)
        counts[c] = counts.get(c, 0) + 1
    return counts


def component_of(name: str) -> str:
    """Return the component (one of :data:`COMPONENTS`) of a parameter or adapter-tensor ``name``."""
    segments = set(name.split("."))
    for component, markers in _RULES:
        if not segments.isdisjoint(markers):
            return component
    return "other"
