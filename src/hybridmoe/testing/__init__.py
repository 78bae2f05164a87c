"""Tiny random models of every supported architecture, for tests, the quickstart and benchmarks (no downloads)."""

from .tokenizer import build_tokenizer
from .tiny import TINY_ARCHS, save_tiny_model, tiny_config

__all__ = ["TINY_ARCHS", "build_tokenizer", "save_tiny_model", "tiny_config"]
