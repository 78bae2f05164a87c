"""Per-step communication and per-host memory of data-parallel training, computed for V2-Lite and V3 shapes.

    python benchmarks/dist_comm.py                      # rank 8, lora_target=all, 1-64 ranks
    python benchmarks/dist_comm.py --rank 16 --ranks 2 8 --ranks-per-host 8

Nothing here is measured on a cluster (none was available): the model is built on the meta device from its real
config with hybridmoe's own loader (experts swapped by structure, LoRA targets resolved as `lora_target=all` would),
and the numbers follow from the parameter counts. One JSON line per (model, ranks):

- gpu_lora_params / expert_lora_params: what DDP and the expert-LoRA all-reduce sum every optimizer step (fp32).
- allreduce_gb_per_rank: bytes each rank sends (and receives) per step in a ring all-reduce, 2(N-1)/N x payload.
- est_seconds_*: that volume at the assumed bandwidths below (bus bandwidth per rank), plus the host<->GPU staging
  of the expert-LoRA gradients on the NCCL path. Assumptions, not measurements.
- host_gb: per host, the routed experts once (bf16) + every local rank's expert LoRA, its gradient and two AdamW
  moments (4 x fp32 each) -- versus experts_per_rank_gb, what a copy per rank would need.
- experts_touched: expected fraction of a layer's experts that receive any token in a global step of `tokens`
  tokens (1 - (1 - k/E)^T, uniform routing) -- near 1, so a dense all-reduce of the expert-LoRA gradients is right.
"""

from __future__ import annotations

import argparse
import json

import torch

V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
               qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", n_group=1,
               topk_group=1, tie_word_embeddings=False)
V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
          num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
          n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536,
          qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4,
          routed_scaling_factor=2.5, norm_topk_prob=True, tie_word_embeddings=False)
MODELS = {"deepseek-v2-lite": ("deepseek_v2", V2_LITE), "deepseek-v3": ("deepseek_v3", V3)}

# Assumed bus bandwidth per rank, GB/s (NCCL all-reduce busbw): NVLink 4 on one H100 host; 400 Gb/s InfiniBand
# across hosts; gloo over 25 GbE TCP. Pageable host<->GPU copies for the NCCL staging of the expert-LoRA gradients.
BANDWIDTH = {"nvlink": 150.0, "infiniband": 40.0, "gloo_tcp": 2.5}
STAGING_GBPS = 10.0


def shapes(model_type: str, kw: dict, rank: int) -> dict:
    from transformers import AutoConfig

    from hybridmoe.adapters import resolve_targets
    from hybridmoe.loading import _build_empty, _swap_experts

    config = AutoConfig.for_model(model_type, **kw)
    model = _build_empty(config, torch.bfloat16)  # meta parameters: no memory
    experts = _swap_experts(model, torch.bfloat16, device="meta")
    targets = resolve_targets(model, "all")
    gpu_params = sum(p.numel() for p in model.parameters())  # experts are not parameters
    gpu_lora = sum(rank * (m.in_features + m.out_features)
                   for n, m in model.named_modules() if n in set(targets.linear))
    expert_params = expert_lora = 0
    for ex in experts.values():
        s = ex.spec
        e, h, i = s.num_experts, s.hidden_dim, s.intermediate_dim
        expert_params += e * 3 * h * i
        expert_lora += e * rank * ((h + 2 * i) + (i + h))  # gate_up: in H, out 2I; down: in I, out H
    return {"gpu_params": gpu_params, "expert_params": expert_params, "gpu_lora_params": gpu_lora,
            "expert_lora_params": expert_lora, "moe_layers": len(experts), "experts_per_layer": e,
            "top_k": config.num_experts_per_tok}


def estimate(name: str, sh: dict, ranks: int, per_host: int, tokens: int) -> dict:
    gb = 1e9
    payload = 4 * (sh["gpu_lora_params"] + sh["expert_lora_params"])  # fp32 gradients
    ring = 2 * (ranks - 1) / ranks
    per_rank = ring * payload / gb
    # H2D + D2H of the expert-LoRA gradients on the NCCL path (none with one rank: nothing is reduced)
    staged = 2 * 4 * sh["expert_lora_params"] / gb / STAGING_GBPS if ranks > 1 else 0.0
    link = "nvlink" if ranks <= per_host else "infiniband"
    local = min(ranks, per_host)
    lora_state = 16 * sh["expert_lora_params"] / gb  # param + grad + 2 AdamW moments, fp32
    experts_gb = 2 * sh["expert_params"] / gb
    e, k = sh["experts_per_layer"], sh["top_k"]
    return {
        "model": name, "ranks": ranks, "ranks_per_host": local, "tokens_per_step": tokens,
        "gpu_side_gb_bf16": round(2 * sh["gpu_params"] / gb, 2), "experts_gb_bf16": round(experts_gb, 1),
        "gpu_lora_params": sh["gpu_lora_params"], "expert_lora_params": sh["expert_lora_params"],
        "allreduce_payload_gb": round(payload / gb, 3), "allreduce_gb_per_rank": round(per_rank, 3),
        f"est_seconds_nccl_{link}": round(per_rank / BANDWIDTH[link] + staged, 3),
        "est_seconds_gloo_tcp": round(per_rank / BANDWIDTH["gloo_tcp"], 2),
        "host_gb": round(experts_gb + local * lora_state, 1),
        "experts_per_rank_gb": round(local * (experts_gb + lora_state), 1),
        "expert_lora_state_gb_per_rank": round(lora_state, 1),
        "experts_touched": round(1 - (1 - k / e) ** tokens, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8, help="lora_rank")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8, 16, 64], help="world sizes")
    ap.add_argument("--ranks-per-host", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per global step")
    args = ap.parse_args()
    for name, (model_type, kw) in MODELS.items():
        sh = shapes(model_type, kw, args.rank)
        for n in args.ranks:
            rec = estimate(name, sh, n, args.ranks_per_host, args.tokens)
            print(json.dumps({"lora_rank": args.rank, "assumed_gbps": BANDWIDTH, "staging_gbps": STAGING_GBPS,
                              **rec}))


if __name__ == "__main__":
    main()
