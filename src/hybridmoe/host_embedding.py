"""Input embeddings kept in CPU RAM.

An embedding lookup reads T rows of the table; the table itself is large (DeepSeek: 102400 x 2048 bf16 = 0.4 GB)
and frozen under LoRA. Keeping it on the CPU and sending the looked-up rows ([T, H], 16 MB for 4096 tokens) to the
GPU saves that much GPU memory at no measurable cost. Not used when the table is tied to the LM head, which needs
it on the GPU anyway.

Like the experts, the table is a plain attribute, not a Parameter: ``model.to()`` cannot move it back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class HostEmbedding(nn.Module):
    """Drop-in for ``nn.Embedding``: ids on any device -> embeddings on ``out_device``."""

    def __init__(self, emb: nn.Embedding, out_device: torch.device):
        super().__init__()
        self.table = emb.weight.detach().to("cpu")  # [V, H], frozen
        self.padding_idx = emb.padding_idx
        self.out_device = torch.device(out_device)
        self.num_embeddings, self.embedding_dim = self.table.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, L] on any device -> [B, L, H] on out_device (the one host->device copy: T·H values)
        rows = F.embedding(input_ids.to("cpu"), self.table, self.padding_idx)
        return rows.to(self.out_device, non_blocking=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, device=cpu -> {self.out_device}"


def embeddings_to_host(model: nn.Module, device: torch.device) -> bool:
    """Swap the input embeddings of `model` for a HostEmbedding; False (nothing done) when they are tied."""
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding) or (out is not None and out.weight is emb.weight):
        return False
    model.set_input_embeddings(HostEmbedding(emb, device))
    return True
