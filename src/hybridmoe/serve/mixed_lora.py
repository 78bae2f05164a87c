"""Linear LoRA of several adapters in one forward: each batch row gets its own adapter's LoRA (or none).

In a mixed batch every PEFT LoRA Linear runs its base layer alone (LoRA disabled), and a forward hook adds, for each
adapter of the batch, that adapter's LoRA on that adapter's rows:

    out = where(row uses a, out + lora_B_a(lora_A_a(dropout_a(x))) · scaling_a, out)

which is PEFT's LoRA Linear math for one adapter (``result + lora_output.to(result.dtype)``), so each row gets the
value it gets alone, up to the rounding of other matmul shapes.

Why not PEFT's own mixed batches (``adapter_names=[...]``, ``_mixed_batch_forward``): it computes the same sum, but
gathers and scatters each adapter's rows with Python index lists in every layer: list-to-tensor conversions and
host-to-device copies of the indices in each of the model's LoRA layers, each step. Measured on one LoRA Linear
(CPU, 16 rows, two adapters): PEFT's mixed path ~2x the single-adapter forward, this one ~1x. Here each adapter
costs the two LoRA GEMMs over all rows (rank r: cheap) and a ``where`` with a mask built once per batch; no index
copies, no host synchronisation. The ``where`` (not a multiply by a 0/1 mask) keeps an adapter whose LoRA overflows
(inf, NaN) from reaching the other rows. PEFT's path is the reference in tests/test_mixed_adapters.py.

Which input rows belong to which batch row: a layer sees ``[B, T, ...]`` (attention projections) or ``[B·T, ...]``
(MoE blocks flatten their hidden states row-major before shared experts and routers), so input row ``i`` is batch
row ``i // T``. Only PEFT's LoRA ``Linear`` layers take part (hybridmoe targets plain ``nn.Linear`` layers only).
"""

from __future__ import annotations

import torch
from torch import nn


class RowAdapters:
    """The PEFT adapter name of each row of the next forward (None: the base model), for the LoRA layers' hooks."""

    def __init__(self, rows: list[str | None]) -> None:
        self.rows = rows
        self.adapters = list(dict.fromkeys(r for r in rows if r is not None))  # in order of first appearance
        self._masks: dict[tuple, torch.Tensor] = {}  # every layer of a forward asks for the same few masks

    def mask(self, adapter: str, n: int, ndim: int, device: torch.device) -> torch.Tensor:
        """bool ``[n, 1, ...]`` (``ndim`` dims) on ``device``: which of ``n`` input rows (B rows, or B·T tokens)
        use ``adapter``."""
        key = (adapter, n, ndim, device)
        m = self._masks.get(key)
        if m is None:
            b = len(self.rows)
            if n % b:
                raise RuntimeError(f"a LoRA layer got {n} input rows for a batch of {b} rows with per-row adapters")
            per_row = torch.tensor([r == adapter for r in self.rows])  # [B]
            m = self._masks[key] = per_row.repeat_interleave(n // b).view(n, *[1] * (ndim - 1)).to(device)
        return m

    def add_lora(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the base layer's output for input ``x``) plus each adapter's LoRA on that adapter's rows."""
        for a in self.adapters:
            if a not in layer.lora_A:  # the adapter does not target this layer
                continue
            lora_a = layer.lora_A[a]
            y = layer.lora_B[a](lora_a(layer.lora_dropout[a](x.to(lora_a.weight.dtype)))) * layer.scaling[a]
            out = torch.where(self.mask(a, x.shape[0], out.dim(), out.device), out + y.to(out.dtype), out)
        return out


class StaticRowAdapters(RowAdapters):
    """Per-row adapters for the batched CUDA-graph decoder (:mod:`hybridmoe.batch_decode`): a captured graph holds
    the masks' addresses and the list of adapters it adds, so here every loaded adapter is always added and its row
    mask is a row of one static device table ``[A, capacity]``, rewritten in place for each step's rows
    (:meth:`set_rows`). One graph then serves every mix of adapters; an adapter no row uses costs its two rank-r
    GEMMs over the batch and a ``where``."""

    def __init__(self, adapters: list[str], capacity: int, device: torch.device) -> None:
        super().__init__([])
        self.adapters = list(adapters)
        self.capacity = capacity
        self.table = torch.zeros(len(adapters), capacity, dtype=torch.bool, device=device)  # [A, C]

    def set_rows(self, rows: list[str | None]) -> None:
        """Row i uses ``rows[i]`` (a PEFT adapter name, or None: the base model); rows past ``len(rows)`` use none."""
        if len(rows) > self.capacity:
            raise RuntimeError(f"{len(rows)} rows for static row masks of {self.capacity}")
        host = torch.zeros(self.table.shape, dtype=torch.bool)  # [A, C]
        for i, r in enumerate(rows):
            if r is not None:
                host[self.adapters.index(r), i] = True
        self.table.copy_(host)
        self.rows = rows

    def mask(self, adapter: str, n: int, ndim: int, device: torch.device) -> torch.Tensor:
        if n > self.capacity:  # a decode step of a bucket feeds one token per row: n = the bucket's rows
            raise RuntimeError(f"a LoRA layer got {n} input rows for static row masks of {self.capacity}")
        return self.table[self.adapters.index(adapter), :n].view(n, *[1] * (ndim - 1))


def is_lora_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is a PEFT LoRA Linear (the only tuner layer :meth:`RowAdapters.add_lora` handles)."""
    from peft.tuners.lora import Linear as LoraLinear

    return isinstance(layer, LoraLinear)
