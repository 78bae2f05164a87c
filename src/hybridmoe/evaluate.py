"""Eval loss and perplexity: during training (val_size / eval_dataset) and as `hybridmoe eval`.

The loss is the token-level mean cross-entropy over every supervised (assistant) token of the eval set, the same
quantity the training loss averages per step; perplexity is its exp. Batches run without gradients and with
dropout off. With several ranks each rank takes every N-th batch and one all-reduce sums (Σ CE, tokens).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .data import IGNORE_INDEX, SFTDataset, collate
from .loss import causal_lm_loss


def _supervised(example: dict) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])  # the model shifts labels by one


@torch.no_grad()
def eval_loss(model, dataset: SFTDataset, batch_size: int, device: torch.device, pad_id: int, ctx=None) -> dict:
    """``{"eval_loss", "eval_perplexity", "eval_tokens", "eval_examples", "eval_seconds"}`` over `dataset`."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # dropout off; gradient checkpointing is skipped outside training
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None and ctx.enabled else (0, 1)
    # longest first: padding stays small and a too-large batch fails at once, not at the end
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    total = torch.zeros(2, dtype=torch.float64)  # [Σ CE, supervised tokens], cpu
    try:
        for idx in batches[rank::world]:
            examples = [dataset[i] for i in idx]
            batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
            # num_items_in_batch=1: the loss comes back as the batch's Σ CE (fp32), summed here in fp64
            total[0] += float(causal_lm_loss(model, batch, 1))
            total[1] += sum(_supervised(e) for e in examples)
    finally:
        model.train(was_training)
    if world > 1:
        ctx.all_reduce_sum(total, "the eval loss all-reduce")
    loss = float(total[0] / max(1.0, float(total[1])))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(total[1]),
            "eval_examples": len(dataset), "eval_seconds": round(time.perf_counter() - t0, 3)}


def run_eval(args) -> int:
    """`hybridmoe eval`: loss and perplexity of a model (+ adapter) on a dataset, printed and written as JSON."""
    from .adapters import base_model_of, load_adapter
    from .config import TrainConfig
    from .loading import load_model, load_tokenizer
    from .train_data import build_datasets

    tokenizer = load_tokenizer(args.model, args.chat_template)
    # the dataset keys of a training config, so names, dataset_info.json, templates and the cache work the same
    cfg = TrainConfig(model_name_or_path=args.model, dataset=args.dataset, output_dir=".", dataset_dir=args.dataset_dir,
                      template=args.template, cutoff_len=args.cutoff_len, max_samples=args.max_samples,
                      progress=False).validate()
    dataset = build_datasets(cfg, tokenizer).train
    model = load_model(args.model, device=args.device, dtype=args.dtype, expert_dtype=args.expert_dtype,
                       progress=False)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    device = base_model_of(model).hybridmoe.device
    result = eval_loss(model, dataset, args.batch_size, device, tokenizer.pad_token_id)
    result = {"model": str(args.model), "adapter": args.adapter, "dataset": args.dataset, **result}
    print(f"eval_loss {result['eval_loss']:.4f}  perplexity {result['eval_perplexity']:.3f}  "
          f"({result['eval_tokens']} supervised tokens in {result['eval_examples']} examples)")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0
