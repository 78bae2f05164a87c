"""Baseline: transformers with accelerate's CPU offload of the routed experts (`device_map`), what a user does when
the model does not fit on the GPU. Same random DeepSeek-V2-Lite-shaped checkpoint as benchmarks/v2lite.py.

    python benchmarks/v2lite.py make  --dir /tmp/v2lite        # once: the checkpoint
    python benchmarks/offload_baseline.py train --dir /tmp/v2lite --steps 10 --batch 2 --seq 256 --max-seconds 900
    python benchmarks/offload_baseline.py chat  --dir /tmp/v2lite --prompt-len 1024 --new-tokens 16

Every `model.layers.<i>.mlp.experts` (the fused routed experts, 3D gate_up_proj/down_proj) goes to "cpu", everything
else to GPU 0. accelerate keeps the offloaded weights in host RAM and its hooks copy each experts module's weights to
the GPU for every forward, then drop them.

`train`: PEFT LoRA r=8 alpha=16 on the targets of `v2lite.py train_baseline` (every nn.Linear but lm_head, plus the
experts' gate_up_proj/down_proj through target_parameters), gradient checkpointing, AdamW, the data of `v2lite.py
train` (bench_data.jsonl, written here when missing). If that fails (PEFT, accelerate hooks, OOM, ...) it prints the
error as a JSON line and then trains LoRA on the non-expert Linear layers only (experts frozen and offloaded).
`--targets all` / `--targets linear` runs just one of the two. `--max-seconds` bounds each phase (load included):
it stops after the step that crosses it and reports the steps done.
`chat`: the same offloaded model (no adapter), greedy prefill + decode with hybridmoe.generate (EOS disabled).

Each measurement prints one JSON line (v2lite's emit: machine, settings, tokens/s, peak GPU and host memory) with an
estimate of the expert-weight traffic: expert bytes x forwards / seconds (a train step is 2 forwards: the forward
and the gradient-checkpoint recompute).

Check without a GPU (DEV=cpu puts everything on the CPU, so transformers attaches no hooks; `--offload disk` sends
the experts to disk instead, which runs the same accelerate offload hooks):

    python benchmarks/v2lite.py make --dir /tmp/v2tiny --tiny
    python benchmarks/offload_baseline.py train --dir /tmp/v2tiny --steps 4 --batch 2 --seq 64 [--offload disk]
    python benchmarks/offload_baseline.py chat  --dir /tmp/v2tiny --prompt-len 32 --new-tokens 4 [--offload disk]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from v2lite import DEV, emit, peak_host_gib, write_bench_data  # noqa: E402

GPU = 0 if DEV == "cuda" else "cpu"
EXPERTS = "mlp.experts"  # transformers 5.17: one fused module per MoE layer, params gate_up_proj [E, 2I, H], down_proj [E, H, I]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
GIB = 2**30


# -- loading -----------------------------------------------------------------------------------------------------
def offload_device_map(path: str, offload: str) -> dict[str, int | str]:
    """{module or tensor name: device}: every `...mlp.experts` -> `offload`, the rest -> GPU 0, as coarse as the tree
    allows (a module with no experts inside goes whole). Built from the real module names of an empty model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    experts = {n for n, _ in meta.named_modules() if n.endswith(EXPERTS)}
    dm: dict[str, int | str] = {}

    def visit(prefix: str, module: torch.nn.Module) -> None:
        if prefix in experts:
            dm[prefix] = offload
        elif prefix and not any(e.startswith(prefix + ".") for e in experts):
            dm[prefix] = GPU
        else:  # holds experts somewhere below: split it
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child)
            own = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
            for name, _ in own:
                dm[f"{prefix}.{name}" if prefix else name] = GPU

    visit("", meta)
    assert experts and all(dm[e] == offload for e in experts), "no routed experts found"
    return dm


def placement(model: torch.nn.Module) -> dict:
    """Where the weights ended up: expert tensors offloaded (on meta, with an accelerate offload hook) vs elsewhere,
    and the devices of all other parameters. Checks that the device map's keys took effect."""
    offloaded = total = 0
    for name, m in model.named_modules():
        if name.endswith(EXPERTS):
            hook = getattr(m, "_hf_hook", None)
            for p in m.parameters(recurse=False):
                total += 1
                offloaded += p.device.type == "meta" and bool(getattr(hook, "offload", False))
    others = {str(p.device) for n, p in model.named_parameters() if f".{EXPERTS}." not in n}
    return {"expert_tensors": total, "expert_tensors_offloaded": offloaded, "other_param_devices": sorted(others)}


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of the routed experts' weights (meta tensors keep shape and dtype): what the hooks copy per forward."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{EXPERTS}." in n)


def load_offloaded(args) -> tuple[torch.nn.Module, dict]:
    """The bf16 model with the experts offloaded, and facts about the load for the JSON line."""
    from transformers import AutoModelForCausalLM

    dm = offload_device_map(args.dir, args.offload)
    t0 = time.perf_counter()
    folder = str(Path(args.dir) / "bench_offload") if args.offload == "disk" else None
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, device_map=dm, offload_folder=folder)
    info = {"load_s": round(time.perf_counter() - t0, 1), "device_map_entries": len(dm),
            "placement": placement(model), "expert_bytes_per_forward": expert_bytes(model)}
    where = info["placement"]
    if len(set(dm.values())) > 1:  # accelerate dispatched: the map must have taken effect exactly
        assert where["expert_tensors_offloaded"] == where["expert_tensors"], f"experts not all offloaded: {where}"
        assert where["other_param_devices"] == [str(torch.device(DEV, 0) if DEV == "cuda" else DEV)], where
    return model, info


# -- helpers -----------------------------------------------------------------------------------------------------
def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_gpu_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if DEV == "cuda" else 0.0


def free_memory() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]


def traffic_estimate(bytes_per_forward: int, forwards: int, seconds: float) -> dict:
    moved = bytes_per_forward * forwards / 1e9
    return {"est_expert_gb_moved": round(moved, 4), "est_expert_gb_s": round(moved / seconds, 4) if seconds > 0 else None,
            "est_note": "estimate: expert bytes x forwards / wall seconds (the hooks copy every expert each forward)"}


# -- train -------------------------------------------------------------------------------------------------------
def lora_wrap(model: torch.nn.Module, with_experts: bool) -> torch.nn.Module:
    """PEFT LoRA r=8 alpha=16 on every nn.Linear but lm_head (+ the experts' 3D params when `with_experts`)."""
    from peft import LoraConfig, get_peft_model

    from hybridmoe.adapters import no_peft_moe_rewrite

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"})
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=linear,
                     target_parameters=EXPERT_PARAMS if with_experts else None)
    with no_peft_moe_rewrite():
        return get_peft_model(model, cfg)


def train_steps(model, args, t_phase: float, state: dict) -> dict:
    """AdamW steps over bench_data.jsonl until --steps or --max-seconds (counted from `t_phase`)."""
    from hybridmoe.data import SFTDataset, batches, collate, load_records
    from hybridmoe.loading import load_tokenizer

    tok = load_tokenizer(args.dir)
    data = Path(args.dir) / "bench_data.jsonl"
    if not data.exists():
        write_bench_data(args.dir, args.seq)
    ds = SFTDataset(load_records(data), tok, args.seq)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_gpu_peak()
    times, tokens, losses, stopped = [], [], [], False
    for i, idx in enumerate(batches(ds, args.batch, 0, 0)[: args.steps]):
        state["stage"] = f"step {i}"
        b = {k: v.to(DEV) for k, v in collate([ds[j] for j in idx], tok.pad_token_id).items()}
        t = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        times.append(time.perf_counter() - t)
        tokens.append(int(b["attention_mask"].sum()))
        losses.append(round(loss.item(), 4))
        if time.perf_counter() - t_phase > args.max_seconds:
            stopped = True
            break
    warm = 2 if len(times) > 2 else 0  # two warm-up steps when there is anything after them
    secs = sum(times[warm:])
    return {"steps_done": len(times), "stopped_by_max_seconds": stopped,
            "warmup_steps_excluded": warm, "tokens_per_s": round(sum(tokens[warm:]) / secs, 1) if secs else None,
            "seconds_per_step": round(secs / len(times[warm:]), 2) if times else None,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "peak_gpu_gib": gpu_peak_gib(), "measured_steps": len(times[warm:]), "measured_s": secs}


def train_phase(args, with_experts: bool, state: dict) -> dict:
    """Load, wrap, train; the JSON fields of one phase."""
    t_phase = time.perf_counter()
    state["stage"] = "load"
    model, info = load_offloaded(args)
    state["stage"] = "peft"
    model = lora_wrap(model, with_experts)
    trainable = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in trainable)
    info["trainable_params_on_meta"] = sum(p.numel() for p in trainable if p.device.type == "meta")
    state["info"] = info  # kept for the error line if a step fails
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    res = train_steps(model, args, t_phase, state)
    forwards = 2 * res.pop("measured_steps")  # forward + gradient-checkpoint recompute
    traffic = traffic_estimate(info["expert_bytes_per_forward"], forwards, res.pop("measured_s"))
    return {**info, **res, **traffic}


def train(args) -> None:
    settings = {"dir": args.dir, "offload": args.offload, "steps": args.steps, "batch": args.batch, "seq": args.seq,
                "lora_r": 8, "lora_alpha": 16, "lr": 1e-4, "gradient_checkpointing": True,
                "max_seconds": args.max_seconds, "device": DEV}
    phases = {"all": [True], "linear": [False], "auto": [True, False]}[args.targets]
    for with_experts in phases:
        label = "all linear + routed experts (target_parameters)" if with_experts else "non-expert linear only"
        rec = {"bench": "train_accelerate_offload_experts", "lora_targets": label, **settings}
        state: dict = {}
        try:
            rec.update(train_phase(args, with_experts, state))
            failed = False
        except Exception as e:  # PEFT refusing, accelerate hooks, OOM, device mismatch: report and fall back
            rec.update({"error": one_line(e), "failed_at": state.get("stage"), **state.get("info", {})})
            if rec.get("trainable_params_on_meta"):
                rec["hint"] = "PEFT made some LoRA weights on the meta device (where the offloaded weight sits)"
            failed = True
        rec["peak_host_gib"] = round(peak_host_gib(), 2)  # process peak so far (ru_maxrss)
        emit(rec)
        free_memory()
        if not failed:
            break


# -- chat --------------------------------------------------------------------------------------------------------
def chat(args) -> None:
    """Greedy prefill of a random prompt and decode of --new-tokens with the offloaded model (no adapter)."""
    import hybridmoe.generation as gen
    from hybridmoe.generation import SamplingConfig, generate
    from hybridmoe.loading import load_tokenizer

    model, info = load_offloaded(args)
    tok = load_tokenizer(args.dir)
    gen.eos_token_ids = lambda *a: set()  # measure a fixed number of tokens
    g = torch.Generator().manual_seed(1)  # the prompt of v2lite.py chat
    prompt = torch.randint(2, model.config.vocab_size, (1, args.prompt_len), generator=g)[0].tolist()
    generate(model, tok, prompt[:8], SamplingConfig(temperature=0, max_new_tokens=1))  # warm-up: one forward
    reset_gpu_peak()
    res = generate(model, tok, prompt, SamplingConfig(temperature=0, max_new_tokens=args.new_tokens))
    nbytes = info["expert_bytes_per_forward"]
    emit({"bench": "chat_accelerate_offload_experts", "dir": args.dir, "offload": args.offload, "device": DEV,
          "prompt_tokens": res.prompt_tokens, "new_tokens": res.new_tokens, **info,
          "prefill_s": round(res.prefill_s, 2), "decode_s": round(res.decode_s, 2),
          "prefill_tok_s": round(res.prompt_tokens / res.prefill_s, 1),
          "decode_tok_s": round(res.decode_tokens_per_s, 3),
          "prefill_est_expert_gb_s": traffic_estimate(nbytes, 1, res.prefill_s)["est_expert_gb_s"],
          **traffic_estimate(nbytes, res.new_tokens - 1, res.decode_s),  # decode: one forward per token after the first
          "peak_gpu_gib": gpu_peak_gib(), "peak_host_gib": round(peak_host_gib(), 2)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["train", "chat"])
    p.add_argument("--dir", default="/tmp/v2lite")
    p.add_argument("--offload", choices=["cpu", "disk"], default="cpu", help="where the routed experts go")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--max-seconds", type=float, default=900, help="train: bound on each phase (load included)")
    p.add_argument("--targets", choices=["auto", "all", "linear"], default="auto",
                   help="train: auto = all targets incl. experts, then non-expert linear only if that fails")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"train": train, "chat": chat}[args.mode](args)


if __name__ == "__main__":
    main()
