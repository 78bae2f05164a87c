"""hybridmoe.attention_backend: cuDNN attention (a plan per new shape) off once a model is on a GPU."""

from __future__ import annotations

import pytest
import torch

from hybridmoe import attention_backend


@pytest.fixture
def cudnn_flag():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cuda_device_turns_cudnn_attention_off(cudnn_flag, monkeypatch):
    monkeypatch.setattr(attention_backend, "KEEP_CUDNN", False)
    attention_backend.avoid_per_shape_plans(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU model leaves torch's choice alone
    attention_backend.avoid_per_shape_plans(torch.device("cuda", 0))
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_environment_keeps_cudnn_attention(cudnn_flag, monkeypatch):
    monkeypatch.setattr(attention_backend, "KEEP_CUDNN", True)
    attention_backend.avoid_per_shape_plans(torch.device("cuda", 0))
    assert torch.backends.cuda.cudnn_sdp_enabled()
