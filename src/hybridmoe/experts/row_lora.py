"""Per-row routed-expert LoRA: rows of one inference batch that use different adapters (or none).

The server decodes requests of several adapters, and of the base model, in one forward (``hybridmoe.serve``). The
Linear LoRA layers handle such a batch through PEFT's ``adapter_names``; for the routed experts, whose LoRA is the
``HybridExperts.lora`` dict (one adapter for every token), the server sets ``HybridExperts.row_lora`` to a
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
        self._tokens: dict[int, torch.Tensor] = {}  # token count -> [T] group per token (prefill chunks repeat)

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

    def run(self, module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
            groups: torch.Tensor, compute: Callable) -> torch.Tensor:
        """``compute(hidden, top_k_index, top_k_weights)`` [n, H] once per group of ``groups`` (the group of each
        row of ``hidden``, int64 CPU), with ``module.lora`` set to that group's dict; the results in row order."""
        if torch.is_grad_enabled():
            raise RuntimeError("per-row expert LoRA (HybridExperts.row_lora) is for inference only; clear it before "
                               "a forward with gradients")
        present = groups.unique().tolist()
        if not present:  # no tokens (a dense-dispatch layer where no expert was picked)
            return compute(hidden, top_k_index, top_k_weights)
        saved = module.lora
        try:
            if len(present) == 1:  # every token in one group (e.g. adapters without expert LoRA): no gather
                module.lora = self.loras[present[0]]
                return compute(hidden, top_k_index, top_k_weights)
            out = None
            for g in present:
                idx = (groups == g).nonzero().flatten().to(hidden.device)  # [n]
                module.lora = self.loras[g]
                y = compute(hidden[idx], top_k_index[idx], top_k_weights[idx])  # [n, H]
                if out is None:
                    out = y.new_empty(hidden.shape[0], y.shape[1])  # [T, H]
                out[idx] = y
            return out
        finally:
            module.lora = saved
