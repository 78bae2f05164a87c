"""Test helpers: tiny checkpoints with a tokenizer, small SFT datasets, LoRA randomisation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hybridmoe.experts import HybridExperts
from hybridmoe.testing import build_tokenizer, save_tiny_model


def make_checkpoint(arch: str, path: Path, **overrides) -> Path:
    tok = build_tokenizer()
    save_tiny_model(arch, path, tokenizer=tok, vocab_size=len(tok), **overrides)
    return path


def write_dataset(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            rec = {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                {"role": "assistant", "content": f"It is {2 * i}."}]}
            f.write(json.dumps(rec) + "\n")
    return path


def randomize_lora(model, seed: int, scale: float = 0.1) -> None:
    """LoRA B starts at zero; give every B random values so the adapter changes outputs and gradients reach A."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for m in model.modules():
            if isinstance(m, HybridExperts):
                for lo in m.lora.values():
                    lo.B.copy_(torch.randn(lo.B.shape, generator=g) * scale)


def read_log(out: Path, running: bool = False) -> list[dict]:
    """trainer_log.jsonl: the history of the adapter in `out`; running=True: the log of a run that did not finish."""
    name = "trainer_log.running.jsonl" if running else "trainer_log.jsonl"
    return [json.loads(line) for line in (out / name).read_text().splitlines()]
