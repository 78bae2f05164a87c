"""The placement report behind ``hybridmoe info``: what lives where, and the invariants that must hold.

The checks are the seed system's bugs turned into assertions:
- bug 1 (emptied expert tensors): no zero-size tensor anywhere, and every expert home is full-size;
- bug 2 (LoRA wrapping CPU experts on GPU inputs): nothing expert-shaped in the module tree, no PEFT layer around
  an experts block, every Parameter and buffer on the compute device;
- bug 4 (dense layer-0 MLP left on the CPU): every dense MLP is on the compute device.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .adapters import base_model_of, linear_component, moe_blocks_of
from .experts import HybridExperts
from .experts.streaming import model_streamer
from .host_embedding import HostEmbedding


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _top_module(name: str) -> str:
    """Group names for the report: 'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.self_attn'."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[i : i + 3])
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def placement_report(model: nn.Module) -> dict:
    base = base_model_of(model)
    meta = base.hybridmoe
    compute = torch.device(meta.device)
    devices: dict[str, dict] = defaultdict(lambda: {"bytes": 0, "tensors": 0, "modules": defaultdict(int)})
    empty, off_device = [], []
    expert_shapes = set()
    experts = {n: m for n, m in base.named_modules() if isinstance(m, HybridExperts)}
    for name, m in experts.items():
        w = m.weights
        for proj in ("gate_up_proj", "down_proj"):
            t = w.tensor(proj)
            expert_shapes.add(tuple(t.shape))
            d = devices["cpu (routed experts)"]
            d["bytes"] += _nbytes(t)
            d["tensors"] += 1
            d["modules"][name] += _nbytes(t)
            if t.numel() == 0:
                empty.append(f"{name}.{proj}")
        for proj, lo in m.lora.items():
            d = devices["cpu (routed-expert LoRA, fp32)"]
            for t in lo.parameters():
                d["bytes"] += _nbytes(t)
                d["tensors"] += 1
                d["modules"][f"{name}.{proj}"] += _nbytes(t)

    for name, m in base.named_modules():
        if isinstance(m, HostEmbedding):  # frozen table kept in CPU RAM on purpose (host_embedding.py)
            d = devices["cpu (input embeddings)"]
            d["bytes"] += _nbytes(m.table)
            d["tensors"] += 1
            d["modules"][name] += _nbytes(m.table)

    expert_shaped = []
    tensors = list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers())
    for name, t in tensors:
        dev = "meta" if t.is_meta else str(t.device)
        d = devices[dev]
        d["bytes"] += _nbytes(t)
        d["tensors"] += 1
        d["modules"][_top_module(name)] += _nbytes(t)
        if t.numel() == 0:
            empty.append(name)
        if t.device.type != compute.type or t.is_meta:
            off_device.append(f"{name} on {dev}")
        if t.dim() == 3 and tuple(t.shape) in expert_shapes:
            expert_shaped.append(name)

    moe_blocks = moe_blocks_of(base)
    dense_mlps, lora_targets = [], defaultdict(int)
    for name, mod in base.named_modules():
        if isinstance(mod, nn.Linear) and linear_component(base, name, mod, moe_blocks) == "dense_mlp":
            dense_mlps.append(name)
        if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict) and len(mod.lora_A):
            lora_targets[linear_component(base, name, mod.get_base_layer(), moe_blocks)] += 1
    n_expert_lora = sum(len(m.lora) for m in experts.values())
    if n_expert_lora:
        lora_targets["routed_experts"] = n_expert_lora
    wrapped = [n for n, mod in base.named_modules() if isinstance(getattr(mod, "base_layer", None), HybridExperts)]
    dense_bad = [n for n in dense_mlps if base.get_submodule(n).weight.device.type != compute.type]

    checks = {
        "nothing expert-shaped in the module tree": not expert_shaped,
        "no PEFT layer wraps routed experts": not wrapped,
        "every dense MLP on the compute device": not dense_bad,
        "every non-expert tensor on the compute device": not off_device,
        "no empty or meta tensors": not empty and "meta" not in devices,
        "every MoE layer's experts in CPU RAM": all(m.weights.gate_up.device.type == "cpu" for m in experts.values()),
    }
    problems = expert_shaped + wrapped + dense_bad + off_device + empty
    streamer = model_streamer(base)
    streaming = None
    if streamer is not None:
        share = _cpu_share_report(experts.values(), streamer.device)
        streaming = {
            "device": str(streamer.device), "min_tokens": streamer.min_tokens, "slots": streamer.num_slots,
            "slot_bytes_reserved": streamer.planned_slot_bytes(),  # allocated on the first streamed batch
            # in inference (prompts) the slots hold only the experts the GPU computes
            "slot_bytes_inference": streamer.planned_slot_bytes(share["cpu_experts"]),
            "resident_layers": streamer.resident,  # the first N MoE layers: on the device for every batch
            "resident_bytes": sum(streamer.layers[i].nbytes for i in range(streamer.resident)),
            **share,
        }
    return {
        "checkpoint": meta.checkpoint,
        "compute_device": str(compute),
        "dtype": str(meta.dtype).replace("torch.", ""),
        "expert_dtype": meta.expert_format,
        "checkpoint_format": getattr(meta, "source_format", "float"),
        "moe_layers": list(experts),
        "dense_mlp_layers": sorted({n.rpartition(".")[0] for n in dense_mlps}),
        "devices": {
            dev: {"bytes": d["bytes"], "tensors": d["tensors"], "modules": dict(d["modules"])} for dev, d in devices.items()
        },
        "lora_targets": dict(lora_targets),
        "streaming": streaming,
        "cpu_kernel": _cpu_kernel_report(experts.values()),
        "decode_norms": _decode_norm_report(base, compute, meta.dtype, experts.values()),
        "graph_gates": _graph_gate_report(compute, experts.values()),
        "decode_gpu_share": _decode_share_report(compute, experts.values(),
                                                 getattr(base.config, "num_experts_per_tok", None)),
        "checks": checks,
        "problems": problems[:20],
        "ok": all(checks.values()),
    }


def _cpu_kernel_report(experts) -> dict:
    """Whether the compiled CPU kernel runs these experts' inference calls (small batches), and with what."""
    from .experts import cpu_kernel
    from .experts.backends import choose_backend

    runs = bool(experts) and all(choose_backend(m, 1, grad=False, stream=False) == "kernel" for m in experts)
    status = cpu_kernel.status()
    if status == "ready" and experts and not runs:
        if not all(m.settings.cpu_kernel for m in experts):
            status = "disabled (settings.cpu_kernel = False)"
        else:
            m = next(iter(experts))
            status = f"it implements SiLU-GLU experts without biases; these are {m.mlp.name}" + (
                " with biases" if m.weights.bias is not None else "")
    four_bit = any(m.weights.packed is not None for m in experts)
    return {"status": status, "isa": cpu_kernel.isa(), "used": runs, "max_tokens": cpu_kernel.MAX_TOKENS,
            "four_bit_dots": cpu_kernel.four_bit_dots() if four_bit else None}


def _decode_norm_report(base: nn.Module, device: torch.device, dtype: torch.dtype, experts) -> dict:
    """How many of the model's RMSNorms graph decode runs as one fused kernel each (hybridmoe.decode_norm), or why
    none."""
    from . import decode_norm

    norms = sum("RMSNorm" in type(m).__name__ for m in base.modules())
    why = decode_norm.unavailable(device)
    if why is None and any(m.settings.compile_decode for m in experts):
        why = "compile_decode: inductor fuses them"
    fused = 0 if why is not None else len(decode_norm.fused_norm_pairs(base, dtype))
    return {"norms": norms, "fused": fused, "why": why}


def _graph_gate_report(device: torch.device, experts) -> dict:
    """Whether batch-1 graph decode launches each graph ahead, at a gate the CPU's experts open
    (hybridmoe.graph_gate), or why not."""
    from . import graph_gate, mapped_share

    why = graph_gate.unavailable(device)
    m = next(iter(experts), None)
    share, mapped = mapped_share.decode_share(m, device) if m is not None else (0.0, False)
    if why is None and share > 0 and not mapped:
        why = "a GPU share of the experts is copied in after each cut (gpu_share > 0)"
    return {"used": why is None and m is not None, "why": why}


def _decode_share_report(device: torch.device, experts, top_k: int | None) -> dict:
    """The share of each batch-1 decode step's picked experts the GPU computes (hybridmoe.mapped_share.decode_share):
    how many of the top-K, and how their weights reach it ("mapped": read from host memory inside the graphs;
    "copied": DMA queued by the host), or why the 4-bit ones are not mapped."""
    from . import mapped_share

    m = next(iter(experts), None)
    if m is None:
        return {"share": 0.0, "top_k": top_k, "experts": 0, "how": None, "why_not_mapped": None}
    share, mapped = mapped_share.decode_share(m, device)
    k = top_k if isinstance(top_k, int) else None
    why = mapped_share.unavailable(m.weights, device) if m.weights.packed is not None else None
    return {"share": share, "top_k": k, "experts": None if k is None else min(k, round(k * share)),
            "how": None if share <= 0 else "mapped" if mapped else "copied", "why_not_mapped": why}


def _cpu_share_report(experts, device) -> dict:
    """How many of each layer's experts the CPU computes in a streamed inference call (hybridmoe.experts.split), in
    which math (split.CPU_MATH), and whether bf16 GEMMs run on AMX tiles here."""
    from .experts import amx, split
    from .experts.backends import format_key

    m = next(iter(experts), None)
    if m is None:
        return {"cpu_experts": 0, "num_experts": 0, "cpu_math": None, "amx": amx.status()}
    return {"cpu_experts": m.settings.prefill_cpu_experts(m.weights.fmt, m.num_experts, torch.device(device)),
            "num_experts": m.num_experts, "cpu_math": split.CPU_MATH.get(format_key(m.weights.fmt), "loop"),
            "amx": amx.status()}


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def format_report(rep: dict) -> str:
    lines = [f"checkpoint: {rep['checkpoint']} (weights: {rep.get('checkpoint_format', 'float')})",
             f"compute device: {rep['compute_device']} ({rep['dtype']}), routed experts: cpu ({rep['expert_dtype']})",
             f"MoE layers ({len(rep['moe_layers'])}): {', '.join(rep['moe_layers'][:4])}"
             + (" ..." if len(rep["moe_layers"]) > 4 else ""),
             f"dense MLP layers: {', '.join(rep['dense_mlp_layers']) or 'none'}", "", "placement:"]
    for dev, d in rep["devices"].items():
        lines.append(f"  {dev:<34} {_gib(d['bytes']):>12}  {d['tensors']} tensors")
        top = sorted(d["modules"].items(), key=lambda kv: -kv[1])[:6]
        for mod, b in top:
            lines.append(f"      {mod:<40} {_gib(b):>12}")
        if len(d["modules"]) > 6:
            lines.append(f"      ... {len(d['modules']) - 6} more")
    st = rep.get("streaming")
    lines += ["", "routed experts computed: on the CPU for every batch" if st is None else
              f"routed experts computed: on the CPU below {st['min_tokens']} tokens, else on {st['device']} with "
              f"{st['slots']} layers of weights streamed in ({_gib(st['slot_bytes_reserved'])} of GPU memory)"]
    if st is not None and st.get("cpu_experts"):
        how = {"kernel": "the compiled kernel", "loop": "torch's GEMMs in the stored format",
               "bf16": "bf16 GEMMs on " + ("AMX tiles" if st["amx"] == "ready" else f"torch (AMX: {st['amx']})")}
        lines.append(f"  meanwhile the CPU computes {st['cpu_experts']} of each layer's {st['num_experts']} experts "
                     f"next to their weights ({how.get(st['cpu_math'], st['cpu_math'])}); in prompts the slots then "
                     f"hold the others: {_gib(st['slot_bytes_inference'])}")
    if st is not None and st["resident_layers"]:
        lines.append(f"  the first {st['resident_layers']} MoE layers' experts stay on {st['device']} and run there for "
                     f"every batch ({_gib(st['resident_bytes'])} of GPU memory)")
    k = rep["cpu_kernel"]
    if k["used"]:
        dots = f" (4-bit integer dots: {k['four_bit_dots']})" if k.get("four_bit_dots") else ""
        lines.append(f"CPU expert kernel: {k['isa']}{dots}, for inference calls of up to {k['max_tokens']} tokens "
                     "(training and larger calls: torch)")
    else:
        lines.append(f"CPU expert kernel: not used ({k['status']}); the CPU experts run through torch")
    n = rep["decode_norms"]
    if n["norms"]:
        lines.append(f"decode norms: {n['fused']} of {n['norms']} RMSNorms one fused kernel each" if n["why"] is None
                     else f"decode norms: the modules' own ({n['why']})")
    g = rep["graph_gates"]
    if g["used"]:
        lines.append("decode graph gates: on (each graph launched ahead, waiting on the GPU for the CPU's experts)")
    elif g["why"] is not None:
        lines.append(f"decode graph gates: off ({g['why']})")
    s = rep["decode_gpu_share"]
    if s.get("how") is not None:
        of = f"{s['experts']} of the top {s['top_k']}" if s.get("top_k") else f"a share of {s['share']:.2f}"
        how = ("read from host memory by the GPU inside the graphs" if s["how"] == "mapped"
               else "copied to the GPU after each cut")
        lines.append(f"decode GPU share: {of} experts a token, {how}")
    elif s.get("why_not_mapped"):
        lines.append(f"decode GPU share: none (4-bit experts are shared only when the GPU reads them from host "
                     f"memory: {s['why_not_mapped']})")
    if rep["lora_targets"]:
        lines += ["", "LoRA targets applied: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["lora_targets"].items()))]
    lines += ["", "checks:"]
    lines += [f"  [{'ok' if v else 'FAIL'}] {k}" for k, v in rep["checks"].items()]
    if rep["problems"]:
        lines += ["problems:"] + [f"  {p}" for p in rep["problems"]]
    return "\n".join(lines)
