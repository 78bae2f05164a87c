"""The SFT loss without materialising [tokens, vocab] logits.

transformers' causal-LM forward computes the logits of every position, then upcasts them to fp32 for the loss: at
4096 tokens and DeepSeek's 102400-token vocabulary that is 0.8 GB of bf16 logits, 1.7 GB in fp32, and the same
again for their gradient, the largest GPU allocation of a LoRA step. Here the decoder's last hidden states are
taken instead; only the supervised positions go through the LM head, in chunks, each under activation
checkpointing (the chunk's logits are recomputed in backward, never stored). The value is the same as
transformers' ``ForCausalLMLoss``: Σ cross-entropy over supervised next-token targets (fp32) / num_items_in_batch.

Used for models whose LM head is a plain projection of the last hidden state and that add no auxiliary loss;
others (``output_router_logits``, logit soft-capping or scaling) take the model's own loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .adapters import base_model_of

CHUNK_TOKENS = 256  # rows of logits alive at once: 256 × 102400 × 4 B = 0.1 GB for DeepSeek's vocabulary


def chunked_loss_supported(model: nn.Module) -> bool:
    base = base_model_of(model)
    cfg = base.config.get_text_config()
    plain_head = not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    # The decoder must be a separate module returning hidden states (Llama-4's get_decoder() is the LM itself).
    has_decoder = base.get_decoder() is not base
    return plain_head and has_decoder and not getattr(cfg, "output_router_logits", False)


def _ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # hidden: [n, H] model dtype -> fp32 scalar Σ CE over the n rows
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss(model: nn.Module, batch: dict, num_items_in_batch: int, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Σ CE(supervised next-token predictions) / num_items_in_batch, the LM head applied chunk by chunk."""
    if not chunked_loss_supported(model):
        return model(**batch, num_items_in_batch=num_items_in_batch).loss
    base = base_model_of(model)
    labels = batch["labels"]  # [B, L], -100 where unsupervised
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.get_decoder()(**inputs).last_hidden_state  # [B, L, H]
    targets = labels[:, 1:].reshape(-1)  # [B·(L-1)]: position t predicts token t+1
    keep = (targets != -100).nonzero().squeeze(1)  # [N] supervised positions
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)  # [N, H]
    y = targets.index_select(0, keep)  # [N]
    head = base.get_output_embeddings()
    total = hidden.sum().float() * 0.0  # keeps the graph connected when a micro-batch has no supervised token
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_sum, head, h[s : s + chunk], y[s : s + chunk], use_reentrant=False)
    return total / num_items_in_batch
