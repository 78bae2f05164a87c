"""Tokenizing SFT conversations with worker processes: hybridmoe's process pool against `datasets.map(num_proc=N)`.

    python benchmarks/tokenize_workers.py --records 20000 --workers 1 2 4 8 [--tokenizer /models/Qwen3-30B-A3B]

Prints one JSON line per (method, workers): records/s and seconds, plus the cache-hit time. Without --tokenizer the
small offline test tokenizer (ChatML template) is used; rendering the Jinja template dominates either way. `datasets`
is only needed for its rows (pip install datasets); the check that both give identical ids is part of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def conversations(n: int):
    from hybridmoe.data import Conversation

    out = []
    for i in range(n):
        c = Conversation([{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": f"Question {i}: what is {i} times {i % 17}? Explain briefly."},
                          {"role": "assistant", "content": f"{i} times {i % 17} is {i * (i % 17)}. " * (1 + i % 4)}])
        out.append(c)
    return out


def with_datasets(convs, tokenizer, options, workers: int):
    from datasets import Dataset, disable_caching

    from hybridmoe.data import tokenize_conversation

    disable_caching()  # measure the work, not Arrow's cache

    def fn(row):
        ex = tokenize_conversation(tokenizer, row["messages"], options)
        return {"input_ids": ex["input_ids"], "labels": ex["labels"], "truncated": ex["truncated"]}

    ds = Dataset.from_list([{"messages": list(c)} for c in convs])
    out = ds.map(fn, num_proc=workers if workers > 1 else None, remove_columns=["messages"])
    return [dict(r) for r in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer", default=None)
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    from hybridmoe import tokenize_cache
    from hybridmoe.data import TokenizeOptions

    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from hybridmoe.testing import build_tokenizer

        tok = build_tokenizer()
    convs, opts = conversations(args.records), TokenizeOptions(2048)
    base = {"records": args.records, "cpus": os.cpu_count(), "host": platform.node(),
            "tokenizer": args.tokenizer or "hybridmoe.testing"}
    reference = None
    for w in args.workers:
        for method in ("hybridmoe_pool", "datasets_map"):
            t0 = time.perf_counter()
            try:
                got = (tokenize_cache.tokenize_all(convs, tok, opts, w) if method == "hybridmoe_pool"
                       else with_datasets(convs, tok, opts, w))
            except ImportError as e:
                print(json.dumps({**base, "method": method, "workers": w, "skipped": str(e)}))
                continue
            s = time.perf_counter() - t0
            reference = reference or got
            same = [(r["input_ids"], r["labels"]) for r in got] == [(r["input_ids"], r["labels"]) for r in reference]
            print(json.dumps({**base, "method": method, "workers": w, "seconds": round(s, 2),
                              "records_per_s": round(args.records / s), "same_ids": same}), flush=True)
    with tempfile.TemporaryDirectory() as d:
        os.environ["HYBRIDMOE_CACHE"] = d
        tokenize_cache.tokenize_cached(convs, tok, opts, max(args.workers))
        t0 = time.perf_counter()
        tokenize_cache.tokenize_cached(convs, tok, opts)
        print(json.dumps({**base, "method": "cache_hit", "seconds": round(time.perf_counter() - t0, 3)}))


if __name__ == "__main__":
    main()
