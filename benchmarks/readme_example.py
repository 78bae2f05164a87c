"""The README's Python example, run as written: the benchmark of the user entry points (issue 20).

    python benchmarks/readme_example.py --model /tmp/v2lite --adapter /tmp/v2lite/bench_adapter \
        --data /tmp/v2lite/bench_data.jsonl --train-steps 10

It reads the ```python block of README.md that calls ``hybridmoe.load`` and puts this machine's paths in place of the
README's: the model and adapter directories (no --adapter: the call without one), and for the ``hybridmoe.train``
line the model, --data and a temporary output directory as overrides next to the README's own (``max_steps`` becomes
--train-steps; --no-train leaves the line out). Nothing else of the code changes. It then runs the block statement by
statement, as a user's script would, and prints one JSON line per statement (its seconds; the tokens per second of
the two generate calls), then runs the two generate statements once more: a process's first generate sets up the
static decoder (on CUDA: captures its graphs), so the second is what every later reply sees. Printed text goes to
stderr.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_block(readme: Path) -> str:
    """The first ```python block of the README that calls hybridmoe.load."""
    for block in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S):
        if "hybridmoe.load(" in block:
            return block
    raise SystemExit(f"no ```python block calling hybridmoe.load( in {readme}")


class _Paths(ast.NodeTransformer):
    """The README's paths -> this machine's: hybridmoe.load's model (and adapter), hybridmoe.train's overrides."""

    def __init__(self, model: str, adapter: str | None, train_overrides: dict | None):
        self.model, self.adapter, self.train_overrides = model, adapter, train_overrides
        self.drop_train = train_overrides is None

    @staticmethod
    def _is(call: ast.Call, name: str) -> bool:
        f = call.func
        return isinstance(f, ast.Attribute) and f.attr == name and isinstance(f.value, ast.Name) \
            and f.value.id == "hybridmoe"

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        if self._is(node, "load"):
            node.args[0] = ast.Constant(self.model)
            node.keywords = [k for k in node.keywords if k.arg != "adapter"]
            if self.adapter is not None:
                node.keywords.append(ast.keyword("adapter", ast.Constant(self.adapter)))
        elif self._is(node, "train") and self.train_overrides is not None:
            config = ast.literal_eval(node.args[0])  # the README's YAML, relative to the repository
            readme = ast.literal_eval(node.args[1]) if len(node.args) > 1 else {}
            node.args = [ast.Constant(str(ROOT / config)),
                         ast.parse(repr({**readme, **self.train_overrides}), mode="eval").body]
        return node

    def visit_Expr(self, node: ast.Expr):
        self.generic_visit(node)
        if self.drop_train and isinstance(node.value, ast.Call) and self._is(node.value, "train"):
            return None
        return node


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _train_log(out: str) -> dict:
    """tokens/s of the hybridmoe.train line from its trainer_log.jsonl: the median of the logged windows after the
    first (which holds the first steps' setup), else the only one; and its peak GPU memory."""
    path = Path(out) / "trainer_log.jsonl"
    if not path.exists():
        return {}
    logs = [r for r in map(json.loads, path.read_text().splitlines()) if "tokens_per_s" in r]
    if not logs:
        return {}
    rates = sorted(r["tokens_per_s"] for r in (logs[1:] or logs))
    return {"train_tok_s": round(rates[len(rates) // 2], 1), "train_windows": len(logs),
            "peak_gpu_gib": logs[-1].get("peak_gpu_gib")}


def _run(stmt: ast.stmt, ns: dict, label: str, out: str = "") -> dict:
    code = compile(ast.Module([stmt], type_ignores=[]), "<README example>", "exec")
    _sync()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the example's prints and streamed text
        exec(code, ns)
    _sync()
    rec = {"bench": "readme_example", "call": label, "statement": ast.unparse(stmt)[:120],
           "seconds": round(time.perf_counter() - t0, 3)}
    src = ast.unparse(stmt)
    if "model.generate(" in src and "out" in ns and "enc" in ns:
        new = ns["out"].shape[1] - ns["enc"]["input_ids"].shape[1]
        rec.update(new_tokens=int(new), tok_s_incl_prefill=round(new / rec["seconds"], 2))
    elif "hybridmoe.train(" in src:
        rec.update(_train_log(out))
    elif "hybridmoe.generate(" in src and "res" in ns:
        res = ns["res"]
        rec.update(new_tokens=res.new_tokens, decode_tok_s=round(res.decode_tokens_per_s, 2),
                   prefill_s=round(res.prefill_s, 4), setup_s=round(getattr(res, "setup_s", 0.0), 3))
    return rec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory (the README's /models/...)")
    p.add_argument("--adapter", default=None, help="adapter directory (default: the load without one)")
    p.add_argument("--data", default=None, help="training data for the hybridmoe.train line")
    p.add_argument("--train-steps", type=int, default=10, help="max_steps of the hybridmoe.train line")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="more overrides for the hybridmoe.train line (e.g. device=cpu dtype=float32)")
    p.add_argument("--no-train", action="store_true", help="leave the hybridmoe.train line out")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args(argv)
    if not args.no_train and args.data is None:
        p.error("--data is needed for the hybridmoe.train line (or --no-train)")
    with tempfile.TemporaryDirectory() as out:
        overrides = None
        if not args.no_train:
            overrides = {"model_name_or_path": args.model, "dataset": args.data, "output_dir": out,
                         "max_steps": args.train_steps, "progress": False}
            for kv in args.train_override:
                key, _, value = kv.partition("=")
                overrides[key] = value
        tree = _Paths(args.model, args.adapter, overrides).visit(ast.parse(readme_block(Path(args.readme))))
        ast.fix_missing_locations(tree)
        ns: dict = {"__name__": "__readme__"}
        generates = []
        for stmt in tree.body:
            rec = _run(stmt, ns, "first", out)
            print(json.dumps(rec), flush=True)
            if "generate(" in rec["statement"]:
                generates.append(stmt)
        for stmt in generates:  # what every later reply sees
            print(json.dumps(_run(stmt, ns, "again")), flush=True)


if __name__ == "__main__":
    main()
