"""Tiny random models of every supported architecture, for tests, the quickstart and benchmarks (no downloads)."""

from .tiny import TINY_ARCHS, save_tiny_model, tiny_config
from .tokenizer import build_tokenizer

__all__ = ["TINY_ARCHS", "build_tokenizer", "save_tiny_model", "tiny_config"]
