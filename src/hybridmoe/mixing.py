"""`mix_strategy: interleave_*`: several datasets interleaved the way LLaMA-Factory does it.

LLaMA-Factory's merge_dataset hands the datasets to ``datasets.interleave_datasets`` with
``stopping_strategy`` first_exhausted (interleave_under), all_exhausted (interleave_over) or
all_exhausted_without_replacement (interleave_once), ``probabilities=interleave_probs`` and the training seed.
This module computes the same order without Arrow, record for record: without probabilities the sources take turns;
with them, each next record's source is drawn from ``numpy.random.default_rng(seed)`` in blocks of 1000 draws,
exactly as ``datasets`` (5.x, map-style) draws them, so a seed gives the records LLaMA-Factory would train on.

- under: stop as soon as one source has given all its records (the last one included);
- over: stop once every source has given all its records; a source that runs out starts again from its first;
- once: every record of every source exactly once; a source that runs out is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .errors import ConfigError

STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
            "interleave_once": "all_exhausted_without_replacement"}
_BLOCK = 1000  # draws per rng.choice call (as datasets; the stream of draws does not depend on it)


def check_probs(probs: Sequence[float], n_datasets: int, key: str) -> None:
    """Raise a ConfigError unless `probs` is a probability per dataset of `key`, summing to 1."""
    if len(probs) != n_datasets:
        raise ConfigError(f"interleave_probs has {len(probs)} values but {key} names {n_datasets} "
                          f"dataset{'s' if n_datasets != 1 else ''}; give one probability per dataset, in the same "
                          "order")
    if any(p < 0 for p in probs):
        raise ConfigError(f"interleave_probs {list(probs)} has a negative value; probabilities are >= 0")
    # numpy's own tolerance in Generator.choice (sqrt of float64 eps): a sum it would refuse is refused here first
    if abs(sum(probs) - 1.0) > 1.5e-8:
        raise ConfigError(f"interleave_probs {list(probs)} sum to {sum(probs):g}, not 1; scale them to sum to 1")


def _draws(n: int, probs: Sequence[float], seed: int | None) -> Iterator[int]:
    import numpy as np  # required by transformers and peft anyway; its PCG64 stream is the one datasets draws

    rng = np.random.default_rng(seed)
    while True:
        yield from (int(i) for i in rng.choice(n, size=_BLOCK, p=list(probs)))


def interleave_order(lengths: Sequence[int], strategy: str, probs: Sequence[float] | None = None,
                     seed: int | None = 42) -> list[tuple[int, int]]:
    """(source, record index) pairs of the interleaved dataset, in order.

    Raises:
        ConfigError: a source that can be drawn is empty, or (over/once) a source has probability 0 and could never
        be exhausted (``datasets`` would loop forever or fail there).
    """
    if strategy not in STOPPING:
        raise ValueError(f"not an interleave strategy: {strategy}")
    n = len(lengths)
    drawable = [probs is None or p > 0 for p in (probs or [1.0] * n)]
    empty = [i for i in range(n) if lengths[i] == 0 and drawable[i]]
    if empty:
        raise ConfigError(f"mix_strategy {strategy}: dataset #{empty[0] + 1} of the list has no records; remove it")
    if strategy != "interleave_under" and not all(drawable):
        raise ConfigError(f"mix_strategy {strategy} must take every record of every dataset, but dataset "
                          f"#{drawable.index(False) + 1} has interleave_probs 0; remove it or give it a probability")
    if probs is None:  # round robin: record k of every source, then record k + 1, ...
        if strategy == "interleave_under":
            return [(s, k) for k in range(min(lengths)) for s in range(n)]
        if strategy == "interleave_over":
            return [(s, k % lengths[s]) for k in range(max(lengths)) for s in range(n)]
        return [(s, k) for k in range(max(lengths)) for s in range(n) if k < lengths[s]]

    order: list[tuple[int, int]] = []
    taken = [0] * n  # records given by each source so far
    if strategy == "interleave_once":  # (every source is drawable here: checked above)
        done = [False] * n
        for s in _draws(n, probs, seed):
            if all(done):
                break
            if not done[s]:
                order.append((s, taken[s]))
                taken[s] += 1
                done[s] = taken[s] >= lengths[s]
        return order
    exhausted = [False] * n
    for s in _draws(n, probs, seed):
        order.append((s, taken[s] % lengths[s]))  # over: a source that ran out starts again from its first record
        taken[s] += 1
        exhausted[s] = exhausted[s] or taken[s] >= lengths[s]
        if any(exhausted) if strategy == "interleave_under" else all(exhausted):
            return order
    raise AssertionError("unreachable")  # _draws is endless


def interleave(sources: list[list], strategy: str, probs: Sequence[float] | None, seed: int | None) -> list:
    """The records of `sources` interleaved (see :func:`interleave_order`)."""
    return [sources[s][i] for s, i in interleave_order([len(x) for x in sources], strategy, probs, seed)]

