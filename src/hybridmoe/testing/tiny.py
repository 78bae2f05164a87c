"""Tiny random configs of the supported MoE architectures, built with ``AutoConfig.for_model``.

Sizes are chosen so that H != I and 2I != H (a transposed or mis-chunked expert would show up as a shape error or a
wrong number, never pass by accident), every MoE layer has more experts than top-k, and DeepSeek-style models keep a
dense first layer and shared experts (the seed's bug 4).
"""

from __future__ import annotations

from pathlib import Path

import torch

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=1, pad_token_id=1)  # ids of testing.tokenizer

_ARCH_KW: dict[str, dict] = {
    "deepseek_v2": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=6, num_experts_per_tok=2,
                        n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
                        topk_method="greedy", routed_scaling_factor=1.0, num_key_value_heads=4),
    "deepseek_v3": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4),
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36,
                      num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                      decoder_sparse_step=1, norm_topk_prob=True, head_dim=8),
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2),
}

TINY_ARCHS = tuple(_ARCH_KW)


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    kw = {**_COMMON, **_ARCH_KW[arch], **overrides}
    return AutoConfig.for_model(arch, **kw)


def save_tiny_model(arch: str, path: str | Path, seed: int = 0, dtype=torch.float32, init_std: float = 0.1,
                    tokenizer=None, max_shard_size: str | None = None, **overrides):
    """Random-init a tiny model of `arch` and `save_pretrained` it (transformers' own hub key layout)."""
    return save_random_model(tiny_config(arch, **overrides), path, seed, dtype, init_std, tokenizer, max_shard_size)


def save_random_model(config, path: str | Path, seed: int = 0, dtype=torch.float32, init_std: float = 0.1,
                      tokenizer=None, max_shard_size: str | None = None):
    """Build `config`'s causal LM with every weight ~ N(0, init_std) and `save_pretrained` it (with `tokenizer`)."""
    from transformers import AutoModelForCausalLM

    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Routers start near zero in some archs; give every weight real values so routing differs per token.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * init_std)
    if tokenizer is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return model
