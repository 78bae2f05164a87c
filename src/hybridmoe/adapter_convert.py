"""`hybridmoe adapter convert`: move a LoRA adapter between the three layouts MoE tools use (no model needed).

Layouts (the Linear LoRA of attention, dense MLPs and shared experts is plain PEFT in all three and is copied):

- ``peft``: PEFT ``target_parameters`` on fused experts (vanilla PEFT on transformers v5, and what hybridmoe saves):
  ``{experts}[.base_layer].lora_A.weight [E·r, in]`` expert-major, ``lora_B [out, r·E]`` rank-major; gate_up is
  the inner (``.base_layer``) wrapper when both projections carry LoRA; ranks other than ``r`` via ``rank_pattern``.
- ``per-expert``: ``{experts}.{e}.{gate,up,down}_proj.lora_{A,B}.weight`` (vLLM/SGLang MoE LoRA, PEFT on
  transformers v4), one ``r`` and ``lora_alpha`` for all.
- ``kt``: a KTransformers bundle (:mod:`hybridmoe.kt_bundle`): the PEFT part plus ``fused_expert_lora.safetensors``
  and ``kt_adapter_manifest.json``; one rank and alpha; bf16 (kt-kernel loads nothing else).

Every layout is read into one form: per experts module, a LoRA for each of gate, up and down (``Factor``: A
[E, r, in], B [E, out, r], alpha). A PEFT gate_up LoRA becomes gate = (A, B[:, :I]) and up = (A, B[:, I:]) (the
same ΔW rows); a block-diagonal one (what KT's separate gate/up become in hybridmoe, see kt_bundle) splits back into
its two blocks, so KT -> peft -> KT returns the same tensors. Writing gate_up from separate gate and up shares A when
both have the same A, else uses the rank-2r block layout.

A layout with one rank and alpha (per-expert, kt) takes LoRAs of a smaller rank zero-padded (exact), and one of a
different scale alpha/r with the ratio folded into B (exact up to one fp32 rounding; reported on stderr). kt's bf16
cast is exact for adapters that came from KT (bf16 values); any other is reported with its largest relative change.
Expert module paths: read as they are in the adapter; a KT bundle names only layers, and its experts are written
as ``model.layers.{L}.mlp.experts`` (the path of every architecture KTransformers trains, as in kt-kernel's SGLang
converter), or, with ``--model``, under the model's own experts module names; ``--model`` also checks the result
against the model the way the loader does.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import (
    _FUSED_KEY,
    _PER_EXPERT_KEY,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    _alpha_for,
    _pattern_value,
    _strip,
    nonfinite_tensors,
    read_adapter,
)
from .errors import AdapterError, ConfigError
from .kt_bundle import KT_KEY, KT_NAMES, MANIFEST, is_kt_bundle, layer_of, write_kt_bundle

LAYOUTS = ("peft", "per-expert", "kt")
PARTS = ("gate", "up", "down")
_PER_EXPERT_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_PART_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
KT_EXPERTS_PATH = "model.layers.{layer}.mlp.experts"


@dataclass
class Factor:
    """LoRA on one projection of every expert: ΔW[e] = (alpha / r) · B[e] @ A[e]."""

    A: torch.Tensor  # [E, r, in]
    B: torch.Tensor  # [E, out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class Adapter:
    cfg: dict  # the source adapter_config.json
    linear: dict[str, torch.Tensor]  # PEFT keys (base_model.model.….lora_A.weight) -> tensors of the Linear LoRA
    experts: dict[str, dict[str, Factor]] = field(default_factory=dict)  # experts module -> {gate, up, down}
    manifest: dict | None = None  # a KT source's manifest (its expert_weight_format is kept)


# -- reading -----------------------------------------------------------------------------------------------------
def read_any(adapter_dir: str | Path, kt_paths: dict[int, str] | None = None) -> Adapter:
    """Any of the three layouts (a KT bundle validated in full by read_adapter) into the common form. kt_paths:
    {layer: experts module} for a KT bundle's layers (default ``model.layers.{L}.mlp.experts``)."""
    cfg, sd = read_adapter(adapter_dir)
    bad = nonfinite_tensors(sd)
    if bad:
        raise AdapterError(f"adapter '{adapter_dir}' has {len(bad)} non-finite tensor(s), e.g. '{bad[0]}'; refusing to "
                           f"convert a diverged adapter; see `hybridmoe inspect {adapter_dir}`")
    kt: dict[int, dict[str, torch.Tensor]] = {}
    per: dict[str, dict[str, dict[int, dict[str, torch.Tensor]]]] = {}
    fused: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    linear: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if m := KT_KEY.match(key):
            kt.setdefault(int(m["layer"]), {})[m["name"]] = t
        elif m := _PER_EXPERT_KEY.match(_strip(key)):
            per.setdefault(m["mod"], {}).setdefault(_PER_EXPERT_PART[m["proj"]], {}).setdefault(int(m["e"]), {})[m["ab"]] = t
        elif m := _FUSED_KEY.match(_strip(key)):
            fused.setdefault(m["mod"], {}).setdefault(m["nest"], {})[m["ab"]] = t
        else:  # PEFT's own key form: prefixed, no adapter name (SGLang-style and ".default" keys load the same)
            linear[PEFT_PREFIX + re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", _strip(key))] = t
    out = Adapter(cfg, linear)
    if kt:
        from .kt_bundle import read_manifest

        out.manifest = read_manifest(Path(adapter_dir))
        for layer, t in kt.items():
            alpha = float(cfg["lora_alpha"])  # read_adapter checked it against the manifest
            if kt_paths is not None and layer not in kt_paths:
                raise AdapterError(f"'{adapter_dir}' has routed-expert LoRA for layer {layer}, but the model's MoE "
                                   f"layers are {sorted(kt_paths)}; is the adapter for another model?")
            path = kt_paths[layer] if kt_paths is not None else KT_EXPERTS_PATH.format(layer=layer)
            out.experts[path] = {
                p: Factor(t[f"{p}_lora_a"], t[f"{p}_lora_b"], alpha) for p in PARTS}
    if per:
        for mod, parts in per.items():
            out.experts[mod] = {p: _stack_per_expert(cfg, mod, p, es) for p, es in parts.items()}
    for mod, nests in fused.items():
        out.experts[mod] = _fused_parts(cfg, mod, nests)
    return out


def _stack_per_expert(cfg: dict, mod: str, part: str, experts: dict[int, dict[str, torch.Tensor]]) -> Factor:
    n = max(experts) + 1
    for e in range(n):
        if set(experts.get(e, {})) != {"A", "B"}:
            raise AdapterError(f"per-expert adapter lacks lora_A/lora_B of expert {e} {_PART_PROJ[part]} in '{mod}'")
        if experts[e]["A"].shape != experts[0]["A"].shape or experts[e]["B"].shape != experts[0]["B"].shape:
            raise AdapterError(f"per-expert adapter: expert {e} {_PART_PROJ[part]} in '{mod}' has lora_A "
                               f"{tuple(experts[e]['A'].shape)}, expert 0 {tuple(experts[0]['A'].shape)}; every expert "
                               "must have the same shapes (one rank)")
    a = torch.stack([experts[e]["A"] for e in range(n)])  # [E, r, in]
    b = torch.stack([experts[e]["B"] for e in range(n)])  # [E, out, r]
    return Factor(a, b, _alpha_for(cfg, f"{mod}.0.{_PART_PROJ[part]}"))


def _rank_for(cfg: dict, name: str) -> int:
    return int(_pattern_value(cfg, "rank_pattern", name, cfg.get("r", 8)))


def _fused_parts(cfg: dict, mod: str, nests: dict[str, dict[str, torch.Tensor]]) -> dict[str, Factor]:
    """PEFT target_parameters tensors of one experts module -> {gate, up, down}. Which projection a wrapper holds
    follows PEFT's nesting (gate_up inner when both are targeted) or, for one, the config's target_parameters."""
    targeted = [p for p in ("gate_up_proj", "down_proj")
                if any(f"{mod}.{p}".endswith(t) or t.endswith(f"{mod}.{p}") for t in cfg.get("target_parameters") or [])]
    if len(nests) == 2:
        projs = {".base_layer": "gate_up_proj", "": "down_proj"}
    elif len(nests) == 1 and len(targeted) == 1:
        projs = {next(iter(nests)): targeted[0]}
    else:
        raise AdapterError(f"cannot tell which expert projection the LoRA of '{mod}' adapts: adapter_config.json's "
                           f"target_parameters lists {targeted or 'none of them'}; re-save the adapter with PEFT")
    out = {}
    for nest, ab in nests.items():
        proj = projs.get(nest)
        if proj is None or set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter tensors of '{mod}{nest}' are not a lora_A/lora_B pair of a known projection")
        r = _rank_for(cfg, f"{mod}.{proj}")
        a, b = ab["A"], ab["B"]
        if a.shape[0] % r or b.shape[1] != a.shape[0]:
            raise AdapterError(f"'{mod}{nest}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not "
                               f"fit rank {r} (adapter_config.json r/rank_pattern); the adapter is damaged")
        e = a.shape[0] // r
        A = a.reshape(e, r, a.shape[1])  # [E, r, in]
        B = b.reshape(b.shape[0], r, e).permute(2, 0, 1).contiguous()  # [E, out, r]
        alpha = _alpha_for(cfg, f"{mod}.{proj}")
        if proj == "down_proj":
            out["down"] = Factor(A, B, alpha)
        else:
            out.update(_split_gate_up(A, B, alpha))
    return out


def _split_gate_up(A: torch.Tensor, B: torch.Tensor, alpha: float) -> dict[str, Factor]:
    """gate_up LoRA -> gate and up. A block-diagonal B (rank 2k, zero off-diagonal blocks: what a KT gate/up pair
    becomes) splits into two rank-k LoRAs with alpha/2 each (same scale; exact, the zero blocks add nothing); any
    other shares A between gate and up (B of a trained shared-A LoRA is never block-diagonal)."""
    i, r = B.shape[1] // 2, B.shape[2]
    if r % 2 == 0:
        k = r // 2
        if not B[:, :i, k:].any() and not B[:, i:, :k].any():
            return {"gate": Factor(A[:, :k].contiguous(), B[:, :i, :k].contiguous(), alpha / 2),
                    "up": Factor(A[:, k:].contiguous(), B[:, i:, k:].contiguous(), alpha / 2)}
    return {"gate": Factor(A, B[:, :i].contiguous(), alpha), "up": Factor(A, B[:, i:].contiguous(), alpha)}


# -- common rank and scale (per-expert, kt) -------------------------------------------------------------------------
@dataclass
class _Notes:
    folded: list[str] = field(default_factory=list)


def _uniform(factors: list[Factor], notes: _Notes) -> tuple[int, float]:
    """One rank (the largest) and alpha for all: smaller ranks are zero-padded (exact); a different scale is folded
    into B (one rounding), which the caller reports."""
    rank = max(f.rank for f in factors)
    scales = {f.scale for f in factors}
    scale = max(scales, key=lambda s: sum(f.scale == s for f in factors))  # the most common scale stays exact
    if len(scales) > 1:
        notes.folded.append(f"scales {sorted(scales)} -> {scale}")
    return rank, scale * rank


def _conform(f: Factor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = f.A, f.B
    if f.scale != scale:
        b = b * (f.scale / scale)
    if f.rank < rank:
        pad = rank - f.rank
        a = torch.cat([a, a.new_zeros(a.shape[0], pad, a.shape[2])], 1)
        b = torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], pad)], 2)
    return a, b


# -- writing -------------------------------------------------------------------------------------------------------
def _linear_ranks(linear: dict[str, torch.Tensor]) -> dict[str, int]:
    """{full module name: rank} of the Linear LoRA (explicit names: PEFT on v5 would rewrite leaf names, issue 3711)."""
    ranks = {}
    for k, t in linear.items():
        m = re.match(r"^(?P<mod>.+)\.lora_A(\.default)?\.weight$", _strip(k))
        if m:
            ranks[m["mod"]] = int(t.shape[0])
    return ranks


def _base_cfg(src: Adapter) -> dict:
    """The source config with explicit Linear targets; each Linear LoRA keeps its own rank and alpha (as patterns)
    whatever the new defaults become."""
    ranks = _linear_ranks(src.linear)
    cfg = {k: v for k, v in src.cfg.items() if k not in ("target_parameters", "rank_pattern", "alpha_pattern")}
    cfg["rank_pattern"] = dict(ranks)
    cfg["alpha_pattern"] = {m: _alpha_for(src.cfg, m) for m in ranks}
    cfg.update(peft_type="LORA", target_modules=sorted(ranks), target_parameters=None)
    return cfg


def _finish_patterns(cfg: dict) -> dict:
    """Drop pattern entries equal to the defaults (plain configs stay plain: SGLang/vLLM ignore patterns)."""
    cfg["rank_pattern"] = {k: v for k, v in cfg["rank_pattern"].items() if v != cfg.get("r")}
    cfg["alpha_pattern"] = {k: v for k, v in cfg["alpha_pattern"].items() if v != cfg.get("lora_alpha")}
    return cfg


def _to_peft(src: Adapter) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = dict(src.linear)
    cfg = _base_cfg(src)
    params = []
    for mod, parts in sorted(src.experts.items()):
        fused = {}
        if "gate" in parts or "up" in parts:
            fused["gate_up_proj"] = _join_gate_up(mod, parts)
        if "down" in parts:
            fused["down_proj"] = parts["down"]
        for proj, f in fused.items():
            nest = ".base_layer" if len(fused) == 2 and proj == "gate_up_proj" else ""
            e, r, in_f = f.A.shape
            sd[f"{PEFT_PREFIX}{mod}{nest}.lora_A.weight"] = f.A.reshape(e * r, in_f)  # [E·r, in] expert-major
            sd[f"{PEFT_PREFIX}{mod}{nest}.lora_B.weight"] = f.B.permute(1, 2, 0).reshape(f.B.shape[1], r * e)  # [out, r·E]
            params.append(f"{mod}.{proj}")
            cfg["rank_pattern"][f"{mod}.{proj}"] = r
            cfg["alpha_pattern"][f"{mod}.{proj}"] = f.alpha
    cfg["target_parameters"] = params or None
    return _finish_patterns(cfg), sd


def _filled(parts: dict[str, Factor]) -> dict[str, Factor]:
    """gate, up and down, a missing one as a zero LoRA (ΔW = 0, exact): gate/up share the other's A, so a joined
    gate_up keeps its rank; down gets the rank of the others."""
    out = dict(parts)
    for p, q in (("gate", "up"), ("up", "gate")):
        if p not in out and q in out:
            out[p] = Factor(out[q].A, torch.zeros_like(out[q].B), out[q].alpha)
    some = out.get("gate") or out.get("down")
    e, r = some.A.shape[0], some.rank
    if "gate" in out:
        h, i = out["gate"].A.shape[2], out["gate"].B.shape[1]
    else:
        h, i = out["down"].B.shape[1], out["down"].A.shape[2]
    z = some.A.new_zeros
    if "down" not in out:
        out["down"] = Factor(z(e, r, i), z(e, h, r), some.alpha)
    if "gate" not in out:
        out["gate"] = Factor(z(e, r, h), z(e, i, r), some.alpha)
        out["up"] = Factor(out["gate"].A, z(e, i, r), some.alpha)
    return out


def _join_gate_up(mod: str, parts: dict[str, Factor]) -> Factor:
    parts = _filled(parts)  # LoRA on gate_proj alone (per-expert adapters may have it): up gets a zero LoRA
    g, u = parts["gate"], parts["up"]
    if g.A.shape == u.A.shape and g.scale == u.scale and torch.equal(g.A, u.A):
        return Factor(g.A, torch.cat([g.B, u.B], 1), g.alpha)  # one shared A: rank r, exact
    if g.scale != u.scale:
        raise AdapterError(f"'{mod}': gate_proj and up_proj LoRA have different scales ({g.scale} vs {u.scale}); "
                           "hybridmoe cannot express that as one gate_up_proj LoRA")
    a = torch.cat([g.A, u.A], 1)  # [E, rg+ru, H]
    b = g.B.new_zeros(g.B.shape[0], g.B.shape[1] + u.B.shape[1], g.rank + u.rank)  # block-diagonal [E, 2I, rg+ru]
    b[:, : g.B.shape[1], : g.rank] = g.B
    b[:, g.B.shape[1]:, g.rank:] = u.B
    return Factor(a, b, g.scale * (g.rank + u.rank))


def _to_per_expert(src: Adapter, notes: _Notes) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = dict(src.linear)
    factors = [f for parts in src.experts.values() for f in parts.values()]
    cfg = _base_cfg(src)
    if factors:
        rank, alpha = _uniform(factors, notes)
        cfg.update(r=rank, lora_alpha=alpha)
    for mod, parts in sorted(src.experts.items()):
        for part, f in parts.items():
            a, b = _conform(f, cfg["r"], cfg["lora_alpha"] / cfg["r"])
            for e in range(a.shape[0]):
                p = f"{PEFT_PREFIX}{mod}.{e}.{_PART_PROJ[part]}"
                sd[f"{p}.lora_A.weight"] = a[e].contiguous()  # [r, in]
                sd[f"{p}.lora_B.weight"] = b[e].contiguous()  # [out, r]
    if factors:  # leaf names, as PEFT on transformers v4 and SGLang's converter write them
        cfg["target_modules"] = sorted(set(cfg["target_modules"]) | {"gate_proj", "up_proj", "down_proj"})
    return _finish_patterns(cfg), sd


def _to_kt(src: Adapter, notes: _Notes) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    factors = [f for parts in src.experts.values() for f in parts.values()]
    if not factors:
        raise AdapterError("the adapter has no routed-expert LoRA; a KTransformers bundle would be its PEFT part "
                           "alone: use the adapter as it is")
    rank, alpha = _uniform([f for parts in src.experts.values() for f in _filled(parts).values()], notes)
    fused: dict[str, torch.Tensor] = {}
    for mod, parts in sorted(src.experts.items()):
        layer = layer_of(mod)
        if layer is None:
            raise AdapterError(f"'{mod}' has no layer number (…layers.{{L}}…); a KTransformers bundle names experts by "
                               "layer")
        for part, f in _filled(parts).items():  # KT always has all six tensors: a projection without LoRA gets zeros
            a, b = _conform(f, rank, alpha / rank)
            fused[f"layers.{layer}.experts.{part}_lora_a"] = a
            fused[f"layers.{layer}.experts.{part}_lora_b"] = b
    assert {k.rsplit(".", 1)[1] for k in fused} == set(KT_NAMES)
    fused = {k: _to_bf16(k, v, notes) for k, v in fused.items()}
    cfg = _base_cfg(src)
    cfg.update(r=rank, lora_alpha=alpha)
    return _finish_patterns(cfg), dict(src.linear), fused


def _to_bf16(key: str, t: torch.Tensor, notes: _Notes) -> torch.Tensor:
    out = t.to(torch.bfloat16)
    if not torch.equal(out.to(t.dtype), t):
        err = ((out.float() - t.float()).abs().max() / t.float().abs().max().clamp_min(1e-30)).item()
        notes.folded.append(f"bf16 rounding of {key} (largest change {err:.1e} of its max)")
    return out


def _model_experts(model_dir: str | Path):
    """The model on the meta device (names and shapes, no weights) and {layer: experts module name}."""
    from .experts import HybridExperts
    from .export import _meta_model

    meta = _meta_model(Path(model_dir).expanduser())
    paths = {layer_of(n): n for n, m in meta.named_modules() if isinstance(m, HybridExperts) and layer_of(n) is not None}
    return meta, paths


def _check_fits(meta, cfg: dict, sd: dict[str, torch.Tensor]) -> None:
    """The converted adapter passes the loader's own checks against the model (what chat/serve/export would do)."""
    from .adapters import _check_linear, split_adapter

    linear, _ = split_adapter(meta, cfg, sd)
    _check_linear(meta, linear)


def convert(adapter_dir: str | Path, to: str, output: str | Path, force: bool = False,
            model: str | Path | None = None) -> Path:
    """Read ``adapter_dir`` in any layout and write it in layout ``to`` to ``output`` (a new directory, made
    atomically). Returns the output path; approximations, if any, are reported on stderr. ``model`` (a checkpoint
    directory, optional): a KT bundle's layers take the model's experts module names, and the result is checked
    against the model before anything is written."""
    from safetensors.torch import save_file

    from .io import atomic_replace_dir

    if to not in LAYOUTS:
        raise ConfigError(f"--to {to!r} is not a layout; use one of {', '.join(LAYOUTS)}")
    src_dir, out = Path(adapter_dir).expanduser(), Path(output).expanduser()
    same = out.exists() and out.resolve() == src_dir.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and (not force or same):
        raise ConfigError(f"--output '{out}' exists and is not empty; pass a new directory"
                          + ("" if same else " (or --force to replace it)"))
    meta, kt_paths = _model_experts(model) if model is not None else (None, None)
    src = read_any(src_dir, kt_paths)
    notes = _Notes()
    fused = None
    if to == "peft":
        cfg, sd = _to_peft(src)
    elif to == "per-expert":
        cfg, sd = _to_per_expert(src, notes)
    else:
        cfg, sd, fused = _to_kt(src, notes)
    if meta is not None:
        _check_fits(meta, cfg, {**sd, **(fused or {})})
    manifest = src.manifest or {}

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if fused is not None:  # after the PEFT part, whose hashes the manifest records
            write_kt_bundle(tmp, fused, int(cfg["r"]), float(cfg["lora_alpha"]), cfg.get("base_model_name_or_path"),
                            manifest.get("expert_weight_format", "bf16"))

    atomic_replace_dir(out, write)
    for note in notes.folded:
        print(f"hybridmoe: note: not bit-exact: {note}", file=sys.stderr)
    return out


def layout_of(adapter_dir: str | Path) -> str:
    """'kt', 'per-expert' or 'peft', from the files and key names (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    d = Path(adapter_dir)
    if is_kt_bundle(d):
        return "kt"
    try:
        with safe_open(str(d / ADAPTER_WEIGHTS), framework="pt") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError):  # the loader reports an unreadable file with its own message
        return "peft"
    return "per-expert" if any(_PER_EXPERT_KEY.match(_strip(k)) for k in keys) else "peft"


__all__ = ["LAYOUTS", "MANIFEST", "Adapter", "Factor", "convert", "layout_of", "read_any"]
