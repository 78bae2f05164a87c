"""Per-row routed-expert LoRA: rows of one inference batch that use different adapters (or none).

The server decodes requests of several adapters, and of the base model, in one forward (``hybridmoe.serve``). The
Linear LoRA layers add each row's adapter LoRA (``hybridmoe.serve.mixed_lora``); for the routed experts, whose LoRA
is the ``HybridExperts.lora`` dict (one adapter for every token), the server sets ``HybridExperts.row_lora`` to a
:class:`RowLoRA` for the forward: which LoRA dict each batch row uses.

The experts block then runs its usual computation once per group of tokens that share a LoRA (base rows with none),
with ``HybridExperts.lora`` pointing at that group's dict, and scatters the results back. Each token's result is the
one it gets when its group runs alone: a token's expert output never depends on the other tokens of the call. The
cost is that an expert picked by tokens of two groups has its weights read twice in that step, against one batch
per adapter taking turns (every row waits for every other group's step).

Which token belongs to which row: a transformers MoE block flattens its hidden states ``[B, T, H]`` row-major to
``[B·T, H]`` before its experts block, so token ``i`` is row ``i // T``.

Inference only: autograd's backward of the experts (``_ExpertsFn``) reads ``HybridExperts.lora`` again, when the
per-group dict is no longer set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backends import choose_backend


class RowLoRA:
    """The expert LoRA of each row of a batch of ``B`` sequences, for one experts block.

    ``rows[i]`` is row i's ``{projection: ExpertLoRA}`` dict (empty for the base model). Rows whose dicts hold the
    same LoRA objects form one group, so adapters without routed-expert LoRA compute with the base rows.
    """

    def __init__(self, rows: list[dict]) -> None:
        self.loras: list[dict] = []  # one dict per group, in order of first appearance
        keys: list[tuple] = []
        groups = []
        for lora in rows:
            key = tuple(sorted((proj, id(lo)) for proj, lo in lora.items()))
            if key not in keys:
                keys.append(key)
                self.loras.append(lora)
            groups.append(keys.index(key))
        self.row_group = torch.tensor(groups, dtype=torch.long)  # [B] cpu
        self._tokens: dict[int, torch.Tensor] = {}  # token count -> [T] group per token
        # (token count, device) -> the parts of a call: (group's LoRA dict, its token indices); every layer of a
        # forward asks for the same ones
        self._parts: dict[tuple[int, torch.device], list[tuple[dict, torch.Tensor]]] = {}

    @property
    def rows(self) -> int:
        return len(self.row_group)

    def token_groups(self, tokens: int) -> torch.Tensor:
        """The group of each token of the flattened batch ([B·T] hidden states, row-major): int64 [tokens], CPU."""
        out = self._tokens.get(tokens)
        if out is None:
            if tokens % self.rows:
                raise RuntimeError(f"an experts block got {tokens} tokens for a batch of {self.rows} rows with "
                                   "per-row LoRA; the MoE block does not flatten [B, T, H] row-major")
            out = self._tokens[tokens] = self.row_group.repeat_interleave(tokens // self.rows)
        return out

    def split(self, groups: torch.Tensor, device: torch.device) -> list[tuple[dict, torch.Tensor]]:
        """(LoRA dict, indices on ``device``) per group present in ``groups`` (the group of each row, int64 CPU)."""
        return [(self.loras[g], (groups == g).nonzero().flatten().to(device)) for g in groups.unique().tolist()]

    def forward(self, module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                groups: torch.Tensor | None, compute: Callable) -> torch.Tensor:
        """The experts call ``compute(hidden, top_k_index, top_k_weights, whole=T)`` -> [n, H] once per group, with
        ``module.lora`` set to the group's dict; the results in row order, on ``hidden``'s device.

        ``groups``: the group of each row of ``hidden`` (int64 CPU); None: rows are the tokens of the flattened batch.
        Where the whole call would compute on the CPU (the kernel or the torch loop), the activations cross to the
        CPU once for all groups, not once per group; where it streams the weights, everything stays on the device.
        """
        if torch.is_grad_enabled():
            raise RuntimeError("per-row expert LoRA (HybridExperts.row_lora) is for inference only; clear it before "
                               "a forward with gradients")
        t, device = hidden.shape[0], hidden.device
        where = device
        if device.type != "cpu" and choose_backend(module, t, grad=False) in ("kernel", "cpu"):
            where = torch.device("cpu")
            hidden, top_k_index, top_k_weights = (x.to(where) for x in (hidden, top_k_index, top_k_weights))
        if groups is not None:
            parts = self.split(groups, where)
        else:
            parts = self._parts.get((t, where))
            if parts is None:
                parts = self._parts[(t, where)] = self.split(self.token_groups(t), where)
        saved = module.lora
        try:
            if len(parts) <= 1:  # one group (e.g. adapters without expert LoRA), or no tokens: no gather
                module.lora = parts[0][0] if parts else saved
                return compute(hidden, top_k_index, top_k_weights, whole=t).to(device)
            out = None
            for lora, idx in parts:
                module.lora = lora
                y = compute(hidden[idx], top_k_index[idx], top_k_weights[idx], whole=t)  # [n, H]
                if out is None:
                    out = y.new_empty(t, y.shape[1])  # [T, H]
                out[idx] = y
            return out.to(device)
        finally:
            module.lora = saved
