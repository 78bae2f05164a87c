"""torch.compile of a decode step's GPU stretches: fewer, fused kernels in the CUDA graphs between the cuts.

A batch-1 decode step of a hybrid model runs ~70 small GPU kernels a layer (norms, rotary, copies and casts,
attention, router, shared experts), ~4 ms of GPU time a token for DeepSeek-V2-Lite (S12-c), all on the critical path
between the CPU's experts. Inductor fuses the elementwise ones. The routed experts themselves are cut out of the step
(:mod:`hybridmoe.decode_graph`), so what is compiled is every module of each decoder layer that does not contain the
routed experts (attention, norms) and every module of the MoE block beside them (router, shared experts): the
compiled forwards stand in only while the decode step runs eagerly or is captured (:func:`compiled_forwards`);
prefill and training keep the model's own. Opt-in (``model.hybridmoe.settings.compile_decode``, CUDA only): the
first step compiles (tens of seconds; inductor's cache makes later processes faster), every later step replays the
graphs, which hold the compiled kernels.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from hybridmoe.decode_norm import swapped_forwards
from hybridmoe.experts import HybridExperts

__all__ = ["compile_pairs", "compiled_forwards", "stretch_modules"]


def stretch_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose forwards are compiled: in each decoder layer (the siblings of the layers holding routed
    experts, found as ``...layers.N.<moe block>.<experts>``), every child module except the MoE block, and every
    child of the MoE block except the routed experts. [] for a layout other than that."""
    parent = {id(child): mod for mod in model.modules() for child in mod.children()}
    layer_lists: list[nn.ModuleList] = []
    blocks: set[int] = set()
    for ex in (m for m in model.modules() if isinstance(m, HybridExperts)):
        block = parent.get(id(ex))
        layer = parent.get(id(block)) if block is not None else None
        layers = parent.get(id(layer)) if layer is not None else None
        if not isinstance(layers, nn.ModuleList):
            return []
        blocks.add(id(block))
        if all(layers is not seen for seen in layer_lists):
            layer_lists.append(layers)
    out = []
    for layers in layer_lists:
        for layer in layers:
            for child in layer.children():
                if id(child) in blocks:
                    out += [c for c in child.children() if not isinstance(c, HybridExperts)]
                elif not any(isinstance(m, HybridExperts) for m in child.modules()):
                    out.append(child)
    return out


@contextmanager
def compiled_forwards(pairs: list[tuple[nn.Module, object]], layers: int, cache=None):
    """While the block runs, each module's ``forward`` is its compiled one (``pairs``: (module, compiled forward)).

    One compiled attention serves every layer: `cache`'s ``update`` (the step's KV cache) runs outside the compiled
    code (``torch.compiler.disable``, a graph break there), and a module's int attributes may be symbolic (dynamo's
    ``allow_unspec_int_on_nn_module``), so the layer index each attention hands the cache is an input, not a constant
    the code is specialized and recompiled on: attention compiles twice (the first layer, then for any layer) instead of
    once a layer, which was most of the first step's cost (on the CPU, six tiny layers: 12-18 s -> 5-8 s, four
    architectures; the logits are the same). ``layers``: how many decoder layers share each compiled function (the
    recompile limit is raised to allow for one compile each, should a model still specialize on its layer).

    A stretch that fails to compile runs eagerly where it failed (dynamo's ``suppress_errors``, with its warning):
    the step must not run twice, since its forward updates the cache (transformers' static layers advance a
    counter), so a failure cannot be retried from the start (seen on the GPU host, S12-e)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    limit = max(cfg.recompile_limit, 2 * layers + 8)
    if cache is not None:
        cache.update = torch.compiler.disable(cache.update)  # over the class's method, for this block only
    patch = dict(recompile_limit=limit, suppress_errors=True,
                 accumulated_recompile_limit=max(cfg.accumulated_recompile_limit, 4 * limit * max(len(pairs), 1)))
    if hasattr(cfg, "allow_unspec_int_on_nn_module"):
        patch["allow_unspec_int_on_nn_module"] = True
    try:
        with cfg.patch(**patch), swapped_forwards(pairs):
            yield
    finally:
        if cache is not None:
            del cache.update
        _release_compile_workers()


def _release_compile_workers() -> None:
    """Stop inductor's pool of compile worker processes once the step has compiled: the pool (one process a core on
    a many-core host) holds host memory, which these models fill, and is only needed again if a stretch recompiles,
    which starts it anew (S13-e: stopping it did not change the decode's speed). A torch without the call keeps it."""
    try:
        from torch._inductor import async_compile
    except ImportError:
        return
    shutdown = getattr(async_compile, "shutdown_compile_workers", None)
    if shutdown is not None:
        shutdown()


def compile_pairs(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(module, ``torch.compile`` of its forward) for :func:`stretch_modules` (nothing is compiled until called)."""
    # dynamic=None (torch's automatic dynamic shapes): compiled for the first cache length seen; when a longer chat
    # needs a bigger cache (a new decoder, lengths in multiples of 256), the changed dims are recompiled once as
    # dynamic, not once per length
    return [(m, torch.compile(m.forward, dynamic=None)) for m in stretch_modules(model)]
