"""The expert LoRA's AdamW step on a worker thread (hybridmoe.cpu_optim.OverlappedStep): bit for bit torch's
AdamW(fused=True).step(), its state interchangeable with torch's, and each layer's masters held back from readers
until their own update is done."""

from __future__ import annotations

import threading

import pytest
import torch

from hybridmoe import cpu_optim
from hybridmoe.cpu_optim import OverlappedStep, overlapped_step
from hybridmoe.experts.cpu_experts import ExpertLoRA


def _layers(seed: int) -> list[list[ExpertLoRA]]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(3):
        los = [ExpertLoRA(4, 16, 24, 2, 4.0), ExpertLoRA(4, 12, 16, 2, 4.0)]
        for lo in los:
            lo.reset_parameters(g)
            lo.B.normal_(generator=g)
            lo.requires_grad_(True)
        layers.append(los)
    return layers


def _params(layers, dense):
    return [dense] + [t for los in layers for lo in los for t in lo.parameters()]


def _set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if (step + i) % 7 == 0 else torch.randn(p.shape, generator=g)  # some steps without a gradient


def _run(overlap: bool, steps: int = 5):
    layers = _layers(0)
    dense = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()  # "the GPU LoRA"
    params = _params(layers, dense)
    opt = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.1}], lr=1e-2,
                            betas=(0.8, 0.95), eps=1e-6, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    stepper = OverlappedStep(opt, layers) if overlap else None
    for step in range(steps):
        for los in layers:  # a forward reads the masters: waits for its layer's update
            for lo in los:
                lo.wait_update()
        _set_grads(params, step)
        if stepper is not None:
            stepper.step()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if stepper is not None:
        stepper.close()
    return params, opt


def test_bitwise_torch_fused_adamw_and_same_state():
    ref_params, ref_opt = _run(overlap=False)
    params, opt = _run(overlap=True)
    for p, r in zip(params, ref_params):
        assert torch.equal(p, r)
    for p, r in zip(params, ref_params):
        s, t = opt.state[p], ref_opt.state[r]
        assert s.keys() == t.keys()
        for k in s:
            assert s[k].dtype == t[k].dtype and s[k].device == t[k].device and torch.equal(s[k], t[k]), k
    # the state dicts load into each other (a checkpoint of one resumes the other)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sd["param_groups"] == ref_sd["param_groups"] and sd["state"].keys() == ref_sd["state"].keys()


def test_readers_wait_for_their_layer(monkeypatch):
    gate = threading.Event()
    real = cpu_optim._run
    monkeypatch.setattr(cpu_optim, "_run", lambda *args: (gate.wait(), real(*args)))
    layers = _layers(0)
    params = _params(layers, torch.zeros(2, requires_grad=True))
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    stepper = OverlappedStep(opt, layers)
    _set_grads(params, 1)
    before = layers[0][0].B.clone()
    stepper.step()
    lo = layers[0][0]
    assert lo.update is not None and not lo.update.is_set()
    seen = {}
    reader = threading.Thread(target=lambda: seen.update(b=lo.factors_on(torch.device("cpu"), torch.float32)[1]))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # held back: the update has not run
    gate.set()
    reader.join(10)
    assert not reader.is_alive() and not torch.equal(seen["b"], before)  # it read the updated masters
    stepper.close()


def test_a_failed_update_releases_every_layer_and_raises(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(torch, "_fused_adamw_", boom)
    layers = _layers(0)
    params = _params(layers, torch.zeros(2, requires_grad=True))
    stepper = OverlappedStep(torch.optim.AdamW(params[1:], lr=1e-2, fused=True), layers)  # host tensors only
    _set_grads(params, 1)
    stepper.step()
    for los in layers:
        for lo in los:
            assert lo.update.wait(10)  # nobody hangs
    with pytest.raises(RuntimeError, match="simulated"):
        stepper.finish()


def test_only_where_exact_and_useful():
    layers = _layers(0)
    params = _params(layers, torch.zeros(2, requires_grad=True))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert overlapped_step(torch.optim.AdamW(params, fused=True), layers, cpu) is None  # the forward is on the CPU
    assert overlapped_step(torch.optim.AdamW(params, fused=False), layers, cuda) is None
    assert overlapped_step(torch.optim.AdamW(params, fused=True, amsgrad=True), layers, cuda) is None
    assert overlapped_step(torch.optim.SGD(params, lr=0.1), layers, cuda) is None
    assert overlapped_step(torch.optim.AdamW(params, fused=True), [], cuda) is None
    assert isinstance(overlapped_step(torch.optim.AdamW(params, fused=True), layers, cuda), OverlappedStep)


def test_trainer_with_the_overlapped_step_is_exact_and_resumes(tmp_path, monkeypatch):
    """The trainer with the worker-thread step (forced on here: on a CPU model it is off) gives the plain step's
    losses and adapter bit for bit, and a run killed after a checkpoint it wrote resumes to the same adapter."""
    from hybridmoe import training as train_mod

    from .helpers import make_checkpoint, read_log, write_dataset
    from .test_resume_exact import _cfg, _kill_at_micro_step, _Killed, _same_run

    files = make_checkpoint("qwen3_moe", tmp_path / "m"), write_dataset(tmp_path / "d.jsonl", n=10)
    plain = tmp_path / "plain"
    hybridmoe_train(_cfg(files, plain, save_steps=0, gradient_accumulation_steps=2))
    made = []

    def forced(opt, layers, device):
        made.append(OverlappedStep(opt, layers))
        return made[-1]

    monkeypatch.setattr(train_mod, "overlapped_step", forced)
    over = tmp_path / "over"
    hybridmoe_train(_cfg(files, over, save_steps=0, gradient_accumulation_steps=2))
    assert made and made[0].layers  # it ran, over every expert layer
    assert max(r["grad_norm"] for r in read_log(over)) > 1.0  # the clip scaled: the worker applied its coefficient
    _same_run(over, plain)
    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        _kill_at_micro_step(m, 7)  # in step 4 (2 micro-steps a step), after checkpoint-3
        with pytest.raises(_Killed):
            hybridmoe_train(_cfg(files, killed, gradient_accumulation_steps=2))
    hybridmoe_train(_cfg(files, killed, gradient_accumulation_steps=2, resume_from_checkpoint=True))
    _same_run(killed, plain)


def hybridmoe_train(cfg: dict):
    import hybridmoe

    return hybridmoe.train(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_on_cuda_overlapped_against_plain(tmp_path, monkeypatch):
    """On a GPU the trainer takes the worker-thread step by default; against the plain step (same seed, gradient
    checkpointing, experts streamed): the same losses and adapter (GPU kernels may reorder sums run to run, so
    within 1e-5 relative rather than bit for bit)."""
    from safetensors.torch import load_file

    from hybridmoe import training as train_mod

    from .helpers import make_checkpoint, read_log, write_dataset
    from .test_resume_exact import _cfg

    files = make_checkpoint("deepseek_v2", tmp_path / "m"), write_dataset(tmp_path / "d.jsonl", n=10)
    kw = dict(save_steps=0, device="cuda", dtype="float32", gradient_checkpointing=True, stream_min_tokens=1,
              lora_dropout=0.0)
    made = []
    real = train_mod.overlapped_step
    monkeypatch.setattr(train_mod, "overlapped_step", lambda *a: made.append(real(*a)) or made[-1])
    hybridmoe_train(_cfg(files, tmp_path / "over", **kw))
    assert isinstance(made[0], OverlappedStep)
    monkeypatch.setattr(train_mod, "overlapped_step", lambda *a: None)
    hybridmoe_train(_cfg(files, tmp_path / "plain", **kw))
    over, plain = read_log(tmp_path / "over"), read_log(tmp_path / "plain")
    assert [r["loss"] for r in over] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    a = load_file(str(tmp_path / "over" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
