"""Input embeddings kept in CPU RAM (used on CUDA): same logits as the model's own nn.Embedding, placement report
lists the table under the CPU, and a table tied to the LM head is left where it is."""

from __future__ import annotations

import torch

from hybridmoe.host_embedding import HostEmbedding, embeddings_to_host
from hybridmoe.loading import load_model
from hybridmoe.placement import placement_report

from .helpers import make_checkpoint


def test_host_embedding_gives_the_same_logits(tiny_ckpt):
    model = load_model(tiny_ckpt("deepseek_v2"), device="cpu", dtype="float32", progress=False)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        assert embeddings_to_host(model, torch.device("cpu"))
        assert isinstance(model.get_input_embeddings(), HostEmbedding)
        got = model(ids).logits
    assert torch.equal(got, want)
    rep = placement_report(model)
    assert rep["ok"], rep["problems"]
    assert rep["devices"]["cpu (input embeddings)"]["bytes"] == model.get_input_embeddings().table.numel() * 4


def test_tied_embeddings_stay(tmp_path):
    path = make_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    model = load_model(path, device="cpu", dtype="float32", progress=False)
    assert not embeddings_to_host(model, torch.device("cpu"))
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
