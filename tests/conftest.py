"""Shared fixtures: tiny random checkpoints of every supported architecture, saved with save_pretrained."""

from __future__ import annotations

import os

import pytest
import torch

from hybridmoe.testing import TINY_ARCHS, save_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(arch) -> path of a saved tiny random model (hub per-expert key layout, fp32)."""
    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"ckpt_{arch}")
            save_tiny_model(arch, path, seed=0)
            cache[arch] = str(path)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """ckpt_dir(arch) -> path of a saved tiny random model with a tokenizer (read-only: copy it to modify it)."""
    from .helpers import make_checkpoint

    root = tmp_path_factory.mktemp("ckpt_tok")
    cache = {}

    def make(arch):
        if arch not in cache:
            cache[arch] = make_checkpoint(arch, root / arch)
        return cache[arch]

    return make


ARCHS = pytest.mark.parametrize("arch", TINY_ARCHS)

# Tests that take `device` run on the CPU in CI and, marked `gpu`, on the GPU host (`pytest -m gpu`).
DEVICES = pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA GPU")])],
)
