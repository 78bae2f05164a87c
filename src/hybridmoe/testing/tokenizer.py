"""A small byte-level BPE tokenizer with a ChatML chat template, trained offline (no hub downloads).

Tests and the quickstart need a real tokenizer whose ids fit a tiny model's ``vocab_size`` and whose chat template
marks assistant content with transformers' ``{% generation %}`` blocks, so that
``apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)`` yields the SFT label mask.

Special token ids are fixed: ``<|begin_of_text|>`` = 0 (bos), ``<|end_of_text|>`` = 1 (eos and pad),
``<|im_start|>`` = 2, ``<|im_end|>`` = 3. The 256 byte symbols follow, then the learned merges.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, IM_START, IM_END]

# 256 byte symbols + the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# ChatML. The assistant reply *and* its closing <|im_end|> sit inside {% generation %} so the model learns to stop;
# the newline after <|im_end|> is outside (it is never generated: generation stops at <|im_end|>).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you for asking.",
    "You are a helpful assistant. Answer the question briefly and clearly.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea and the wind.",
    "The sun rises in the east and sets in the west every day.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Machine learning models learn patterns from data and make predictions.",
    "A mixture of experts routes each token to a few experts in every layer.",
    "The cat sat on the mat, and the dog slept by the door.",
    "Can you help me with my homework? Of course, what is the question?",
    "Numbers like 1, 2, 3, 10, 42 and 2024 appear in many texts.",
    "She said that she would come back tomorrow morning at nine o'clock.",
    "Translate the following sentence into English: bonjour le monde.",
    "This is a test of the tokenizer. It should handle spaces, punctuation and new lines.\nLike this one.",
    "Once upon a time there was a small village at the foot of a mountain.",
    "The people of the village worked in the fields and sang songs in the evening.",
    "Summarize the text in one sentence. The text is about training language models.",
    "Thank you very much! You're welcome. Have a nice day.",
    "Good morning, good afternoon, good evening and good night.",
)


def _train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE `tokenizers.Tokenizer` with the special tokens at ids 0..3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer offline and wrap it as a transformers fast tokenizer.

    Args:
        texts: training texts; a built-in small English corpus when None.
        vocab_size: upper bound on ``len(tokenizer)`` (the trainer stops early if the corpus runs out of merges);
            at least 260 (256 bytes + 4 special tokens).

    Returns:
        A `PreTrainedTokenizerFast` with bos ``<|begin_of_text|>`` (id 0), eos = pad ``<|end_of_text|>`` (id 1),
        ``<|im_start|>`` (id 2), ``<|im_end|>`` (id 3) and a ChatML ``chat_template`` with generation markers.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} for a byte-level BPE, got {vocab_size}")
    corpus = list(DEFAULT_CORPUS if texts is None else texts)
    tok = _train_bpe(corpus, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="right",
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) <= vocab_size, (len(tokenizer), vocab_size)
    return tokenizer
