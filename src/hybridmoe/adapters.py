"""LoRA on a hybrid model, and adapters in plain PEFT format.

Two halves, one adapter:
- attention, dense MLPs and shared experts get PEFT ``target_modules`` Linear LoRA on the compute device;
- routed experts get :class:`~hybridmoe.experts.ExpertLoRA` inside the CPU experts, serialised in PEFT's
  ``target_parameters`` layout for fused experts (``lora_A [E·r, in]`` expert-major, ``lora_B [out, E·r]``
  rank-major). When both expert projections carry LoRA, PEFT nests its wrappers in parameter-registration order,
  so ``gate_up_proj`` is saved under ``experts.base_layer.lora_*`` and ``down_proj`` under ``experts.lora_*``.

Adapters in the per-expert layout (``experts.{e}.gate_proj.lora_A.weight``, from PEFT on transformers v4 or from
KTransformers) are converted on load: gate and up fuse into one LoRA of rank 2r with block-diagonal B and alpha 2α,
which is the same ΔW.

PEFT ≤ 0.21 rewrites ``gate_proj/up_proj/down_proj`` targets of transformers-v5 MoE models into expert parameters
and drops the dense and shared-expert LoRA (peft issue 3711). :func:`no_peft_moe_rewrite` switches that rewrite off
while PEFT injects our layers; we always pass explicit module names, so there is nothing to rewrite.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterError, ConfigError, NonFiniteError
from .experts import HybridExperts
from .experts.cpu_experts import PROJECTIONS
from .kt_bundle import FUSED_FILE, KT_KEY, is_kt_bundle, kt_to_gate_up, layer_of, read_kt_bundle

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@contextlib.contextmanager
def no_peft_moe_rewrite():
    """Disable PEFT's transformers-v5 MoE target rewrite (peft issue 3711) for the duration of the block."""
    import peft.utils.transformers_weight_conversion as conv

    saved = conv.convert_peft_config_for_transformers
    conv.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers = saved


@contextlib.contextmanager
def no_peft_key_conversion():
    """Disable PEFT's transformers-v5 key conversion of adapter state dicts for the duration of the block.

    Our keys are already model names (split_adapter mapped them with checkpoint.KeyMapper), and PEFT 0.21 would
    rename them again with transformers' unescaped regexes: Laguna's `mlp.shared_expert.` turns
    `shared_experts.down_proj` into `shared_experts..down_proj`, and that LoRA would be lost."""
    import peft.utils.transformers_weight_conversion as conv

    saved = conv.convert_peft_adapter_state_dict_for_transformers
    conv.convert_peft_adapter_state_dict_for_transformers = lambda model, peft_config, adapter_state_dict, **kw: (
        adapter_state_dict)
    try:
        yield
    finally:
        conv.convert_peft_adapter_state_dict_for_transformers = saved


# -- choosing targets --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraTargets:
    linear: list[str]  # full module names of nn.Linear layers on the compute device
    experts: list[str]  # expert projections ("gate_up_proj", "down_proj") on every HybridExperts


def moe_blocks_of(model: nn.Module) -> dict[str, int]:
    """{name: number of routed experts} of the modules that directly contain a HybridExperts child (the MoE blocks)."""
    return {n.rpartition(".")[0]: m.spec.num_experts for n, m in model.named_modules() if isinstance(m, HybridExperts)}


def linear_component(model: nn.Module, name: str, module: nn.Linear, moe_blocks: dict[str, int]) -> str:
    """Component of a Linear by structure: inside attention, inside an MoE block (shared expert or a gate), dense."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if parent in moe_blocks:
            # A Linear in the MoE block with one output per expert is its router (Phi-MoE's and Llama 4's routers
            # are nn.Linear subclasses, Jamba's, AFMoE's and HunYuan's plain Linears); a 1-wide one gates the shared
            # expert (Qwen2-MoE's shared_expert_gate). Neither is an expert.
            return "router" if module.out_features in (1, moe_blocks[parent]) else "shared_experts"
        kind = type(model.get_submodule(parent)).__name__
        if "Attention" in kind:
            return "self_attn"
        if "Mamba" in kind:  # a state-space mixer's projections: PEFT refuses LoRA on them (in_proj/out_proj/conv1d)
            return "other"
    if name.endswith("lm_head") or ".layers." not in f".{name}":
        return "other"
    return "dense_mlp"


def resolve_targets(model: nn.Module, lora_target: str | list[str]) -> LoraTargets:
    """`all` = attention + dense MLP + shared experts + routed experts; else leaf names, `experts` = routed experts."""
    moe_blocks = moe_blocks_of(model)
    # Plain Linears only: a subclass with its own forward (DeepSeek-V4's grouped o_a_proj, Llama-4's router) does not
    # compute x W^T, so a Linear LoRA on it would be wrong (PEFT's is a shape error at best).
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward}
    comp = {n: linear_component(model, n, m, moe_blocks) for n, m in linears.items()}
    if isinstance(lora_target, str):
        wanted = [t.strip() for t in lora_target.split(",") if t.strip()]
    else:
        wanted = list(lora_target)
    if wanted == ["all"]:
        linear = [n for n, c in comp.items() if c in ("self_attn", "dense_mlp", "shared_experts")]
        return LoraTargets(sorted(linear), list(PROJECTIONS))
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n, c in comp.items() if c != "other"})
    expert_projs = list(PROJECTIONS) if "experts" in wanted else []
    for t in wanted:
        if t in PROJECTIONS:
            expert_projs.append(t)
        elif t != "experts" and t not in leaf_names:
            raise ConfigError(
                f"lora_target '{t}' matches no Linear layer of this model; use 'all' or a comma list of: "
                f"{', '.join(leaf_names + ['experts'])}"
            )
    linear = [n for n in linears if n.rsplit(".", 1)[-1] in wanted and comp[n] != "other"]
    return LoraTargets(sorted(linear), sorted(set(expert_projs), key=PROJECTIONS.index))


# -- applying fresh LoRA -------------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, lora_target, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0):
    """Add fresh trainable LoRA on both devices. Returns the PeftModel, or `model` itself when only routed experts
    are targeted (their LoRA lives inside the CPU experts and needs no PEFT wrapper)."""
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise ConfigError(f"lora_rank must be a positive integer, got {rank}")
    targets = resolve_targets(model, lora_target)
    if not targets.linear and not targets.experts:
        raise ConfigError(f"lora_target '{lora_target}' selects nothing to train")
    torch.manual_seed(seed)  # PEFT's lora_A init draws from the global generator
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets.linear,
                     target_parameters=None, bias="none")
    model.hybridmoe.lora_config = cfg
    peft_model = model
    if targets.linear:  # an experts-only adapter needs no PEFT wrapper on the compute device
        with no_peft_moe_rewrite():
            peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, HybridExperts):
            for proj in targets.experts:
                lo = m.add_lora(proj, rank, alpha)
                lo.reset_parameters(gen)
                lo.requires_grad_(True)
    return peft_model


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel wrapper (or the model itself when only experts carry LoRA)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# -- the PEFT layout of one expert projection ----------------------------------------------------------------------
def to_peft_layout(spec, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our factors A [E, r, in], B [E, out, r] (ΔW[e] = B[e] A[e] on the [out, in] weight) -> PEFT's target_parameters
    tensors (lora_A [E·r, in'] expert-major, lora_B [out', r·E] rank-major) for the stored parameter.

    PEFT factors the parameter as it sees it: normally the same (in, out) roles; where the block stores [E, in, out]
    without telling PEFT (`spec.peft_transposed` != `spec.transposed`, Llama-4) PEFT's ΔW is our ΔW^T, so its A and B
    are our B^T and A^T. Works on gradients as well as weights."""
    if spec.transposed != spec.peft_transposed:
        A, B = B.transpose(1, 2), A.transpose(1, 2)
    e, r, in_f = A.shape
    return A.reshape(e * r, in_f), B.permute(1, 2, 0).reshape(-1, r * e)


def from_peft_layout(spec, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`to_peft_layout`: PEFT's lora_A [E·r, in'], lora_B [out', r·E] -> A [E, r, in],
    B [E, out, r] in fp32."""
    e = spec.num_experts
    r = a.shape[0] // e
    A = a.float().reshape(e, r, a.shape[1])
    B = b.float().reshape(b.shape[0], r, e).permute(2, 0, 1)
    if spec.transposed != spec.peft_transposed:
        A, B = B.transpose(1, 2), A.transpose(1, 2)
    return A.contiguous(), B.contiguous()


def peft_in_out(spec, proj: str) -> tuple[int, int]:
    """(in, out) of a projection as PEFT's lora_A/lora_B see it (see :func:`to_peft_layout`)."""
    _, out_f, in_f = spec.shape(proj)
    return (out_f, in_f) if spec.transposed != spec.peft_transposed else (in_f, out_f)


# -- saving --------------------------------------------------------------------------------------------------------
def expert_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Routed-expert LoRA in PEFT's target_parameters layout, keyed as vanilla PEFT saves them."""
    base = base_model_of(model)
    out = {}
    for name, m in base.named_modules():
        if not isinstance(m, HybridExperts):
            continue
        nested = len(m.lora) > 1
        for proj, lo in m.lora.items():
            prefix = PEFT_PREFIX + name + (".base_layer" if nested and proj == PROJECTIONS[0] else "")
            a, b = to_peft_layout(m.spec, lo.A.detach(), lo.B.detach())
            out[f"{prefix}.lora_A.weight"] = a.clone()  # [E·r, in], expert-major
            out[f"{prefix}.lora_B.weight"] = b.clone()  # [out, r·E], rank-major
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter (both devices) on the CPU in fp32, with PEFT's key names."""
    from peft import get_peft_model_state_dict

    sd = {}
    if hasattr(model, "peft_config"):
        sd = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    sd.update(expert_adapter_tensors(model))
    return sd


def adapter_config_dict(model: nn.Module, base_model_name: str | None = None) -> dict:
    base = base_model_of(model)
    cfg = base.hybridmoe.lora_config
    d = cfg.to_dict()
    expert_params = []
    d["rank_pattern"], d["alpha_pattern"] = dict(d.get("rank_pattern") or {}), dict(d.get("alpha_pattern") or {})
    for name, m in base.named_modules():
        if isinstance(m, HybridExperts):
            for proj, lo in m.lora.items():
                param = f"{name}.{m.spec.param_name(proj)}"  # "up_proj" for non-gated experts
                expert_params.append(param)
                if lo.rank != cfg.r or lo.alpha != cfg.lora_alpha:  # e.g. a fused per-expert adapter: rank 2r
                    d["rank_pattern"][param] = lo.rank
                    d["alpha_pattern"][param] = lo.alpha
    d["target_modules"] = sorted(cfg.target_modules or [])
    d["target_parameters"] = sorted(expert_params) or None
    d["base_model_name_or_path"] = base_model_name
    d["inference_mode"] = True
    for k, v in list(d.items()):
        if isinstance(v, set):
            d[k] = sorted(v)
    d["peft_type"] = "LORA"
    return d


def nonfinite_tensors(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if not torch.isfinite(v).all()]


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name: str | None = None,
                 write_extra: Callable[[Path], None] | None = None) -> Path:
    """Validate (finite) and write the adapter atomically: files are made in a temp dir and moved over `out_dir`'s,
    weights first and adapter_config.json last. `write_extra(tmp)` may add files (tokenizer, training config)."""
    from safetensors.torch import save_file

    from .io import atomic_write_dir

    sd = adapter_state_dict(model)
    bad = nonfinite_tensors(sd)
    if bad:
        raise NonFiniteError(f"refusing to write an adapter with {len(bad)} non-finite tensor(s), e.g. '{bad[0]}'")
    cfg = adapter_config_dict(model, base_model_name)

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if write_extra is not None:
            write_extra(tmp)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))

    return atomic_write_dir(Path(out_dir), write)  # published in the order written


# -- loading -------------------------------------------------------------------------------------------------------
_FUSED_KEY = re.compile(r"^(?P<mod>.*\.experts)(?P<nest>(\.base_layer)*)\.lora_(?P<ab>[AB])(\.default)?\.weight$")
_PER_EXPERT_KEY = re.compile(
    r"^(?P<mod>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.lora_(?P<ab>[AB])(\.default)?\.weight$"
)
_PER_EXPERT_PROJ = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                    "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", 0), "w2": ("down_proj", 0)}


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors, with one-line errors for anything missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(adapter_dir).expanduser()
    if not d.is_dir():
        raise AdapterError(f"adapter directory '{d}' does not exist; pass the output_dir of a training run")
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise AdapterError(f"'{d}' has no {ADAPTER_CONFIG}; it is not a PEFT adapter directory")
    if not w_path.is_file():
        bin_hint = " (adapter_model.bin is pickle and is not read; convert it to safetensors)" if (d / "adapter_model.bin").exists() else ""
        raise AdapterError(f"'{d}' has no {ADAPTER_WEIGHTS}{bin_hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (json.JSONDecodeError, ValueError) as e:
        raise AdapterError(f"'{cfg_path}' is not valid JSON ({e}); re-save the adapter") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"'{cfg_path}' is a {cfg.get('peft_type')} adapter; hybridmoe loads LoRA adapters only")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise AdapterError(f"'{cfg_path}' sets {key}=true, which hybridmoe does not implement for routed experts")
    _check_config_values(cfg, cfg_path)
    # A KTransformers bundle keeps the routed-expert LoRA beside the PEFT part: validate it first (hashes cover the
    # PEFT files too) and never fall back to the PEFT part alone.
    bundle = read_kt_bundle(d, cfg) if is_kt_bundle(d) else None
    try:
        sd = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"'{w_path}' is not a readable safetensors file ({str(e).splitlines()[0]}); it is truncated or corrupt") from None
    if bundle is not None:
        sd.update(bundle.tensors)  # keys "layers.{L}.experts.gate_lora_a" ...: split_adapter maps them
    if not sd:
        raise AdapterError(f"'{w_path}' holds no tensors")
    for k, t in sd.items():  # an integer or bool "LoRA" would be cast and silently change the output
        if not t.is_floating_point():
            raise AdapterError(f"adapter tensor '{k}' in '{w_path}' is {str(t.dtype).removeprefix('torch.')}; LoRA "
                               "weights must be floating point (float32/bfloat16/float16); the file is not a LoRA adapter")
    return cfg, sd


def _check_config_values(cfg: dict, cfg_path: Path) -> None:
    """The LoRA settings hybridmoe reads from adapter_config.json have the types and ranges PEFT gives them."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

    checks = {"r": lambda v: number(v) and v >= 1 and int(v) == v, "lora_alpha": number,
              "lora_dropout": lambda v: number(v) and 0 <= v < 1,
              "rank_pattern": lambda v: isinstance(v, dict) and all(number(x) and x >= 1 for x in v.values()),
              "alpha_pattern": lambda v: isinstance(v, dict) and all(number(x) for x in v.values())}
    nullable = ("lora_dropout", "rank_pattern", "alpha_pattern")  # r and lora_alpha: a number when given
    for key, ok in checks.items():
        if key in cfg and not (cfg[key] is None and key in nullable) and not ok(cfg[key]):
            raise AdapterError(f"'{cfg_path}' has {key}={cfg[key]!r}, which is not a valid LoRA setting; re-save the adapter")


def _strip(key: str) -> str:
    """A saved adapter key without PEFT's prefix and without the ``.orig_module`` segments of older KTransformers
    (kt-sft injected wrappers around the original modules; kt-kernel's SGLang converter drops them the same way)."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return key.replace(".orig_module", "")


def _pattern_value(cfg: dict, pattern_key: str, name: str, default):
    """`name`'s entry in the adapter config's ``rank_pattern`` / ``alpha_pattern`` (PEFT's matching), or `default`."""
    from peft.utils.other import get_pattern_key

    pattern = cfg.get(pattern_key) or {}
    if pattern:
        key = get_pattern_key(list(pattern), name)
        if key in pattern and re.search(rf"(^|\.)({key})$", name):
            return pattern[key]
    return default


def _alpha_for(cfg: dict, name: str) -> float:
    return float(_pattern_value(cfg, "alpha_pattern", name, cfg.get("lora_alpha", cfg.get("r", 8))))


@dataclass
class _ExpertAdapter:
    A: torch.Tensor  # [E, r, in]
    B: torch.Tensor  # [E, out, r]
    alpha: float


def _fused_expert_adapters(model, cfg, fused: dict[str, dict[str, dict[str, torch.Tensor]]]) -> dict:
    """{module: {nest: {"A","B"}}} in PEFT target_parameters layout -> {(module, proj): _ExpertAdapter}."""
    out = {}
    for mod, nests in fused.items():
        ex = _experts_module(model, mod)
        s = ex.spec
        shapes = {p: peft_in_out(s, p) for p in PROJECTIONS}  # (in, out) as PEFT factors them
        for nest, ab in sorted(nests.items(), key=lambda kv: -len(kv[0])):
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"adapter has lora_{''.join(ab)} but not its pair for '{mod}{nest}'")
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2:
                raise AdapterError(f"adapter tensors for '{mod}' have shapes lora_A {tuple(a.shape)}, lora_B "
                                   f"{tuple(b.shape)}; routed-expert LoRA weights are 2-D ([E·r, in], [out, E·r])")
            # The projection follows from the shapes alone: (in, out) = (H, 2I) or (I, H) cannot both fit.
            cands = [p for p, (i, o) in shapes.items() if a.shape[1] == i and b.shape[0] == o]
            if not cands or a.shape[0] % s.num_experts or a.shape[0] != b.shape[1] or a.shape[0] == 0:
                raise AdapterError(
                    f"adapter tensors for '{mod}' have shapes lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, which "
                    f"do not fit {s.num_experts} experts of hidden {s.hidden_dim}/intermediate {s.intermediate_dim}; "
                    "is the adapter for another model?"
                )
            proj = cands[0]
            A, B = from_peft_layout(s, a, b)
            out[(mod, proj)] = _ExpertAdapter(A, B, _alpha_for(cfg, f"{mod}.{s.param_name(proj)}"))
    return out


def _per_expert_adapters(model, cfg, per: dict) -> dict:
    """{(module, proj): {chunk: {e: {"A","B"}}}} in the per-expert layout -> fused _ExpertAdapter per projection."""
    out = {}
    for (mod, proj), chunks in per.items():
        ex = _experts_module(model, mod)
        n_chunks = 2 if proj == "gate_up_proj" and ex.spec.gated else 1
        As, Bs = [], []
        for e in range(ex.num_experts):
            a_parts, b_parts = [], []
            for c in range(n_chunks):
                ab = chunks.get(c, {}).get(e)
                if ab is None or set(ab) != {"A", "B"}:
                    raise AdapterError(f"per-expert adapter lacks lora_A/lora_B of expert {e} ({proj} part {c}) in '{mod}'")
                a, b = ab["A"], ab["B"]
                if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
                    raise AdapterError(f"per-expert adapter for '{mod}' expert {e} ({proj} part {c}) has shapes "
                                       f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, which are not a LoRA pair")
                a_parts.append(a.float())
                b_parts.append(b.float())
            if len({a.shape[1] for a in a_parts}) != 1:
                raise AdapterError(f"per-expert adapter for '{mod}' expert {e}: {proj} parts differ in input size")
            As.append(torch.cat(a_parts, 0))  # [c·r, in]
            Bs.append(torch.block_diag(*b_parts))  # [out, c·r]: gate rows see only gate's A, up rows only up's
        if len({t.shape for t in As}) != 1 or len({t.shape for t in Bs}) != 1:
            raise AdapterError(f"per-expert adapter for '{mod}' {proj}: the experts' LoRA shapes differ")
        A, B = torch.stack(As), torch.stack(Bs)
        if proj == "gate_up_proj" and ex.spec.interleaved:  # rows [g0, u0, g1, u1, ...] (gpt-oss), not [g; u]
            i = ex.spec.intermediate_dim
            B = B[:, torch.stack([torch.arange(i), torch.arange(i) + i], 1).flatten()]
        _, want_out, want_in = ex.spec.shape(proj)
        if A.shape[2] != want_in or B.shape[1] != want_out:
            raise AdapterError(f"per-expert adapter for '{mod}' {proj} has in/out {A.shape[2]}/{B.shape[1]}, the model "
                               f"has {want_in}/{want_out}; is the adapter for another model?")
        # Fusing c rank-r LoRAs gives rank c·r; alpha scales with it so alpha/r (the scale) is unchanged.
        out[(mod, proj)] = _ExpertAdapter(A, B, _alpha_for(cfg, f"{mod}.{ex.spec.param_name(proj)}") * n_chunks)
    return out


def _experts_module(model: nn.Module, mod: str) -> HybridExperts:
    try:
        m = model.get_submodule(mod)
    except AttributeError:
        m = None
    if not isinstance(m, HybridExperts):
        raise AdapterError(f"adapter targets routed experts at '{mod}', which this model does not have; is the adapter for another model?")
    return m


def split_adapter(model: nn.Module, cfg: dict, sd: dict[str, torch.Tensor]):
    """Sort adapter tensors into Linear LoRA (by module) and routed-expert LoRA (by experts module and projection)."""
    from .checkpoint import KeyMapper

    mapper = KeyMapper(model.config.model_type)
    linear: dict[str, dict[str, torch.Tensor]] = {}
    fused: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    per: dict[tuple[str, str], dict[int, dict[int, dict[str, torch.Tensor]]]] = {}
    kt: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = KT_KEY.match(key)
        if m:  # a KTransformers bundle's fused expert LoRA (validated by read_kt_bundle)
            kt.setdefault(int(m["layer"]), {})[m["name"]] = t
            continue
        name = mapper.rename(_strip(key))
        m = _PER_EXPERT_KEY.match(name)
        if m:
            proj, chunk = _PER_EXPERT_PROJ[m["proj"]]
            if m["proj"] == "up_proj" and not _experts_module(model, m["mod"]).spec.gated:
                chunk = 0  # non-gated experts: up_proj is the whole input projection
            per.setdefault((m["mod"], proj), {}).setdefault(chunk, {}).setdefault(int(m["e"]), {})[m["ab"]] = t
            continue
        m = _FUSED_KEY.match(name)
        if m:
            fused.setdefault(m["mod"], {}).setdefault(m["nest"], {})[m["ab"]] = t
            continue
        m = re.match(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(\.default)?\.weight$", name)
        if not m:
            raise AdapterError(f"adapter tensor '{key}' is not a LoRA A/B weight; hybridmoe loads LoRA adapters only")
        linear.setdefault(m["mod"], {})[m["ab"]] = t
    experts = _fused_expert_adapters(model, cfg, fused)
    experts.update(_per_expert_adapters(model, cfg, per))
    experts.update(_kt_expert_adapters(model, cfg, kt))
    return linear, experts


def _kt_expert_adapters(model, cfg, kt: dict[int, dict[str, torch.Tensor]]) -> dict:
    """KTransformers fused expert LoRA {layer: {name: tensor}} -> _ExpertAdapter per projection (kt_bundle's math).

    Every MoE layer of the model must be covered: kt-kernel saves all of them, so a missing one means the bundle is
    for another model."""
    if not kt:
        return {}
    by_layer = {layer_of(n): n for n, m in model.named_modules() if isinstance(m, HybridExperts) and layer_of(n) is not None}
    if sorted(kt) != sorted(by_layer):
        raise AdapterError(f"the adapter's {FUSED_FILE} has routed-expert LoRA for layers {sorted(kt)}, but the "
                           f"model's MoE layers are {sorted(by_layer)}; is the adapter for another model?")
    alpha = float(cfg["lora_alpha"])  # read_kt_bundle checked it equals the manifest's alpha
    out = {}
    for layer, t in sorted(kt.items()):
        mod = by_layer[layer]
        s = _experts_module(model, mod).spec
        if not s.gated or s.interleaved or s.transposed:  # KT's gate/up split is [gate; up] rows of [E, 2I, H]
            raise AdapterError(f"the adapter is a KTransformers bundle, whose gate/up LoRA is defined for gated experts "
                               f"with [gate; up] rows, but '{mod}' stores its experts differently; hybridmoe will not "
                               "guess the mapping")
        e, r, h, i = s.num_experts, t["gate_lora_a"].shape[1], s.hidden_dim, s.intermediate_dim
        if list(t["gate_lora_a"].shape) != [e, r, h] or list(t["down_lora_a"].shape) != [e, r, i]:
            raise AdapterError(
                f"the adapter's {FUSED_FILE} layer {layer} has gate_lora_a {list(t['gate_lora_a'].shape)} and "
                f"down_lora_a {list(t['down_lora_a'].shape)}, but '{mod}' has {e} experts of hidden {h}/intermediate "
                f"{i} ([E, r, H] and [E, r, I] expected); is the adapter for another model?")
        f = {k: v.float() for k, v in t.items()}  # bf16 -> fp32 is exact
        a, b = kt_to_gate_up(f["gate_lora_a"], f["gate_lora_b"], f["up_lora_a"], f["up_lora_b"])
        out[(mod, "gate_up_proj")] = _ExpertAdapter(a, b, 2 * alpha)  # rank 2r, scale alpha / r
        out[(mod, "down_proj")] = _ExpertAdapter(f["down_lora_a"].contiguous(), f["down_lora_b"].contiguous(), alpha)
    return out


def _check_linear(model: nn.Module, linear: dict[str, dict[str, torch.Tensor]]) -> None:
    for mod, ab in linear.items():
        try:
            m = model.get_submodule(mod)
        except AttributeError:
            m = None
        m = getattr(m, "base_layer", m)  # already wrapped by PEFT for another adapter (the server loads several)
        if not isinstance(m, nn.Linear):
            raise AdapterError(f"adapter tensor '{mod}.lora_A.weight' targets module '{mod}', which this model does not "
                               "have as a Linear layer; is the adapter for another model?")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter has lora_{''.join(ab)} but not its pair for '{mod}'")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"adapter tensors for '{mod}' have shapes lora_A {tuple(a.shape)}, lora_B "
                               f"{tuple(b.shape)}; Linear LoRA weights are 2-D matrices")
        if a.shape[1] != m.in_features or b.shape[0] != m.out_features or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise AdapterError(
                f"adapter tensors for '{mod}' have shapes lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; the model's "
                f"layer is {m.in_features}->{m.out_features}; is the adapter for another model?"
            )


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, trainable: bool = False,
                 adapter_name: str = "default", lora_dropout: float | None = None):
    """Attach a PEFT adapter to a hybrid model: Linear LoRA via PEFT on the compute device, expert LoRA on the CPU.

    Never merges into offloaded weights, never wraps expert weights, never rewrites adapter_config.json. When
    ``model`` is already a PeftModel, the Linear LoRA is added to it as the named adapter ``adapter_name`` (PEFT's
    ``add_adapter``; the active adapter is not changed). The routed-expert LoRA always replaces the entries of
    ``HybridExperts.lora`` it covers; the server keeps one such dict per adapter and swaps them.
    lora_dropout: the Linear LoRA's dropout (a resumed training run passes its config's); default: the adapter's
    ``adapter_config.json`` value (it only acts in train mode).
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import set_peft_model_state_dict

    cfg, sd = read_adapter(adapter_dir)
    bad = nonfinite_tensors(sd)
    if bad:
        from .components import count_by_component

        detail = ", ".join(f"{c} {n}" for c, n in sorted(count_by_component(bad).items()))
        raise NonFiniteError(
            f"adapter '{adapter_dir}' has {len(bad)} non-finite tensor(s) ({detail}); it was saved from a diverged run "
            f"and would produce NaN logits; see `hybridmoe inspect {adapter_dir}`"
        )
    base = base_model_of(model)
    linear, experts = split_adapter(base, cfg, sd)
    _check_linear(base, linear)
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    # Patterns only where a module differs from the defaults: a resumed run re-saves the config it started with.
    rank_pattern = {f"^{re.escape(mod)}$": int(ab["A"].shape[0]) for mod, ab in linear.items()
                    if int(ab["A"].shape[0]) != r_default}
    alpha_pattern = {f"^{re.escape(mod)}$": _alpha_for(cfg, mod) for mod in linear if _alpha_for(cfg, mod) != alpha_default}
    dropout = float(cfg.get("lora_dropout") or 0.0) if lora_dropout is None else lora_dropout
    lcfg = LoraConfig(r=r_default, lora_alpha=alpha_default, lora_dropout=dropout,
                      target_modules=sorted(linear) or [], rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                      bias="none", inference_mode=not trainable)
    base.hybridmoe.lora_config = lcfg
    peft_model = model
    if linear:
        with no_peft_moe_rewrite():
            if isinstance(model, PeftModel):
                model.add_adapter(adapter_name, lcfg)
            else:
                peft_model = get_peft_model(model, lcfg, adapter_name=adapter_name)
        lin_sd = {f"{PEFT_PREFIX}{mod}.lora_{k}.weight": v for mod, ab in linear.items() for k, v in ab.items()}
        with no_peft_key_conversion():
            res = set_peft_model_state_dict(peft_model, lin_sd, adapter_name=adapter_name)
        # other adapters' weights are "missing" from this state dict too; only this adapter's must be present
        missing_lora = [k for k in res.missing_keys if re.search(rf"\.lora_[AB]\.{re.escape(adapter_name)}\.", k)]
        if res.unexpected_keys or missing_lora:
            raise AdapterError(f"adapter '{adapter_dir}' does not fit the model: unexpected {res.unexpected_keys[:1]} "
                               f"missing {missing_lora[:1]}")
    for (mod, proj), ea in experts.items():
        ex = _experts_module(base, mod)
        lo = ex.add_lora(proj, ea.A.shape[1], ea.alpha)
        lo.A.copy_(ea.A)
        lo.B.copy_(ea.B)
        lo.requires_grad_(trainable)
    if not trainable:
        peft_model.eval()
    return peft_model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter into the weights on each side (``--merge``): PEFT merges Linear LoRA into the compute-device
    weights, which are real tensors there (never empty placeholders); expert LoRA is folded into the CPU expert
    weights in fp32 and cast back to their dtype (int8 experts: requantized). Returns the plain transformers model."""
    base = base_model_of(model)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else base
    for m in merged.modules():
        if isinstance(m, HybridExperts):
            for proj in list(m.lora):
                m.weights.write(proj, m.merged_weight(proj))
                del m.lora[proj]
            if m.streamer is not None:
                m.streamer.invalidate()  # the GPU slots hold the unmerged weights
    merged.hybridmoe.lora_config = None
    return merged
