"""Build a hybrid model from a checkpoint: routed experts in CPU RAM, everything else on the compute device.

The model is built with empty (meta) parameters, its fused experts blocks are swapped for
:class:`~hybridmoe.experts.HybridExperts` (found by structure), then the checkpoint is streamed tensor by tensor:
expert tensors are copied straight into their preallocated CPU home, every other tensor goes to the compute device.
No full second copy of the model ever exists in host memory, and nothing expert-shaped is allocated on the GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .attention_backend import avoid_per_shape_plans
from .checkpoint import Checkpoint, KeyMapper, _check_dir, read_config
from .errors import CheckpointError, ConfigError
from .experts import HybridExperts, experts_spec, find_fused_experts
from .experts.backends import ExpertSettings
from .experts.cpu_experts import ExpertFormat, format_name
from .experts.formula import ExpertMLP
from .experts.packed import INT4_GROUP, PackedFormat, int4_group_for
from .experts.streaming import enable_streaming
from .formats import WeightReader, check_tensors, checkpoint_format
from .host_embedding import embeddings_to_host

log = logging.getLogger("hybridmoe")

# Batches of at least this many tokens run the routed experts on the GPU, their weights streamed in (see
# experts/streaming.py); smaller ones on the CPU. Chosen by measurement on the GPU host (BENCHMARKS.md).
DEFAULT_STREAM_MIN_TOKENS = 64

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


@dataclass
class HybridMeta:
    """What hybridmoe knows about a loaded model; attached as ``model.hybridmoe``."""

    checkpoint: str
    device: torch.device
    dtype: torch.dtype
    expert_dtype: ExpertFormat  # bf16 / fp32 / int8, or a 4-bit PackedFormat (int4, mxfp4)
    moe_layers: list[str]  # module names of the HybridExperts blocks
    lora_config: object | None = None  # the peft.LoraConfig of the attached/trained adapter, if any
    # How the routed experts run (compiled CPU kernel, decode GPU share); shared by every HybridExperts of the model.
    settings: ExpertSettings = field(default_factory=ExpertSettings)
    # The checkpoint's weight format as shipped: "float", or e.g. "fp8 [128, 128] blocks (dequantized as loaded)".
    source_format: str = "float"

    @property
    def expert_format(self) -> str:
        """How the routed experts are held in RAM, e.g. "bfloat16", "int8", "int4 (group 64)", "mxfp4"."""
        return format_name(self.expert_dtype)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device '{device}' is not a torch device; use 'cuda', 'cuda:N' or 'cpu'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"device '{device}' is not supported; use 'cuda' or 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported; use bfloat16 or float32")
    return DTYPES[dtype]


def resolve_expert_dtype(dtype: str | ExpertFormat | None, device: torch.device) -> ExpertFormat:
    """Like :func:`resolve_dtype`, plus int8 (quantized per output row at load) and int4 (group-wise at load; the
    group is :data:`~hybridmoe.experts.packed.INT4_GROUP`, or the largest that divides the expert dims, see
    :func:`_swap_experts`). A :class:`PackedFormat` passes through (the Python API can ask for a group size)."""
    if isinstance(dtype, PackedFormat):
        return dtype
    if dtype in ("int8", torch.int8):
        return torch.int8
    if dtype == "int4":
        return PackedFormat("int4", INT4_GROUP)
    if dtype == "mxfp4":  # quantized to MXFP4 as they load (an MXFP4 checkpoint is kept as is by default anyway)
        return PackedFormat("mxfp4", 32)
    try:
        return resolve_dtype(dtype, device)
    except ConfigError:
        raise ConfigError(f"expert_dtype '{dtype}' is not supported; use bfloat16, float32, int8 or int4") from None


def default_expert_format(fmt, dtype: torch.dtype) -> ExpertFormat:
    """The experts' format when the user names none: compact where the checkpoint is (MXFP4 stays MXFP4; FP8 becomes
    int8, the same bytes: a bf16 copy of an FP8 model would not fit the RAM it was shipped for), else `dtype`."""
    if fmt is not None and fmt.name == "mxfp4":
        return PackedFormat("mxfp4", 32)
    if fmt is not None and fmt.name == "fp8":
        return torch.int8
    if fmt is not None and fmt.name == "compressed-tensors":
        return fmt.compact()  # int4 as shipped, or int8
    return dtype


def _supported() -> str:
    """The architectures tests/test_architectures.py runs against transformers (imported only for an error line)."""
    from .testing.zoo import SUPPORTED_ARCHITECTURES

    return ", ".join(SUPPORTED_ARCHITECTURES)


def _build_empty(config, dtype: torch.dtype) -> nn.Module:
    """The model with parameters on the meta device and real (cpu) non-persistent buffers such as rotary inv_freq."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise CheckpointError(
            f"model_type '{config.model_type}' has no causal-LM class in transformers; "
            f"supported MoE architectures: {_supported()}"
        )
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _swap_experts(model: nn.Module, expert_dtype: ExpertFormat, device: str = "cpu",
                  settings: ExpertSettings | None = None) -> dict[str, HybridExperts]:
    found = find_fused_experts(model)
    if not found:
        raise CheckpointError(
            f"model_type '{model.config.model_type}' has no routed experts (not a transformers-v5 MoE model); "
            f"supported architectures: {_supported()}"
        )
    out = {}
    for name, old in found:
        spec = experts_spec(name, old)
        mlp = ExpertMLP.from_block(old, spec.gated)
        fmt = _block_format(expert_dtype, spec, name)
        new = HybridExperts(spec, mlp, fmt, source_class=type(old).__name__, device=device, settings=settings)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        out[name] = new
    return out


def _block_format(fmt: ExpertFormat, spec, name: str) -> ExpertFormat:
    """`fmt` for one experts block: a 4-bit group that does not divide the block's input dims is replaced by the
    largest of 128 / 64 / 32 that does (int4), or refused."""
    if not isinstance(fmt, PackedFormat):
        return fmt
    dims = (spec.shape("gate_up_proj")[2], spec.shape("down_proj")[2])
    if all(fmt.fits(d) for d in dims):
        return fmt
    group = int4_group_for(dims) if fmt.kind == "int4" else None
    if group is None:
        raise ConfigError(f"expert_dtype {fmt} needs the expert input dims of '{name}' {list(dims)} to be multiples of "
                          f"{fmt.group if fmt.kind == 'mxfp4' else 32}; use expert_dtype int8 or bfloat16")
    log.info("int4 experts of '%s': group %d (the default %d does not divide %s)", name, group, fmt.group, list(dims))
    return PackedFormat("int4", group)


def _keep_fp32(model: nn.Module, name: str) -> bool:
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or []
    )
    return any(k in name.split(".") or name.endswith(k) for k in keep)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[leaf] = tensor


def _check_shape(tensor: torch.Tensor, want: tuple, key: str, f: Path) -> None:
    if tuple(tensor.shape) != want:
        raise CheckpointError(f"tensor '{key}' in '{f.name}' has shape {tuple(tensor.shape)}, the config expects {want}")


def _copy_expert(experts: HybridExperts, sl, tensor: torch.Tensor, key: str, f: Path,
                 scales: torch.Tensor | None = None) -> None:
    """One checkpoint tensor of the routed experts into its CPU home: a whole fused projection or bias, or one
    expert's slice of one; transposed ([E, in, out]) checkpoints are turned to [E, out, in] on the way. With
    `scales`, `tensor` is 4-bit codes already in the experts' format, in [.., out, in/2] orientation, stored as is."""
    weights, spec = experts.weights, experts.spec
    bias = sl.proj.endswith("_bias")
    proj = sl.proj[: -len("_bias")] if bias else sl.proj
    proj = "gate_up_proj" if proj == spec.up_name else proj  # the input projection's slot ("up_proj" when non-gated)
    if bias and weights.bias is None:
        raise CheckpointError(f"tensor '{key}' in '{f.name}' is an expert bias, but '{sl.module}' has none; is the "
                              "checkpoint for another architecture?")
    if proj not in weights.loaded:
        raise CheckpointError(f"tensor '{key}' in '{f.name}' is a '{sl.proj}' of '{sl.module}', which has "
                              f"'{spec.up_name}' and 'down_proj'")
    full = weights.bias[proj] if bias else weights.tensor(proj)  # [E, out] or [E, out, in] cpu (packed: in/2)
    mark = weights.loaded[f"{proj}_bias" if bias else proj]  # [E, 2]
    if spec.transposed and not bias and scales is None:
        tensor = tensor.transpose(-1, -2)
    if scales is None and not bias and weights.packed is not None:
        full = full.new_empty((*full.shape[:2], 2 * full.shape[2]), device="meta")  # shape check on the float view
    rows_of = full.shape[1] // sl.num_chunks
    if sl.expert is None:
        _check_shape(tensor, tuple(full.shape), key, f)
        if bias:
            weights.write_bias(proj, tensor)
        elif scales is not None:
            weights.write_packed(proj, tensor, scales)
        else:
            weights.write(proj, tensor)
        mark[:] = True
        return
    if not 0 <= sl.expert < full.shape[0]:
        raise CheckpointError(f"tensor '{key}' in '{f.name}' is expert {sl.expert}, but the config has {full.shape[0]} experts")
    _check_shape(tensor, (rows_of, *full.shape[2:]), key, f)
    # One expert slice at a time: host memory holds at most one checkpoint tensor beside the final home (int8/int4
    # weights are quantized slice by slice, so a bf16 copy of the whole model never exists).
    rows = slice(sl.chunk * rows_of, (sl.chunk + 1) * rows_of)
    if bias:
        weights.bias[proj][sl.expert, rows].copy_(tensor)
    elif scales is not None:
        weights.write_packed(proj, tensor, scales, expert=sl.expert, rows=rows)
    else:
        weights.write(proj, tensor, expert=sl.expert, rows=rows)
    span = mark.shape[1] // sl.num_chunks
    mark[sl.expert, sl.chunk * span:(sl.chunk + 1) * span] = True


def _as_shipped(reader: WeightReader, key: str, experts: HybridExperts) -> bool:
    """Whether checkpoint tensor `key` is 4-bit in exactly the experts' format (then no float copy is made)."""
    fmt = reader.packed_format(key)
    return fmt is not None and fmt == experts.weights.packed


def _stream_weights(model, ckpt: Checkpoint, experts: dict[str, HybridExperts], device, dtype, progress: bool,
                    fmt=None, load_experts: bool = True) -> None:
    """Read every checkpoint tensor once into its home. fmt: the checkpoint's declared format
    (:func:`~hybridmoe.formats.checkpoint_format`); load_experts=False skips the routed-expert tensors (another rank
    on this host fills the host-shared copy)."""
    expected = {k: v for k, v in model.state_dict().items()}  # meta tensors: names and shapes only
    mapper = KeyMapper(model.config.model_type, expected)
    # Before any weight is read: every tensor is in a format we load, and every ignored one is provably unused.
    ignored = check_tensors(ckpt, model, set(experts), fmt)
    reader = WeightReader(ckpt, fmt)  # FP8: each weight dequantized with its scales as it is read
    loaded: set[str] = set()
    parts: dict[str, dict[int, torch.Tensor]] = {}  # concatenated tensors waiting for their other parts

    def place(name: str, t: torch.Tensor, key: str, f: Path) -> None:
        _check_shape(t, tuple(expected[name].shape), key, f)
        if t.is_floating_point():
            t = t.to(torch.float32 if _keep_fp32(model, name) else dtype)
        _set_tensor(model, name, t.to(device))
        loaded.add(name)

    # `with`: the bar is closed before an error propagates, so the error line is not glued to a half-drawn bar
    with tqdm(total=len(ckpt.key_to_file), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for f, keys in ckpt.keys_by_file().items():
            handle = ckpt.open(f)
            for key in sorted(keys):
                if reader.consumed(key):
                    bar.update(1)
                    continue
                name = mapper.rename(reader.logical(key))
                sl = mapper.expert_slice(name)
                part = mapper.concat_part(name)
                if sl is not None and sl.module in experts:
                    if load_experts and _as_shipped(reader, key, experts[sl.module]):  # 4-bit codes stored as is
                        codes, scales = reader.read_packed(handle, f, key)
                        _copy_expert(experts[sl.module], sl, codes, key, f, scales=scales)
                    elif load_experts:
                        _copy_expert(experts[sl.module], sl, reader.read(handle, f, key), key, f)
                elif name in expected:
                    place(name, reader.read(handle, f, key), key, f)
                elif part is not None and part.target in expected:
                    # Held until all parts are read (they may sit in different shards); these are small tensors
                    # (convolution kernels), never experts.
                    got = parts.setdefault(part.target, {})
                    got[part.index] = reader.read(handle, f, key)
                    if len(got) == part.count:
                        place(part.target, torch.cat([got[i] for i in range(part.count)], part.dim), key, f)
                        del parts[part.target]
                bar.update(1)
            del handle
    if ignored:
        log.info("ignored %d checkpoint tensor(s) the model does not have (e.g. %s)", len(ignored), ignored[0])

    missing = [k for k in expected if k not in loaded]
    tied = _tie_output_embeddings(model, missing)
    missing = [k for k in missing if k not in tied]
    if missing:
        raise CheckpointError(
            f"checkpoint '{ckpt.path}' lacks {len(missing)} tensor(s) the config needs, e.g. '{missing[0]}'; "
            "it does not match its config.json"
        )
    for name, ex in experts.items() if load_experts else ():
        gaps = ex.weights.missing()
        if gaps:
            raise CheckpointError(
                f"checkpoint '{ckpt.path}' lacks {len(gaps)} routed-expert slice(s) of '{name}', e.g. {gaps[0]}"
            )


def _tie_output_embeddings(model: nn.Module, missing: list[str]) -> set[str]:
    text_cfg = model.config.get_text_config()
    out = model.get_output_embeddings()
    if not getattr(text_cfg, "tie_word_embeddings", False) or out is None:
        return set()
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is out.weight}
    if not names & set(missing):
        return set()
    out.weight = model.get_input_embeddings().weight
    return names


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    expert_dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    stream_min_tokens: int | None = None,
    host_shared=None,
    stream_slots: int = 2,
    stream_cpu_share: float | None = None,
    resident_expert_layers: int = 0,
) -> nn.Module:
    """Load a MoE causal LM with its routed experts on the CPU and everything else on ``device``.

    dtype: of the compute-device weights (default bf16 on CUDA, fp32 on CPU); expert_dtype: of the CPU expert
    weights (default: same as dtype, but MXFP4 checkpoints stay MXFP4 and FP8 ones become int8; "int8" quantizes
    them per output row as they load: half the host RAM of bf16; "int4" group-wise: a quarter).
    stream_min_tokens: batches of at least this many tokens run the experts on the GPU with their weights streamed in
    (default on CUDA: ``DEFAULT_STREAM_MIN_TOKENS``; 0 = always on the CPU);
    stream_slots: how many layers of expert weights the GPU keeps (>= 2; more = fewer copies, more GPU memory).
    stream_cpu_share: in a streamed inference forward (a long prompt, the server's batched prefill), the share of each
    layer's experts computed on the CPU while the others stream to the GPU (0..1; default by expert format,
    ``experts.backends.DEFAULT_PREFILL_CPU_SHARE``).
    resident_expert_layers: the first N MoE layers' experts are copied to the GPU once and computed there for every
    batch size, decode included (one layer's expert weights of GPU memory each; ``info`` prints the size).
    host_shared: a :class:`hybridmoe.distributed.HostSharedExperts` when several ranks on this host train together
    (the experts are then held once per host, not once per rank). Returns the transformers model in eval mode with
    ``model.hybridmoe`` set.
    """
    if stream_cpu_share is not None and not 0 <= stream_cpu_share <= 1:  # (NaN fails both); before the slow load
        raise ConfigError(f"stream_cpu_share must be a fraction in [0, 1] of each layer's experts, got "
                          f"{stream_cpu_share}")
    if resident_expert_layers < 0:  # before the slow load too
        raise ConfigError(f"resident_expert_layers must be >= 0 (0 keeps every layer's experts in CPU RAM), got "
                          f"{resident_expert_layers}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    ckpt = Checkpoint(path)
    fmt = checkpoint_format(ckpt.path)  # refuses every quantization it does not read
    edt = resolve_expert_dtype(expert_dtype, dev) if expert_dtype is not None else default_expert_format(fmt, dt)
    config = read_config(path, trust_remote_code=trust_remote_code)
    if fmt is not None:  # dequantized as loaded: the model in memory is a plain float model
        config.quantization_config = None
        del config.quantization_config
    model = _build_empty(config, dt)
    settings = ExpertSettings()
    if host_shared is None:
        experts = _swap_experts(model, edt, settings=settings)
        _stream_weights(model, ckpt, experts, dev, dt, progress, fmt)
    else:
        experts = _swap_experts(model, edt, device="meta", settings=settings)  # storage: the host-shared mapping
        with host_shared.hold(experts) as fill:  # local rank 0 fills; the others skip the expert tensors
            _stream_weights(model, ckpt, experts, dev, dt, progress, fmt, load_experts=fill)
    # Non-persistent buffers (rotary inv_freq) were built on the CPU; `to` moves them. Experts have no
    # parameters or buffers, so this cannot touch them.
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    avoid_per_shape_plans(dev)  # prompts of every length: no cuDNN attention plan per new shape
    model.hybridmoe = HybridMeta(str(ckpt.path), dev, dt, edt, list(experts), settings=settings,
                                 source_format=_describe(fmt, next(iter(experts.values())).weights.fmt))  # as held
    _setup_streaming(model, experts, dev, stream_min_tokens, stream_slots, stream_cpu_share, resident_expert_layers)
    if dev.type == "cuda" and embeddings_to_host(model, dev):
        torch.cuda.empty_cache()  # give the table's GPU memory back
    _load_generation_config(model, ckpt.path)
    return model


def _describe(fmt, experts: ExpertFormat) -> str:
    """The checkpoint's format as shipped and what became of it, for ``info``."""
    kept = format_name(experts)
    if fmt is None:
        return "float"
    if fmt.name == "fp8":
        return (f"fp8 {list(fmt.block) if fmt.block else 'per-tensor'} blocks: routed experts held as {kept}, the "
                "rest dequantized as loaded")
    if fmt.name == "compressed-tensors":  # int4 of the checkpoint's group: its codes and scales, byte for byte
        how = (f"held as {kept}, the checkpoint's codes and scales copied as shipped where its scales are bf16"
               if fmt.ships(experts) else f"held as {kept}")
        return f"{fmt}: routed experts {how}, the rest dequantized as loaded"
    if isinstance(experts, PackedFormat) and experts.kind == fmt.name:
        return (f"{fmt.name}: routed experts kept as shipped (codes and e8m0 scales byte for byte), the rest as "
                "loaded")
    return f"{fmt.name}: routed experts held as {kept}, the rest as loaded"


def _setup_streaming(model: nn.Module, experts: dict[str, HybridExperts], dev: torch.device,
                     min_tokens: int | None, slots: int, cpu_share: float | None = None,
                     resident: int = 0) -> None:
    if min_tokens is None:
        min_tokens = DEFAULT_STREAM_MIN_TOKENS if dev.type == "cuda" else 0
    if min_tokens < 0:
        raise ConfigError(f"stream_min_tokens must be >= 0 (0 keeps the experts on the CPU), got {min_tokens}")
    if slots < 2:
        raise ConfigError(f"stream_slots must be >= 2 (one layer computing, one arriving), got {slots}")
    model.hybridmoe.settings.cpu_share = cpu_share
    if dev.type != "cuda":
        min_tokens = 0  # nothing to stream to
        if resident:
            log.info("resident_expert_layers=%d ignored: there is no GPU, every expert runs on the CPU", resident)
        resident = 0
    if (min_tokens or resident) and not all(ex.weights.pin() for ex in experts.values()):
        log.warning("could not page-lock the expert weights: streaming them to the GPU will be slower")
    enable_streaming(model, dev, min_tokens, slots, resident)


def _load_generation_config(model: nn.Module, path: Path) -> None:
    """Chat models often list their stop tokens (e.g. <|im_end|>) only in generation_config.json."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", path / "generation_config.json", str(e).splitlines()[0])


# A folder without any of these has no tokenizer (transformers would build a 1-token one from config.json alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer.tiktoken")


def load_tokenizer(path: str | os.PathLike, chat_template: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's tokenizer; a chat template file or string may be given when it has none.

    trust_remote_code is passed explicitly: left unset, transformers would prompt on a terminal for a checkpoint
    that ships tokenizer code instead of refusing it."""
    from transformers import AutoTokenizer

    p = _check_dir(path)  # a local folder: a missing one is named, never looked up as a hub repo id
    template = read_chat_template(chat_template) if chat_template is not None else None
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"'{p}' has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}); copy the tokenizer "
                              "files of the base model into it")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a tokenizer from '{p}': {str(e).splitlines()[0]}") from None
    if len(tok) < 2:
        raise CheckpointError(f"the tokenizer in '{p}' has {len(tok)} token(s); its files are incomplete: copy the "
                              "tokenizer files of the base model into it")
    if template is not None:
        tok.chat_template = template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def read_chat_template(value: str) -> str:
    """A chat template given as text or as a file. The rule: text with Jinja markup ("{%" or "{{") is the template
    itself; anything else must name a readable file (so a mistyped path is an error, never a template). Either way
    the template must parse."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from .io import fs_error

    if "{%" in value or "{{" in value:
        text, where = value, "the chat template text"
    else:
        f = Path(value).expanduser()
        where = f"chat template file '{f}'"
        if f.is_dir():
            raise ConfigError(f"{where} is a directory; pass a .jinja file or the template text itself")
        if not f.is_file():
            raise ConfigError(f"{where} does not exist; pass a .jinja file or the template text itself (text is "
                              "taken as a template only when it holds Jinja markup such as {{ or {%)")
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as e:
            raise fs_error(e, "cannot read the chat template", f) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where} is not UTF-8 text") from None
        if not text.strip():
            raise ConfigError(f"{where} is empty")
    try:
        ImmutableSandboxedEnvironment().parse(text)  # what transformers renders it with
    except TemplateSyntaxError as e:
        raise ConfigError(f"{where} is not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return text
