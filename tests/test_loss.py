"""The chunked SFT loss equals transformers' causal-LM loss, in value and in every LoRA gradient (fp32, rel ≤ 1e-5),
on every architecture, including micro-batches whose supervised tokens are split across chunks or absent."""

from __future__ import annotations

import pytest
import torch

from hybridmoe.adapters import apply_lora
from hybridmoe.loading import load_model
from hybridmoe.loss import causal_lm_loss, chunked_loss_supported
from hybridmoe.testing import TINY_ARCHS

from .helpers import randomize_lora


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chunked_loss_equals_transformers_loss(arch, tiny_ckpt):
    model = apply_lora(load_model(tiny_ckpt(arch), device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    randomize_lora(model, seed=2)
    assert chunked_loss_supported(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 100, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not supervised
    labels[1, 7:] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    n_items = int((labels[:, 1:] != -100).sum())

    ref = model(**batch, num_items_in_batch=n_items).loss
    ref.backward()
    want = _grads(model)
    model.zero_grad()
    got = causal_lm_loss(model, batch, n_items, chunk=5)  # 5 rows a chunk: several chunks, a ragged last one
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(_grads(model), want):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() <= 1e-5


def test_no_supervised_token_gives_zero_loss_and_grads(tiny_ckpt):
    model = apply_lora(load_model(tiny_ckpt("qwen3_moe"), device="cpu", dtype="float32", progress=False), "all", 4, 8)
    ids = torch.randint(4, 100, (1, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    loss = causal_lm_loss(model, batch, 1)
    loss.backward()
    assert loss.item() == 0.0
    assert all((p.grad is None) or not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_router_aux_loss_models_keep_their_own_loss(tiny_ckpt):
    model = load_model(tiny_ckpt("mixtral"), device="cpu", dtype="float32", progress=False)
    model.config.output_router_logits = True
    assert not chunked_loss_supported(model)
