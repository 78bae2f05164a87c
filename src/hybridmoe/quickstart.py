"""`hybridmoe quickstart`: an offline end-to-end demo that runs on any machine (the CPU when there is no GPU).

1. Builds a small DeepSeek-V2-architecture MoE (a dense first layer, shared experts, 8 routed experts, top-2) and a
   byte-level BPE tokenizer from the text shipped in ``hybridmoe/assets``, and pre-trains it briefly on that corpus
   and on generic chat dialogues, so that its replies are words. The result is cached in ``OUTPUT/base``.
2. LoRA fine-tunes it with :func:`hybridmoe.train` on the shipped identity dataset (``assets/identity.jsonl``),
   writing ``OUTPUT/adapter``.
3. Answers every training question greedily before and after, through :func:`hybridmoe.load` and
   :func:`hybridmoe.chat.reply`, prints the exact-match accuracy and the adapter's health
   (:func:`hybridmoe.inspect.inspect_adapter`), and ends with the commands to chat with the result.

Logs and progress bars go to stderr; the summary goes to stdout. ``fast=True`` is a smaller, quicker run for tests.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ASSETS = "assets"
BASE_MARKER = "quickstart_base.json"  # written last: its presence means OUTPUT/base is complete
IM_END_ID = 3  # <|im_end|> of hybridmoe.testing.build_tokenizer: the end of an assistant turn
GOAL = 0.9  # exact-match accuracy the fine-tuned adapter must reach


@dataclass(frozen=True)
class BaseRecipe:
    """The base model: its architecture and how long it is pre-trained."""

    vocab_size: int = 1024
    hidden_size: int = 128
    num_hidden_layers: int = 3
    intermediate_size: int = 256
    moe_intermediate_size: int = 64
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    num_attention_heads: int = 4
    kv_lora_rank: int = 32
    head_dim: int = 16  # qk_nope_head_dim = qk_rope_head_dim = v_head_dim
    block_len: int = 128
    batch_size: int = 8
    steps: int = 400
    learning_rate: float = 6e-3
    warmup_steps: int = 20
    seed: int = 0

    def same_model(self, other: BaseRecipe) -> bool:
        """Same architecture, tokenizer and pre-training settings; only the number of steps may differ."""
        mine, theirs = asdict(self), asdict(other)
        for key in ("steps",):
            mine.pop(key)
            theirs.pop(key)
        return mine == theirs


@dataclass(frozen=True)
class Recipe:
    """One quickstart run: the base model, the fine-tune and the evaluation."""

    base: BaseRecipe
    identity_pairs: int  # how many of the shipped identity Q/A pairs to train on (0: all)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 5e-3
    max_steps: int = 200
    batch_size: int = 8
    max_new_tokens: int = 40
    shown: int = 5  # before/after replies printed


FULL = Recipe(base=BaseRecipe(), identity_pairs=0)
FAST = Recipe(base=BaseRecipe(steps=150), identity_pairs=8, max_steps=150)


# --------------------------------------------------------------------------------------------------------------------
# Assets
# --------------------------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def asset_path(name: str) -> Path:
    """Path of a file shipped in ``hybridmoe/assets`` (the package is installed as plain files)."""
    return Path(str(resources.files("hybridmoe").joinpath(ASSETS, name)))


def read_lines(name: str) -> list[str]:
    """Non-empty stripped lines of a shipped text asset."""
    return [line.strip() for line in asset_path(name).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_conversations(path: Path) -> list[list[dict]]:
    """The ``messages`` lists of an OpenAI-format JSONL file."""
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------------------
# The base model: tokenizer, config, pre-training, cache
# --------------------------------------------------------------------------------------------------------------------


def build_config(recipe: BaseRecipe, vocab_size: int) -> PretrainedConfig:
    """A small DeepSeek-V2 config: dense first layer, shared + routed experts; EOS = end of text or end of turn."""
    from .testing import tiny_config

    return tiny_config(
        "deepseek_v2", vocab_size=vocab_size, hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers, intermediate_size=recipe.intermediate_size,
        moe_intermediate_size=recipe.moe_intermediate_size, n_routed_experts=recipe.n_routed_experts,
        num_experts_per_tok=recipe.num_experts_per_tok, n_shared_experts=recipe.n_shared_experts,
        first_k_dense_replace=1, num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_attention_heads, kv_lora_rank=recipe.kv_lora_rank,
        qk_rope_head_dim=recipe.head_dim, qk_nope_head_dim=recipe.head_dim, v_head_dim=recipe.head_dim,
        max_position_embeddings=2048, initializer_range=0.02,
        # Generation must stop at <|im_end|> as well as at <|end_of_text|>: hybridmoe's loader builds the
        # generation config from config.json, so the list goes here (and into generation_config.json).
        bos_token_id=0, eos_token_id=[1, IM_END_ID], pad_token_id=1,
    )


def pretraining_documents(tokenizer: Any, corpus: list[str], dialogues: list[list[dict]]) -> list[list[int]]:
    """Token ids of every pre-training document: corpus lines and chat-formatted dialogues, each ending in EOS.

    Dialogues are listed twice: chatting is what the quickstart shows, the corpus is there for words.
    """
    eos = tokenizer.eos_token_id
    texts = list(corpus)
    chats = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in dialogues]
    texts += chats + chats
    return [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]


def pack_blocks(documents: list[list[int]], block_len: int, rng: random.Random) -> torch.Tensor:
    """Shuffle the documents, concatenate them and cut the stream into blocks: int64 [N, block_len]."""
    order = list(range(len(documents)))
    rng.shuffle(order)
    stream = [token for i in order for token in documents[i]]
    n_blocks = max(1, len(stream) // block_len)
    stream = (stream * math.ceil(n_blocks * block_len / max(1, len(stream))))[: n_blocks * block_len]
    return torch.tensor(stream, dtype=torch.long).view(n_blocks, block_len)


def training_batches(documents: list[list[int]], recipe: BaseRecipe) -> Iterator[torch.Tensor]:
    """Endless batches [batch_size, block_len] of packed blocks, reshuffled every epoch."""
    rng = random.Random(recipe.seed)
    while True:
        blocks = pack_blocks(documents, recipe.block_len, rng)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        for start in range(0, len(blocks), recipe.batch_size):
            yield blocks[order[start:start + recipe.batch_size]]


def warmup_cosine(recipe: BaseRecipe) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to 10%."""

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def pretrain(model: torch.nn.Module, documents: list[list[int]], recipe: BaseRecipe) -> float:
    """Next-token pre-training of the full transformers model with AdamW; returns the last smoothed loss."""
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(recipe))
    batches = training_batches(documents, recipe)
    model.train()
    smoothed = float("nan")
    with tqdm(total=recipe.steps, desc="Pre-training base", unit="step", file=sys.stderr) as bar:
        for _ in range(recipe.steps):
            ids = next(batches)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.detach().item()
            smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
            bar.set_postfix(loss=f"{smoothed:.3f}")
            bar.update(1)
    model.eval()
    return smoothed


def cached_base(base_dir: Path, recipe: BaseRecipe) -> bool:
    """True when ``base_dir`` holds a complete base built with the same architecture and at least as much training."""
    marker = base_dir / BASE_MARKER
    if not marker.is_file():
        return False
    try:
        cached = BaseRecipe(**json.loads(marker.read_text())["recipe"])
    except (ValueError, TypeError, KeyError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return cached.same_model(recipe) and cached.steps >= recipe.steps and all((base_dir / f).is_file() for f in files)


def build_base(base_dir: Path, recipe: BaseRecipe) -> None:
    """Train the tokenizer, pre-train the model and save both into ``base_dir`` (atomically, via a temp dir)."""
    from transformers import AutoModelForCausalLM

    from .testing import build_tokenizer

    corpus = read_lines("corpus.txt")
    dialogues = read_conversations(asset_path("dialogues.jsonl"))
    chats = [" ".join(m["content"] for m in messages) for messages in dialogues]
    tokenizer = build_tokenizer(corpus + chats, vocab_size=recipe.vocab_size)
    config = build_config(recipe, len(tokenizer))
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    documents = pretraining_documents(tokenizer, corpus, dialogues)
    log(f"pre-training a {n_params / 1e6:.2f}M-parameter DeepSeek-V2 MoE ({config.num_hidden_layers} layers, "
        f"{config.n_routed_experts} routed experts top-{config.num_experts_per_tok}, {config.n_shared_experts} shared; "
        f"vocabulary {len(tokenizer)}) on {sum(map(len, documents)):,} tokens for {recipe.steps} steps")
    start = time.perf_counter()
    loss = pretrain(model, documents, recipe)
    seconds = time.perf_counter() - start
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, IM_END_ID]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = base_dir.with_name(base_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    marker = {"recipe": asdict(recipe), "final_loss": loss, "seconds": round(seconds, 1), "params": n_params}
    (tmp / BASE_MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(base_dir, ignore_errors=True)
    tmp.rename(base_dir)
    log(f"base model saved to {base_dir} (loss {loss:.3f}, {seconds:.0f}s)")


def ensure_base(base_dir: Path, recipe: BaseRecipe) -> bool:
    """Build the base model unless a complete one is cached; returns True when it was built."""
    if cached_base(base_dir, recipe):
        log(f"reusing the cached base model in {base_dir}")
        return False
    build_base(base_dir, recipe)
    return True


# --------------------------------------------------------------------------------------------------------------------
# Fine-tuning and evaluation through the public API
# --------------------------------------------------------------------------------------------------------------------


def compute_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def identity_dataset(output: Path, recipe: Recipe) -> Path:
    """The identity dataset to train on: the shipped file, or (fast mode) a subset of it written under ``output``."""
    shipped = asset_path("identity.jsonl")
    if recipe.identity_pairs <= 0:
        return shipped
    lines = [line for line in shipped.read_text(encoding="utf-8").splitlines() if line.strip()]
    subset = output / "identity_subset.jsonl"
    subset.write_text("\n".join(lines[: recipe.identity_pairs]) + "\n", encoding="utf-8")
    return subset


def finetune(base_dir: Path, adapter_dir: Path, dataset: Path, recipe: Recipe, device: str) -> None:
    """LoRA SFT with :func:`hybridmoe.train`, exactly as ``hybridmoe train`` would run it."""
    import hybridmoe

    hybridmoe.train({
        "model_name_or_path": str(base_dir),
        "dataset": str(dataset),
        "output_dir": str(adapter_dir),
        "lora_target": "all",
        "lora_rank": recipe.lora_rank,
        "lora_alpha": recipe.lora_alpha,
        "learning_rate": recipe.learning_rate,
        "max_steps": recipe.max_steps,
        "per_device_train_batch_size": recipe.batch_size,
        "warmup_steps": 5,
        "lr_scheduler_type": "cosine",
        "gradient_checkpointing": False,
        "logging_steps": 5,
        "cutoff_len": 256,
        "device": device,
        "dtype": "float32",
        "seed": 0,
    })


def answer_all(base_dir: Path, adapter_dir: Path | None, questions: list[str], recipe: Recipe,
               device: str) -> list[str]:
    """Greedy replies to each question (one user turn each), through :func:`hybridmoe.load` and chat's ``reply``."""
    import hybridmoe
    from hybridmoe.chat import reply
    from hybridmoe.generation import SamplingConfig

    model, tokenizer = hybridmoe.load(str(base_dir), adapter=None if adapter_dir is None else str(adapter_dir),
                                      device=device, dtype="float32", progress=False)
    sampling = SamplingConfig(temperature=0, max_new_tokens=recipe.max_new_tokens)
    return [reply(model, tokenizer, [{"role": "user", "content": q}], sampling).text for q in questions]


def accuracy(replies: list[str], answers: list[str]) -> float:
    """Fraction of replies equal to the expected answer (surrounding whitespace ignored)."""
    hits = sum(r.strip() == a.strip() for r, a in zip(replies, answers))
    return hits / max(1, len(answers))


def shorten(text: str, width: int = 58) -> str:
    """One line of at most ``width`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def comparison_table(questions: list[str], before: list[str], after: list[str], answers: list[str], n: int) -> str:
    """The first ``n`` questions with their replies before and after fine-tuning, side by side."""
    rows = [f"{'question':<30} | {'before fine-tuning':<58} | {'after fine-tuning':<58} | ok",
            "-" * 156]
    for q, b, a, want in list(zip(questions, before, after, answers))[:n]:
        ok = "yes" if a.strip() == want.strip() else "no"
        rows.append(f"{shorten(q, 30):<30} | {shorten(b):<58} | {shorten(a):<58} | {ok}")
    return "\n".join(rows)


def adapter_verdict(adapter_dir: Path) -> str:
    """The one-line health verdict of ``hybridmoe inspect`` for the adapter."""
    from .inspect import inspect_adapter, verdict

    return verdict(inspect_adapter(adapter_dir))


def next_steps(output: Path) -> str:
    """The commands for chatting with and checking the result."""
    base, adapter = output / "base", output / "adapter"
    return "\n".join([
        "Chat with the result:",
        f"  hybridmoe chat --model {base} --adapter {adapter}",
        f"  hybridmoe chat --model {base} --adapter {adapter} --temperature 0 --prompt \"What is your name?\"",
        "Check the adapter and the placement:",
        f"  hybridmoe inspect {adapter}",
        f"  hybridmoe info --model {base} --adapter {adapter}",
    ])


def summary(questions: list[str], answers: list[str], before: list[str], after: list[str], verdict: str,
            recipe: Recipe) -> str:
    """The stdout report: replies side by side, accuracies and the adapter verdict."""
    n = len(questions)
    hits_before = round(accuracy(before, answers) * n)
    hits_after = round(accuracy(after, answers) * n)
    return "\n".join([
        comparison_table(questions, before, after, answers, recipe.shown),
        "",
        f"exact-match accuracy on {n} training questions: before {hits_before}/{n} "
        f"({100 * hits_before / max(1, n):.0f}%), after {hits_after}/{n} ({100 * hits_after / max(1, n):.0f}%)",
        f"adapter: {verdict}",
    ])


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


def run_quickstart(output: str, fast: bool = False) -> int:
    """Build (or reuse) the base model, fine-tune it, compare replies; 0 when the adapter reached the goal."""
    recipe = FAST if fast else FULL
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_dir, adapter_dir = out / "base", out / "adapter"
    device = compute_device()
    start = time.perf_counter()
    log(f"{'fast' if fast else 'full'} run in {out} on {device}")
    ensure_base(base_dir, recipe.base)
    dataset = identity_dataset(out, recipe)
    pairs = read_conversations(dataset)
    questions = [messages[0]["content"] for messages in pairs]
    answers = [messages[-1]["content"] for messages in pairs]
    log(f"replies of the base model to the {len(questions)} training questions")
    before = answer_all(base_dir, None, questions, recipe, device)
    log(f"LoRA fine-tuning on {dataset}")
    finetune(base_dir, adapter_dir, dataset, recipe, device)
    log("replies with the adapter")
    after = answer_all(base_dir, adapter_dir, questions, recipe, device)
    print(summary(questions, answers, before, after, adapter_verdict(adapter_dir), recipe))
    print()
    print(next_steps(out))
    score = accuracy(after, answers)
    log(f"done in {time.perf_counter() - start:.0f}s")
    if score < GOAL:
        print(f"hybridmoe quickstart: the adapter reached {score:.0%} exact-match accuracy, below the {GOAL:.0%} goal",
              file=sys.stderr)
        return 1
    return 0
