"""Several LoRA adapters on one base model, chosen per batch row without reloading or copying weights.

Every adapter is loaded once, with :func:`hybridmoe.adapters.load_adapter` under its own name:

* its Linear LoRA (attention, dense MLPs, shared experts) becomes a named PEFT adapter on the compute device;
* its routed-expert LoRA is one ``{projection: ExpertLoRA}`` dict per ``HybridExperts`` block, in CPU RAM.

:meth:`AdapterSet.use` gives the next forward one adapter (or the base model) per batch row:

* every row the same: :meth:`AdapterSet.activate` points every PEFT LoRA layer at that adapter (or disables LoRA,
  for the base model) and sets each ``HybridExperts.lora`` to its dict: PEFT's and the experts' plain paths, so a
  batch of one adapter computes exactly what it did before mixed batches existed;
* rows of different adapters: every PEFT LoRA layer runs its base layer and a forward hook of ours adds each
  adapter's LoRA on that adapter's rows (:mod:`hybridmoe.serve.mixed_lora`; PEFT's own ``adapter_names`` path
  computes the same and is the tests' reference), and each ``HybridExperts.row_lora`` says which expert LoRA each
  row uses (:mod:`hybridmoe.experts.row_lora`).

A switch is one Python pass over the LoRA layers; no tensor moves. Layers an adapter does not target have no weights
under its name, and are skipped.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from hybridmoe.adapters import base_model_of, load_adapter
from hybridmoe.decode_graph import close_batch_decoder, drop_decoder
from hybridmoe.experts import HybridExperts
from hybridmoe.experts.row_lora import RowLoRA

from .mixed_lora import RowAdapters, StaticRowAdapters, is_lora_linear


class AdapterSet:
    """The base model plus named adapters; ``model`` is the module to call (a PeftModel once any adapter has
    Linear LoRA)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        base = base_model_of(model)
        self.experts = {n: m for n, m in base.named_modules() if isinstance(m, HybridExperts)}
        self.expert_lora: dict[str, dict[str, dict]] = {}  # adapter -> experts module name -> {proj: ExpertLoRA}
        self._peft_name: dict[str, str] = {}  # served name -> its PEFT adapter name (differs after a reload)
        self._tuner_layers: list[nn.Module] = []
        self._hooks: list = []  # our forward hooks on the PEFT LoRA layers (per-row LoRA in mixed batches)
        # None = the base model, no LoRA; a tuple = one name per batch row (a mixed batch)
        self.active: str | tuple[str | None, ...] | None = None
        self._rows: RowAdapters | None = None  # while a mixed batch is active: each row's PEFT adapter
        self._zombies: list[str] = []  # PEFT adapters unloaded while they were PEFT's last one (see unload)
        self._static: StaticRowAdapters | None = None  # the batched graph decoder's row masks (see use_static)

    @property
    def names(self) -> list[str]:
        return list(self.expert_lora)

    def load(self, name: str, adapter_dir: str | os.PathLike) -> None:
        """Load one adapter under ``name``; raises AdapterError / NonFiniteError (one line) if it does not fit."""
        # PEFT keys modules by adapter name, and torch module names cannot hold "." (served names like
        # "org/model.v2" can); a zombie of an unloaded adapter may also still hold the name in PEFT. The "served-"
        # prefix: PEFT matches state-dict keys by substring and warns that a name inside its "lora_" prefix (a served
        # name like "a" or "lo") may re-initialize the adapter's weights on loading.
        safe = "served-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)
        peft_name, k = safe, 1
        while peft_name in self._peft_configs() or peft_name in self._peft_name.values():
            peft_name, k = f"{safe}-{k}", k + 1
        drop_decoder(self.model)  # captured decode graphs hold the current adapters' weights
        self._static = None
        for ex in self.experts.values():  # load_adapter fills ex.lora; start each adapter from empty dicts
            ex.lora = {}
        self.model = load_adapter(self.model, adapter_dir, adapter_name=peft_name)
        self.expert_lora[name] = {n: ex.lora for n, ex in self.experts.items()}
        self._peft_name[name] = peft_name
        self._bury_zombies()
        self._apply(None)  # PEFT activates layers it just created for `name`; put everything back to the base

    def unload(self, name: str) -> None:
        """Forget adapter ``name``: its PEFT LoRA weights are deleted, its expert LoRA dicts dropped."""
        peft_name = self._peft_name.pop(name)
        drop_decoder(self.model)
        self._static = None
        if peft_name in self._peft_configs():
            # PEFT cannot delete a PeftModel's last adapter (its forward then fails); that one stays, disabled and
            # unreachable, until a later load adds another
            self._zombies.append(peft_name)
            self._bury_zombies()
        del self.expert_lora[name]
        self._apply(None)  # delete_adapter activates what is left; put everything back to the base

    def _peft_configs(self) -> dict:
        return getattr(self.model, "peft_config", None) or {}

    def _bury_zombies(self) -> None:
        """Delete unloaded PEFT adapters while another one remains; refresh the list of LoRA layers."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for z in list(self._zombies):
            if z in self._peft_configs() and len(self._peft_configs()) > 1:
                self.model.delete_adapter(z)
                self._zombies.remove(z)
        self._tuner_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        for h in self._hooks:
            h.remove()
        self._hooks = [layer.register_forward_hook(self._mixed_lora_hook, with_kwargs=True)
                       for layer in self._tuner_layers if is_lora_linear(layer)]

    def _mixed_lora_hook(self, layer: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor):
        """In a mixed batch, add each row's adapter LoRA to a LoRA Linear's base output (nothing otherwise)."""
        if self._rows is None:
            return None
        return self._rows.add_lora(layer, args[0] if args else kwargs["x"], out)

    def activate(self, name: str | None) -> None:
        """Make ``name`` (an adapter, or None for the base model) the one the next forward uses."""
        if name != self.active:
            self._apply(name)

    def use(self, rows: list[str | None]) -> None:
        """Make the next forward run batch row i with adapter ``rows[i]`` (None: the base model)."""
        first = rows[0]
        if all(r == first for r in rows):
            self.activate(first)
            return
        key = tuple(rows)
        if key == self.active:
            return
        if len(self._hooks) != len(self._tuner_layers):
            raise RuntimeError("mixed-adapter batches support LoRA on Linear layers only")
        self._apply(None)  # every LoRA layer computes its base layer only; the hooks add the rows' LoRA
        self._rows = RowAdapters([self._peft_name[r] if r is not None else None for r in rows])
        for module_name, ex in self.experts.items():
            ex.row_lora = RowLoRA([self.expert_lora[r][module_name] if r is not None else {} for r in rows])
        self.active = key

    @property
    def expert_lora_loaded(self) -> bool:
        """Whether some loaded adapter has routed-expert LoRA."""
        return any(lora for per_module in self.expert_lora.values() for lora in per_module.values())

    def use_static(self, rows: list[str | None], capacity: int, device: torch.device) -> None:
        """Like :meth:`use`, for a step of the batched graph decoder (:mod:`hybridmoe.batch_decode`), whose captured
        graphs must run the same ops for every mix of adapters: every loaded adapter's Linear LoRA is added on every
        row through :class:`StaticRowAdapters` (the masks rewritten in place), whatever the rows. Routed-expert LoRA
        is per row: in the CPU part as in :meth:`use`, and through the same static masks in resident layers computed
        on the device (``HybridExperts.graph_lora``)."""
        if len(self._hooks) != len(self._tuner_layers):
            raise RuntimeError("mixed-adapter batches support LoRA on Linear layers only")
        if self._static is None or self._static.capacity != capacity:
            if self._static is not None:  # a batch decoder's graphs would read the old table
                close_batch_decoder(self.model)
            self._static = StaticRowAdapters(list(self._peft_name.values()), capacity, device)
            self.active = None
        key = ("static", *rows)
        if key == self.active:
            return
        self._apply(None)  # every LoRA layer computes its base layer only; the hooks add the rows' LoRA
        self._static.set_rows([self._peft_name[r] if r is not None else None for r in rows])
        self._rows = self._static
        if self.expert_lora_loaded:
            names = list(self._peft_name)  # served names, in the order of the table's rows
            for module_name, ex in self.experts.items():
                ex.row_lora = RowLoRA([self.expert_lora[r][module_name] if r is not None else {} for r in rows])
                ex.graph_lora = [(self.expert_lora[n][module_name], self._static.table[i])
                                 for i, n in enumerate(names) if self.expert_lora[n][module_name]]
        self.active = key

    def _apply(self, name: str | None) -> None:
        self._rows = None
        for ex in self.experts.values():
            ex.row_lora = ex.graph_lora = None
        for layer in self._tuner_layers:
            layer.enable_adapters(name is not None)
            if name is not None:
                # inference_mode: no requires_grad on LoRA weights
                layer.set_adapter(self._peft_name[name], inference_mode=True)
        for module_name, ex in self.experts.items():
            # a fresh dict per switch: nothing that later mutates ex.lora can reach the stored adapter's dict
            ex.lora = dict(self.expert_lora[name][module_name]) if name is not None else {}
        self.active = name
