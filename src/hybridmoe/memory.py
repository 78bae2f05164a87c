"""What fits on the GPU: an estimate from the loaded model's own sizes, for a one-line out-of-memory message.

GPU memory of a step = a fixed part (the weights on the compute device, the GPU-side LoRA's gradient and AdamW
state, the streamed expert-weight slots (two layers by default), one chunk of LM-head logits) + a part per token of the micro-batch
(activations kept for backward and one layer's working set; for generation, the KV cache and one layer's working
set). Every term is read off the model (parameter bytes, Linear widths, the experts' shapes, the config's heads),
so the message can say how many tokens fit on this card and which setting to change. It is an estimate: allocator
fragmentation, the CUDA context (~0.5 GiB), attention kernels' workspaces and, where an attention implementation keeps
[heads, T, T] scores (eager, or SDPA's math fallback), that quadratic term are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import base_model_of
from .loss import CHUNK_TOKENS

GiB = 2**30


@dataclass
class MemoryEstimate:
    weights: int  # bytes of parameters and buffers on the compute device (non-expert weights, GPU-side LoRA)
    lora_state: int  # training: gradient + two AdamW moments of the GPU-side LoRA
    expert_slots: int  # the streamer's layers of routed-expert weights on the device (0 when streaming is off)
    logits: int  # training: one chunk of fp32 LM-head logits and their gradient; generation: one row
    kept_per_token: int  # training: activations kept for backward; generation: the KV cache
    working_per_token: int  # one layer's activations while it runs (recomputed under gradient checkpointing)

    @property
    def fixed(self) -> int:
        return self.weights + self.lora_state + self.expert_slots + self.logits

    @property
    def per_token(self) -> int:
        return self.kept_per_token + self.working_per_token

    def bytes_for(self, tokens: int) -> int:
        return self.fixed + tokens * self.per_token

    def tokens_that_fit(self, budget: int) -> int:
        return max(0, (budget - self.fixed) // max(1, self.per_token))


def _layer_elems_per_token(layer: nn.Module, hidden: int, top_k: int, streamed: bool) -> int:
    """Activation elements one decoder layer holds per token: every Linear's output (LoRA's included; the next op
    keeps it: an activation, rotary, attention, a norm), four hidden-sized norm/residual tensors, and the routed
    experts' kept rows when they run on the device."""
    from .experts import HybridExperts

    elems = 4 * hidden
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            elems += m.out_features
        elif isinstance(m, HybridExperts):
            # what _ExpertsFn keeps per token: x [H], per slot gu [2I] and y [H]; on the CPU path only the output
            s = m.spec
            elems += hidden + top_k * (2 * s.intermediate_dim + hidden) if streamed else hidden
    return elems


def _kv_elems_per_token(cfg) -> int:
    """KV-cache elements per token and layer, as transformers' attention caches them."""
    heads = cfg.num_attention_heads
    if getattr(cfg, "kv_lora_rank", None):  # DeepSeek MLA: the compressed latent and the shared rotary key
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * kv_heads * head_dim


def estimate_memory(model: nn.Module, training: bool = True, gradient_checkpointing: bool = True) -> MemoryEstimate:
    """Compute-device memory of `model` (as loaded by hybridmoe, PEFT-wrapped or not) for a training step or
    for generation, split into a fixed part and a part per token."""
    from .experts import HybridExperts
    from .experts.streaming import model_streamer

    base = base_model_of(model)
    device, act_bytes = base.hybridmoe.device, torch.empty(0, dtype=base.hybridmoe.dtype).element_size()
    cfg = base.config.get_text_config()
    seen: set[int] = set()
    weights = lora_state = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device == device and t.data_ptr() not in seen:  # tied weights once; embeddings kept on the host: none
            seen.add(t.data_ptr())
            weights += t.numel() * t.element_size()
            if training and t.requires_grad:
                lora_state += 3 * t.numel() * t.element_size()  # .grad, exp_avg, exp_avg_sq (same dtype as the param)
    experts = [m for m in base.modules() if isinstance(m, HybridExperts)]
    streamer = model_streamer(base)
    streamed = streamer is not None
    slots = 0
    if streamed:  # a split prompt's slots hold only the experts the GPU computes
        m = experts[0]
        cpu = 0 if training else m.settings.prefill_cpu_experts(m.weights.fmt, m.num_experts, streamer.device)
        slots = streamer.planned_slot_bytes(cpu)
    layers = base.get_decoder().layers
    per_layer = [_layer_elems_per_token(layer, cfg.hidden_size, cfg.num_experts_per_tok, streamed) for layer in layers]
    if not training:
        return MemoryEstimate(weights, 0, slots, cfg.vocab_size * 4, len(layers) * _kv_elems_per_token(cfg) * act_bytes,
                              max(per_layer) * act_bytes)
    # Under checkpointing only each layer's input is kept; one layer at a time is recomputed during backward.
    kept = len(layers) * cfg.hidden_size if gradient_checkpointing else sum(per_layer)
    logits = CHUNK_TOKENS * cfg.vocab_size * (4 + 4 + act_bytes)  # fp32 logits, their gradient, the head's output
    return MemoryEstimate(weights, lora_state, slots, logits, (kept + 2 * cfg.hidden_size) * act_bytes,
                          max(per_layer) * act_bytes)


def format_oom(est: MemoryEstimate, what: str, card_bytes: int, used_bytes: int, advice: str) -> str:
    """The one line a user sees: where it happened, the card, the estimate, what fits, what to change."""
    fits = est.tokens_that_fit(card_bytes)
    return (f"GPU out of memory {what} ({card_bytes / GiB:.1f} GiB card, {used_bytes / GiB:.1f} GiB in use): an "
            f"estimate for this model is {est.fixed / GiB:.2f} GiB fixed + {est.per_token * 1024 / GiB:.3f} GiB per 1k "
            f"tokens, so about {fits} tokens fit at once; {advice}")


def card_usage(device: torch.device) -> tuple[int, int]:
    """(total bytes of the card, bytes in use on it by every process) of a CUDA device."""
    free, total = torch.cuda.mem_get_info(device)
    return total, total - free
