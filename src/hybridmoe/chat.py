"""`hybridmoe chat`: one-shot (`--prompt`, prints only the reply) or an interactive multi-turn REPL with streaming.

The adapter is checked before use (non-finite tensors are refused with their components named), and every decode
step checks the logits; a failure names the likely cause instead of dying in `torch.multinomial` (the seed's bug 5).
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

from .components import count_by_component
from .errors import DataError, GPUOutOfMemoryError
from .generation import SamplingConfig, generate

HELP = "commands: /clear (forget the conversation), /system TEXT (set the system prompt), /exit"


def nonfinite_weights(model: torch.nn.Module) -> str | None:
    """Which weights (by component) hold NaN/Inf, on both devices; None when all are finite."""
    from .experts import HybridExperts

    counts = Counter(count_by_component(n for n, p in model.named_parameters() if not torch.isfinite(p).all()))
    for m in model.modules():
        if isinstance(m, HybridExperts):
            tensors = m.weights.host_tensors() + [t for lo in m.lora.values() for t in lo.parameters()]
            counts["routed_experts"] += sum(int(not torch.isfinite(t).all()) for t in tensors)
    counts = +counts
    if not counts:
        return None
    return "non-finite weights: " + ", ".join(f"{c} {n} tensor(s)" for c, n in counts.most_common())


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; pass --chat-template FILE (a Jinja template)")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _load(args):
    from .adapters import load_adapter, merge_adapter
    from .loading import load_model, load_tokenizer

    tok = load_tokenizer(args.model, args.chat_template)  # first: a bad --chat-template is named before the slow load
    model = load_model(args.model, device=args.device, dtype=args.dtype, progress=args.prompt is None,
                       expert_dtype=getattr(args, "expert_dtype", None),
                       stream_min_tokens=getattr(args, "stream_min_tokens", None),
                       stream_slots=getattr(args, "stream_slots", 2),
                       stream_cpu_share=getattr(args, "stream_cpu_share", None),
                       resident_expert_layers=getattr(args, "resident_expert_layers", 0))
    if args.adapter:
        model = load_adapter(model, args.adapter)
        if args.merge:
            model = merge_adapter(model)
    return model.eval(), tok


def _sampling(args) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def reply(model, tok, messages: list[dict], cfg: SamplingConfig, on_text=None, cuda_graphs: bool = True):
    ids = render_prompt(tok, messages)
    try:
        return generate(model, tok, ids, cfg, on_text=on_text, diagnose=lambda: nonfinite_weights(model),
                        cuda_graphs=cuda_graphs)
    except torch.cuda.OutOfMemoryError:
        raise GPUOutOfMemoryError(generation_oom_line(model, len(ids), cfg.max_new_tokens)) from None


def generation_oom_line(model, prompt_tokens: int, max_new_tokens: int, advice: str | None = None) -> str:
    """One line for an out-of-memory error while generating: the prompt, the card, what fits, what to change."""
    from .adapters import base_model_of
    from .experts.streaming import model_streamer
    from .memory import card_usage, estimate_memory, format_oom

    est = estimate_memory(model, training=False)
    card, used = card_usage(base_model_of(model).hybridmoe.device)
    advice = advice or "use a shorter prompt or conversation (/clear in chat) or fewer new tokens (--max-new-tokens)"
    if model_streamer(model) is not None:
        advice += (f", or set --stream-min-tokens above {prompt_tokens} to run the routed experts of the prompt on "
                   "the CPU")
    return format_oom(est, f"while generating ({prompt_tokens}-token prompt + up to {max_new_tokens} new tokens)",
                      card, used, advice)


def run_chat(args) -> int:
    cfg = _sampling(args)  # validate flags before the (slow) load
    model, tok = _load(args)
    if getattr(args, "compile_decode", None) is not None:
        from .adapters import base_model_of

        base_model_of(model).hybridmoe.settings.compile_decode = args.compile_decode
    system = [{"role": "system", "content": args.system}] if args.system else []
    graphs = getattr(args, "cuda_graphs", True)
    if args.prompt is not None:
        res = reply(model, tok, system + [{"role": "user", "content": args.prompt}], cfg, cuda_graphs=graphs)
        print(res.text)
        if getattr(args, "verbose", False):
            print(_timing(res), file=sys.stderr)  # results on stdout, measurements on stderr
        return 0
    return repl(model, tok, cfg, system, cuda_graphs=graphs)


def repl(model, tok, cfg: SamplingConfig, system: list[dict], cuda_graphs: bool = True) -> int:
    history: list[dict] = []
    print(f"hybridmoe chat — {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            content = text[len("/system"):].strip()
            system = [{"role": "system", "content": content}] if content else []
            history = []
            print("(system prompt set; conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        res = reply(model, tok, system + history, cfg, on_text=lambda d: print(d, end="", flush=True),
                    cuda_graphs=cuda_graphs)
        print()
        history.append({"role": "assistant", "content": res.text})
        print(_timing(res), file=sys.stderr)


def _timing(res) -> str:
    return (f"[{res.new_tokens} tokens, prefill {res.prompt_tokens / max(res.prefill_s, 1e-9):.1f} tok/s "
            f"({res.prompt_tokens} tokens), decode {res.decode_tokens_per_s:.1f} tok/s ({res.decode_mode}), "
            + (f"first-use setup {res.setup_s:.2f} s over {res.setup_steps} tokens, " if res.setup_steps else "")
            + f"stop: {res.stop_reason}]")
