"""`hybridmoe serve`: an OpenAI-compatible HTTP server for a hybrid model and any number of adapters.

* :mod:`.app` — routes, request schema checks and OpenAI-style errors (FastAPI on uvicorn);
* :mod:`.engine` — the worker thread that owns the model and schedules prefill and batched decode;
* :mod:`.batch` — a left-padded KV-cache batch: one forward per decode step for many requests;
* :mod:`.adapters` — all adapters loaded once, switched per batch without copying weights;
* :mod:`.server` — the CLI entry point: bind, load, run.
"""

from .server import build_app, serve_in_thread

__all__ = ["build_app", "serve_in_thread"]
