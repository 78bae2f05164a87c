"""Graph gates (hybridmoe.graph_gate): graph i+1 of a decode step launched before cut i's experts, waiting on the GPU
for the host's flag. The kernel's logic in Triton's interpreter on the CPU; on CUDA (`pytest -m gpu`) gated decode is
bit for bit ungated decode, an error in a cut's experts opens the pending gate (no hung stream), and a GPU share turns
the gates off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import hybridmoe
from hybridmoe import graph_gate
from hybridmoe.decode_graph import StaticDecoder
from hybridmoe.generation import input_device
from hybridmoe.placement import format_report, placement_report

_INTERPRETED = """
import torch
from hybridmoe.graph_gate import HostGates
g = HostGates(3, pin=False)
g.open(1)
g.wait(1)  # passes the open gate and clears it
assert g.flags.tolist() == [0, 0, 0], g.flags
g.pending.update({0, 2})
g.open_pending()  # what an error does: every queued gate opened
assert g.flags.tolist() == [1, 0, 1] and not g.pending, (g.flags, g.pending)
print("ok")
"""


@pytest.mark.skipif(graph_gate.triton is None, reason="Triton is not installed")
def test_gate_kernel_passes_an_open_gate_and_clears_it_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when the kernel is defined: a child process
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_gates_say_why_they_are_off(monkeypatch, ckpt_dir):
    assert graph_gate.unavailable(torch.device("cpu")) == "CUDA only"
    monkeypatch.setattr(graph_gate, "ENABLED", False)
    want = "HYBRIDMOE_GRAPH_GATES=0" if graph_gate.triton is not None else "Triton is not installed"
    assert want in graph_gate.unavailable(torch.device("cuda"))
    model, _ = hybridmoe.load(ckpt_dir("deepseek_v2"), device="cpu", dtype="float32", progress=False)
    rep = placement_report(model)
    assert rep["graph_gates"] == {"used": False, "why": "CUDA only"}
    assert "decode graph gates: off (CUDA only)" in format_report(rep)
    dec = StaticDecoder(model.eval(), 32, torch.device("cpu"))
    dec.prefill(torch.arange(5, 15).unsqueeze(0))
    dec.step(torch.tensor([3]), 10)
    assert dec.chain.gates is None  # eager decode on the CPU: nothing is launched ahead


def _decoder(model, share: float, gates: bool, monkeypatch) -> StaticDecoder:
    monkeypatch.setattr(graph_gate, "ENABLED", gates)  # read when the graphs are captured
    return StaticDecoder(model, 64, input_device(model), gpu_share=share)


def _logits(dec: StaticDecoder, steps: int = 6) -> torch.Tensor:
    """[1 + steps, 1, V]: a 20-token prefill's logits and `steps` greedy decode steps' (on CUDA: step 1 eager,
    step 2 captures, the rest replay)."""
    dev = dec.device
    logits = [dec.prefill(torch.arange(5, 25, device=dev).unsqueeze(0)).clone()]
    for pos in range(20, 20 + steps):
        logits.append(dec.step(logits[-1].argmax(-1), pos).clone())
    return torch.stack(logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["deepseek_v2", "gpt_oss"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gated_decode_is_ungated_decode_bit_for_bit(arch, dtype, monkeypatch, ckpt_dir, tmp_path):
    if arch == "gpt_oss":
        from .helpers import make_zoo_checkpoint

        path = make_zoo_checkpoint("gpt_oss", tmp_path / "gpt_oss")
    else:
        path = ckpt_dir(arch)
    model, _ = hybridmoe.load(path, device="cuda", dtype=dtype, progress=False)
    gated = _decoder(model.eval(), 0.0, True, monkeypatch)
    a = _logits(gated)
    plain = _decoder(model, 0.0, False, monkeypatch)
    b = _logits(plain)
    assert gated.mode == plain.mode == "cuda_graphs"
    assert gated.chain.gates is not None and len(gated.chain.gates) == len(gated.chain.cuts)
    assert plain.chain.gates is None
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_error_in_a_cut_opens_its_gate(monkeypatch, ckpt_dir):
    """A cut's experts raise in a replayed step: the error reaches the caller, the pending gate was opened (the stream
    drains instead of waiting for ever) and no flag stays set, so the decoder, reset, decodes as before."""
    model, _ = hybridmoe.load(ckpt_dir("qwen2_moe"), device="cuda", dtype="float32", progress=False)
    want = _logits(_decoder(model.eval(), 0.0, False, monkeypatch))
    dec = _decoder(model, 0.0, True, monkeypatch)
    _logits(dec, steps=3)  # captured and replayed once
    cut = dec.chain.cuts[1]

    def broken(*a, **kw):
        raise RuntimeError("a cut's experts failed")

    cut.compute = broken
    with pytest.raises(RuntimeError, match="experts failed"):
        dec.step(torch.tensor([7]), 23)
    del cut.compute
    torch.cuda.synchronize()  # returns: nothing waits at a gate
    assert int(dec.chain.gates.flags.abs().sum()) == 0 and not dec.chain.gates.pending
    dec.reset()
    assert torch.equal(_logits(dec), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_share_turns_the_gates_off(monkeypatch, ckpt_dir):
    """The share's copies and graph are queued after the cut's graph: a graph launched ahead would overtake them."""
    model, _ = hybridmoe.load(ckpt_dir("deepseek_v2"), device="cuda", dtype="float32", progress=False)
    dec = _decoder(model.eval(), 0.5, True, monkeypatch)
    _logits(dec)
    assert dec.chain.share is not None and dec.chain.gates is None
    why = placement_report(model)["graph_gates"]["why"]  # fp32 experts: a third on the GPU by default
    assert "gpu_share" in why
