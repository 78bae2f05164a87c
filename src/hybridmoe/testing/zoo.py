"""A zoo of tiny random configs: every text MoE architecture of the installed transformers with fused 3-D experts.

The list was made by scanning ``transformers/models/*/modeling_*.py`` for experts classes decorated with
``use_experts_implementation`` (or holding 3-D ``gate_up_proj``/``down_proj`` parameters, like llama4's) whose model
has an ``AutoModelForCausalLM`` class: :func:`scan_fused_moe_archs`, which a test keeps equal to ZOO_ARCHS.

Conventions are those of :mod:`hybridmoe.testing.tiny`: H=32, I=24 (expert), 40 (dense), 36 (shared), so H != I and
2I != H; more experts than top-k; a dense first layer and shared experts where the architecture has them; hybrid
architectures (linear attention, mamba, short convolutions) keep one layer of each kind they mix, with their
layer-type lists shrunk to the layer count.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .tiny import _COMMON, save_random_model

_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4)  # multi-head latent attention (DeepSeek-V2 style)
_DSA = dict(index_topk=8, index_head_dim=16, index_n_heads=2,  # DeepSeek sparse attention's indexer
            layer_types=["deepseek_sparse_attention"] * 3)
_DENSE_FIRST = ["dense", "sparse", "sparse"]
_SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])

_ZOO_KW: dict[str, dict] = {
    "afmoe": dict(intermediate_size=40, moe_intermediate_size=24, num_dense_layers=1, num_experts=6,
                  num_experts_per_tok=2, num_shared_experts=1, head_dim=8, global_attn_every_n_layers=2, **_SLIDING),
    "axk1": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                 n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8, **_MLA),
    "axk2": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                 n_shared_experts=1, mlp_layer_types=_DENSE_FIRST, gated_norm_rank=4, head_dim=8, **_MLA, **_DSA),
    "cohere2_moe": dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, num_shared_experts=1,
                        head_dim=8, layer_norm_eps=1e-5, mlp_layer_types=["sparse"] * 3, **_SLIDING),
    "deepseek_v2": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                        n_shared_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
                        routed_scaling_factor=1.0, **{**_MLA, "q_lora_rank": None}),
    "deepseek_v3": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True, **_MLA),
    "deepseek_v32": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                         n_shared_experts=1, first_k_dense_replace=1, mlp_layer_types=_DENSE_FIRST, n_group=2,
                         topk_group=1, head_dim=8, **_MLA, **_DSA),
    "deepseek_v4": dict(moe_intermediate_size=24, num_key_value_heads=1, head_dim=16, q_lora_rank=24,
                        n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, qk_rope_head_dim=8,
                        hc_mult=2, hc_sinkhorn_iters=2, sliding_window=8, o_groups=2, o_lora_rank=16,
                        index_n_heads=2, index_head_dim=16, index_topk=8, mlp_layer_types=["hash_moe", "moe", "moe"]),
    "dots1": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, max_window_layers=3, layer_types=["full_attention"] * 3),
    "ernie4_5_moe": dict(intermediate_size=40, moe_intermediate_size=24, moe_num_experts=6, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2),
    "exaone_moe": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                       num_shared_experts=1, first_k_dense_replace=1, mlp_layer_types=_DENSE_FIRST, head_dim=8,
                       **_SLIDING),
    "flex_olmo": dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2),
    "gemma4_text": dict(intermediate_size=40, head_dim=8, enable_moe_block=True, num_experts=6, top_k_experts=2,
                        moe_intermediate_size=24, hidden_size_per_layer_input=0, sliding_window=8,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "glm4_moe": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                     n_shared_experts=1, first_k_dense_replace=1, head_dim=8),
    "glm4_moe_lite": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                          n_shared_experts=1, mlp_layer_types=_DENSE_FIRST, **_MLA),
    "glm_moe_dsa": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, mlp_layer_types=_DENSE_FIRST,
                        indexer_types=["full"] * 3, head_dim=8, **_MLA, **_DSA),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, **_SLIDING),
    "granitemoe": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "granitemoe_swa": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                           shared_intermediate_size=36, layer_rope_theta=[10000.0] * 3, **_SLIDING),
    "granitemoehybrid": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=36, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                             mamba_chunk_size=8, layer_types=["mamba", "attention", "mamba"]),
    "granitemoeshared": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=36),
    "hunyuan_v1_moe": dict(intermediate_size=24, num_experts=4, moe_topk=2, head_dim=8),
    "hy_v3": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                  num_shared_experts=1, mlp_layer_types=_DENSE_FIRST, head_dim=8),
    "hy_v4": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                  n_shared_experts=1, mlp_layer_types=_DENSE_FIRST, indexer_types=["full", "full", "shared"],
                  hc_mult=2, head_dim=8, **_MLA, **_DSA),
    "inkling_text": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                         n_shared_experts=1, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                         swa_head_dim=8, sliding_window_size=8, d_rel=4, rel_extent=16, mlp_layer_types=_DENSE_FIRST),
    "jamba": dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                  expert_layer_offset=1, attn_layer_period=3, attn_layer_offset=1, use_mamba_kernels=False,
                  mamba_d_state=8, mamba_dt_rank=4),
    "kimi_linear": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_token=2,
                        num_shared_experts=1, mlp_layer_types=_DENSE_FIRST, linear_head_dim=8, linear_num_heads=4,
                        layer_types=["linear_attention", "full_attention", "linear_attention"],
                        **{**_MLA, "q_lora_rank": None}),
    "laguna": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36, num_experts=6,
                   num_experts_per_tok=2, num_attention_heads_per_layer=[4] * 3, mlp_layer_types=_DENSE_FIRST,
                   head_dim=8, **_SLIDING),
    "lfm2_moe": dict(intermediate_size=40, moe_intermediate_size=24, num_dense_layers=1, num_experts=6,
                     num_experts_per_tok=2, layer_types=["conv", "full_attention", "conv"]),
    "llama4_text": dict(intermediate_size=24, intermediate_size_mlp=40, num_local_experts=4, num_experts_per_tok=1,
                        interleave_moe_layer_step=2, head_dim=8, attention_chunk_size=8),
    "longcat_flash": dict(num_layers=2, ffn_hidden_size=40, expert_ffn_hidden_size=24, n_routed_experts=4,
                          zero_expert_num=2, moe_topk=2, head_dim=8, **_MLA),
    "mellum": dict(intermediate_size=40, moe_intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                   mlp_layer_types=_DENSE_FIRST, head_dim=8, **_SLIDING),
    "mimo_v2_flash": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                          mlp_layer_types=_DENSE_FIRST, head_dim=12, v_head_dim=8, **_SLIDING),
    "minimax": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, block_size=4,
                    layer_types=["full_attention", "linear_attention", "full_attention"]),
    "minimax_m2": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    "minimax_m3_vl_text": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                               dense_intermediate_size=40, shared_intermediate_size=36, rotary_dim=4,
                               mlp_layer_types=_DENSE_FIRST, index_n_heads=2, index_head_dim=8, index_block_size=4,
                               index_topk_blocks=2),
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "nemotron_h": dict(intermediate_size=40, moe_intermediate_size=24, moe_shared_expert_intermediate_size=36,
                       n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, head_dim=8, mamba_num_heads=4,
                       mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8, use_mamba_kernels=False,
                       layers_block_type=["linear_attention", "moe", "full_attention", "moe"]),
    "olmoe": dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
                   input_jitter_noise=0.0),
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36,
                      num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False),
    "qwen3_5_moe_text": dict(moe_intermediate_size=24, shared_expert_intermediate_size=36, num_experts=6,
                             num_experts_per_tok=2, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                             linear_num_key_heads=2, linear_num_value_heads=4,
                             layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                      decoder_sparse_step=1, norm_topk_prob=True, head_dim=8),
    "qwen3_next": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36,
                       num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, head_dim=8,
                       linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                       linear_num_value_heads=4,
                       layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "qwen4_exp_text": dict(moe_intermediate_size=24, shared_expert_intermediate_size=36, num_experts=6,
                           num_experts_per_tok=2, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                           linear_num_key_heads=2, linear_num_value_heads=4, hc_count=2, hc_lowrank=8,
                           ple_embed_dim=8, heads_per_ngram=2, ngram_vocab_size_base=64,
                           make_ngram_vocab_size_divisible_by=8, split_ngram_parts=2, indexer_n_heads=2,
                           indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=2,
                           layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "solar_open": dict(moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
                       head_dim=8),
    "zaya": dict(moe_intermediate_size=24, num_experts=4, num_experts_per_tok=1, head_dim=8, router_hidden_size=8),
}

ZOO_ARCHS = tuple(_ZOO_KW)

# Zoo architectures hybridmoe does not run yet, with what their experts block has that hybridmoe lacks. The ONE place
# to edit when an expert variant lands: tests/test_architectures.py marks these xfail, and everything else in the zoo
# is SUPPORTED_ARCHITECTURES, which errors and README name.
NOT_YET_SUPPORTED: dict[str, str] = {
    "longcat_flash": "expert variant: identity (\"zero\") experts, which have gate_up_proj rows but no down_proj",
}

# What hybridmoe supports = what tests/test_architectures.py runs and passes against transformers + PEFT.
SUPPORTED_ARCHITECTURES = tuple(a for a in ZOO_ARCHS if a not in NOT_YET_SUPPORTED)


def zoo_config(arch: str, **overrides):
    from transformers import AutoConfig

    kw = {**_COMMON, **_ZOO_KW[arch], **overrides}
    return AutoConfig.for_model(arch, **kw)


def save_zoo_model(arch: str, path: str | Path, seed: int = 0, dtype=torch.float32, init_std: float = 0.1,
                   tokenizer=None, **overrides):
    """Random-init a tiny model of zoo architecture `arch` and `save_pretrained` it (weights ~ N(0, init_std))."""
    return save_random_model(zoo_config(arch, **overrides), path, seed, dtype, init_std, tokenizer)


# A fused experts class: transformers' decorator, or 3-D expert weights registered as parameters (llama4, longcat).
_FUSED_EXPERTS = re.compile(
    r"@use_experts_implementation"
    r"|self\.(?:gate_up_proj|up_proj|down_proj) = nn\.Parameter\(\s*torch\.\w+\(\s*\(?\s*self\.\w*experts"
)


def scan_fused_moe_archs() -> list[str]:
    """The model types of the installed transformers whose causal LM has fused 3-D routed experts.

    Reads ``transformers/models/*/modeling_*.py``: the file defining each ``AutoModelForCausalLM`` class must hold a
    fused experts class. A composite (multimodal) config is skipped: its text model type is listed on its own
    (``qwen3_5_moe_text`` for ``qwen3_5_moe``). ZOO_ARCHS is this list (tests/test_architectures.py checks it)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fused: dict[str, bool] = {}  # class name -> does its modeling file hold fused experts
    for f in sorted((Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        src = f.read_text()
        has = bool(_FUSED_EXPERTS.search(src))
        for cls in re.findall(r"^class (\w+)\(", src, re.M):
            fused.setdefault(cls, has)
    found = []
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if not fused.get(cls, False):
            continue
        config = AutoConfig.for_model(model_type)
        if config.get_text_config() is config:
            found.append(model_type)
    return sorted(found)
