"""`hybridmoe serve`: an OpenAI-compatible HTTP server for a hybrid model and any number of adapters.

* :mod:`.app` — routes (FastAPI on uvicorn); :mod:`.schemas` the OpenAI/vLLM request and response shapes;
  :mod:`.errors` OpenAI-style errors; :mod:`.middleware` API-key auth and the body-size limit;
* :mod:`.prompts` — requests to prompt ids and sampling configs, off the event loop;
* :mod:`.replies` — engine events to whole replies and server-sent event streams (tool calls parsed);
* :mod:`.engine` — the worker thread that owns the model and schedules (chunked) prefill and batched decode;
  :mod:`.events` what it sends back; :mod:`.prefill` and :mod:`.batch` the left-padded KV-cache batch;
* :mod:`.sampling` — per-request sampling extras and logprobs; :mod:`.constrained` grammars through xgrammar;
* :mod:`.adapters` — all adapters loaded once (or at run time), switched per batch without copying weights;
* :mod:`.metrics` — Prometheus metrics and the throughput log line;
* :mod:`.server` — the CLI entry point: bind, load, run.
"""

from .server import build_app, serve_in_thread

__all__ = ["build_app", "serve_in_thread"]
