"""HTTP routes (FastAPI): OpenAI-compatible chat and text completions, the model list, vLLM's tokenizer and runtime
LoRA routes, Prometheus metrics, a health check, API-key auth and a request-size limit.

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(malformed JSON, a bad or unsupported parameter, a prompt over the context), 401 for a missing or wrong API key,
403 for runtime LoRA routes when they are off, 404 for an unknown model or route, 413 for a body over
``--max-request-bytes``, 500 when generation itself fails (non-finite logits from a broken adapter; sent with
``x-should-retry: false``, since the same request would fail again), 504 past ``--request-timeout``. A failure after
a stream has started arrives as a final ``data: {"error": ...}`` event, which the openai client raises as
``APIError``.

Tokenizing (chat template included) and compiling grammars run on worker threads, never on the event loop, so a
huge prompt does not hold up ``/health`` or the streams of other requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from hybridmoe.errors import HybridMoEError

from . import prompts, replies, schemas
from .engine import Engine
from .errors import ApiError, failed_error, failed_event, validation_error
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware
from .sampling import ServeSampling

log = logging.getLogger("hybridmoe.serve")


@dataclass
class ServeConfig:
    base_name: str  # the `model` name that selects the base model (no adapter)
    context_length: int | None  # prompt + completion limit in tokens; None = no limit known
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    max_request_bytes: int = 4 * 2**20  # larger request bodies get a 413 before they are read in full
    request_timeout: float | None = 600.0  # seconds from arrival; an unfinished request then fails (504)
    allow_runtime_lora: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    lora_root: str | None = None  # the only directory (and below) runtime adapters may come from
    max_loras: int = 8  # adapters loaded at once, startup ones included
    log_stats_interval: float = 10.0  # seconds between throughput log lines; 0 = off


def create_app(engine: Engine, tokenizer, cfg: ServeConfig) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine's worker thread (and the throughput log) and stops them."""
    from .metrics import ServeMetrics, log_throughput

    metrics = ServeMetrics(engine)
    engine.metrics = metrics
    metrics.watch_experts(engine.adapters.experts.values() if engine.adapters is not None else [])
    grammars = prompts.GrammarCache(tokenizer, engine)
    token_text = replies.TokenText(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        logger = asyncio.create_task(log_throughput(metrics, engine, cfg.log_stats_interval)) \
            if cfg.log_stats_interval > 0 else None
        yield
        if logger is not None:
            logger.cancel()
        engine.stop()
        metrics.close()

    app = FastAPI(title="hybridmoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.config = cfg  # read per request: tests and embedders may change limits on a running app
    app.add_middleware(BodyLimitMiddleware, limit=lambda: cfg.max_request_bytes)
    if cfg.api_key:  # added last: runs first, so an unauthenticated body is never read
        app.add_middleware(ApiKeyMiddleware, api_key=cfg.api_key)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug: logged with its traceback by uvicorn
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        msg = "no such route; the API is POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize, GET " \
              "/v1/models, /metrics, /health" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, msg).response()

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "hybridmoe", "root": name,
                "max_model_len": cfg.context_length}
        if name != cfg.base_name:
            card["parent"] = cfg.base_name  # an adapter on the base model
        return card

    def served() -> list[str]:
        return [cfg.base_name, *engine.adapters.names]

    def resolve(name: str | None) -> str | None:
        """The adapter a `model` name selects (None = base), or a 404 naming the served models."""
        if name is None or name == cfg.base_name:
            return None
        if name in engine.adapters.names:
            return name
        raise ApiError(404, f"the model '{name}' does not exist; served models: {', '.join(served())}",
                       param="model", code="model_not_found")

    def submit(prompt_ids: list[int], adapter: str | None, cfgs: list[ServeSampling]):
        return engine.submit(prompt_ids, adapter, cfgs, timeout=cfg.request_timeout)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "stopped"}, 503)
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting, **engine.stats}

    @app.get("/metrics")
    async def metrics_route():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in served()]}

    @app.get("/v1/models/{name:path}")  # adapter names may hold "/" (org/model)
    async def model(name: str):
        resolve(name)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest):
        adapter = resolve(body.model)
        prompt_ids, cfgs = await run_in_threadpool(prompts.prepare_chat, body, tokenizer, cfg.context_length, grammars)
        tools = body.tools is not None and body.effective_tool_choice != "none"
        handle = submit(prompt_ids, adapter, cfgs)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(replies.chat_stream(handle, body.model, include_usage, token_text, tools, failed_event))
        try:
            choices, prompt, completion = await replies.collect([handle])
        except replies.StreamFailed as e:
            raise failed_error(e.event) from None
        finally:
            handle.cancel()  # no-op when finished; stops the work if this handler was cancelled
        out = []
        for i, c in enumerate(choices):
            message, finish = replies.chat_message(c, tools)
            out.append({"index": i, "message": message, "finish_reason": finish,
                        "logprobs": token_text.chat(c.logprobs) if body.logprobs else None})
        return schemas.completion(schemas.completion_id(), body.model, out, schemas.usage(prompt, completion))

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest):
        adapter = resolve(body.model)
        prepared = await run_in_threadpool(prompts.prepare_completion, body, tokenizer, cfg.context_length)
        handles = [(submit(ids, adapter, cfgs), echo) for ids, cfgs, echo in prepared]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(replies.completion_stream(handles, body.model, include_usage, token_text,
                                                  body.logprobs is not None, failed_event))
        try:
            choices, prompt, completion = await replies.collect([h for h, _ in handles])
        except replies.StreamFailed as e:
            raise failed_error(e.event) from None
        finally:
            for h, _ in handles:
                h.cancel()
        out = []
        for i, c in enumerate(choices):
            echo = handles[i // body.n][1]
            lp = token_text.completion(c.logprobs, len(echo)) if body.logprobs is not None else None
            out.append({"index": i, "text": echo + c.text, "logprobs": lp, "finish_reason": c.finish})
        return schemas.completion(schemas.completion_id("cmpl"), body.model, out, schemas.usage(prompt, completion),
                                  obj="text_completion")

    @app.post("/tokenize")
    async def tokenize(body: schemas.TokenizeRequest):
        resolve(body.model)
        if body.messages is not None:
            ids = await run_in_threadpool(prompts.render, tokenizer, body.messages, None, body.add_generation_prompt)
        else:
            ids = await run_in_threadpool(prompts.encode, tokenizer, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": cfg.context_length, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: schemas.DetokenizeRequest):
        resolve(body.model)
        if any(t >= len(tokenizer) for t in body.tokens):
            raise ApiError(400, f"token ids must be below the vocabulary size {len(tokenizer)}", param="tokens")
        return {"prompt": await run_in_threadpool(tokenizer.decode, body.tokens)}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: schemas.LoadLoraRequest):
        _runtime_lora_allowed(cfg)
        if body.lora_name in served():
            raise ApiError(400, f"the model name '{body.lora_name}' is already served; unload it first or pick "
                                "another lora_name", param="lora_name", code="lora_exists")
        if len(engine.adapters.names) >= cfg.max_loras:
            raise ApiError(400, f"{len(engine.adapters.names)} adapters are loaded, the most this server holds "
                                "(--max-loras); unload one first", param="lora_name", code="max_loras")
        path = _lora_path(cfg, body.lora_path)
        try:
            await engine.call(lambda: engine.adapters.load(body.lora_name, path))
        except HybridMoEError as e:  # not an adapter, another model's, non-finite weights: one line
            raise ApiError(400, f"cannot load '{body.lora_path}': {e}", param="lora_path",
                           code="invalid_adapter") from None
        log.info("loaded LoRA adapter '%s' from %s%s", body.lora_name, path, await _rewarm(engine))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: schemas.UnloadLoraRequest):
        _runtime_lora_allowed(cfg)
        if body.lora_name not in engine.adapters.names:
            raise ApiError(404, f"no LoRA adapter named '{body.lora_name}' is loaded; loaded: "
                                f"{', '.join(engine.adapters.names) or 'none'}", param="lora_name",
                           code="lora_not_found")

        def unload():
            busy = engine.requests_for(body.lora_name)
            if busy:
                raise ApiError(409, f"the adapter '{body.lora_name}' has {busy} request(s) in flight; retry when "
                                    "they have finished", param="lora_name", code="lora_in_use")
            engine.adapters.unload(body.lora_name)

        await engine.call(unload)
        log.info("unloaded LoRA adapter '%s'%s", body.lora_name, await _rewarm(engine))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _rewarm(engine) -> str:
    """After a runtime adapter load or unload, on CUDA graphs: the batch decoder's graphs (closed: they held the old
    adapter table) and a lone request's decoder for the new adapter are captured now, on the worker between two steps,
    not inside the next requests' first tokens (Engine.warm_up; running streams pause for it). For the log line."""
    if not engine.graph_decode:
        return ""
    return f" (warmed up again in {await engine.call(engine.warm_up):.1f} s)"


def _runtime_lora_allowed(cfg: ServeConfig) -> None:
    if not cfg.allow_runtime_lora:
        raise ApiError(403, "loading and unloading adapters at run time is off; start the server with "
                            "--allow-runtime-lora --lora-root DIR", code="runtime_lora_disabled")


def _lora_path(cfg: ServeConfig, given: str) -> str:
    """``given`` (absolute, or relative to --lora-root) resolved, symlinks included; a 400 unless it is a directory
    under --lora-root."""
    root = Path(cfg.lora_root).resolve()
    path = (root / given).resolve()  # an absolute `given` replaces root; `..` and symlinks are resolved here
    if not path.is_relative_to(root):
        raise ApiError(400, f"lora_path '{given}' is outside the server's --lora-root; adapters load only from "
                            "directories under it", param="lora_path", code="lora_path_forbidden")
    if not path.is_dir():
        raise ApiError(400, f"lora_path '{given}' is not a directory under --lora-root", param="lora_path",
                       code="lora_path_not_found")
    return str(path)
