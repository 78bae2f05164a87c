"""Tiny random models of every supported architecture, for tests, the quickstart and benchmarks (no downloads)."""

from .tiny import TINY_ARCHS, save_random_model, save_tiny_model, tiny_config
from .tokenizer import build_tokenizer
from .zoo import NOT_YET_SUPPORTED, SUPPORTED_ARCHITECTURES, ZOO_ARCHS, save_zoo_model, zoo_config

__all__ = ["NOT_YET_SUPPORTED", "SUPPORTED_ARCHITECTURES", "TINY_ARCHS", "ZOO_ARCHS", "build_tokenizer",
           "save_random_model", "save_tiny_model", "save_zoo_model", "tiny_config", "zoo_config"]
