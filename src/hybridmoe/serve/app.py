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
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from hybridmoe.errors import HybridMoEError

from . import constrained, replies, schemas
from .engine import Engine, Failed
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


class ApiError(Exception):
    """A request that cannot be served; becomes an OpenAI-style JSON error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", retry: bool = True) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.retry = status, message, param, code, type_, retry

    def response(self) -> JSONResponse:
        headers = {} if self.retry else {"x-should-retry": "false"}
        return JSONResponse(schemas.error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=headers)


_FAILED_STATUS = {"non_finite_logits": 500, "out_of_memory": 503, "internal_error": 500, "shutting_down": 503,
                  "timeout": 504}


def _failed_error(ev: Failed) -> ApiError:
    return ApiError(_FAILED_STATUS.get(ev.code, 500), ev.message, code=ev.code, type_="server_error",
                    retry=ev.code not in ("non_finite_logits", "timeout"))  # the same request would fail again


def _failed_event(ev: Failed) -> dict:
    err = _failed_error(ev)
    return schemas.error_body(err.message, err.type, code=err.code)


_TAGS = {"body", "str", "int", "float", "bool", "list", "dict"}


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first pydantic/JSON error as one sentence naming the parameter."""
    err = exc.errors()[0]
    # pydantic adds union-member tags ("str", "list[TextPart]") to the location; a parameter path has none
    loc = [p for p in err.get("loc", ()) if isinstance(p, int) or (p.isidentifier() and p not in _TAGS)]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
        return ApiError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    if not loc and kind == "value_error":  # a check across parameters (e.g. 'top_logprobs' needs 'logprobs')
        return ApiError(400, err.get("msg", "").removeprefix("Value error, "), code="invalid_value")
    if not loc or kind == "model_attributes_type":
        return ApiError(400, "the request body must be a JSON object with 'model' and 'messages'")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "missing":
        return ApiError(400, f"missing required parameter '{param}'", param=param)
    if kind == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: '{param}'", param=param)
    msg = err.get("msg", "").removeprefix("Value error, ")
    return ApiError(400, f"invalid value for '{param}': {msg}", param=param, code="invalid_value")


class ApiKeyMiddleware:
    """Rejects requests without ``Authorization: Bearer <key>`` (all routes but /health) before any parsing."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>' with the key "
                                    "given to `hybridmoe serve --api-key` (or HYBRIDMOE_API_KEY)",
                               code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 to a body over ``limit`` bytes: at once from its Content-Length, or as soon as a chunked body
    passes the limit (the rest is never read). Smaller bodies are read here and handed on unchanged."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the real receive would

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        err = ApiError(413, f"the request body is larger than this server's limit of {self.limit} bytes "
                            "(--max-request-bytes); send a shorter prompt", code="request_too_large")
        response = err.response()
        response.headers["connection"] = "close"  # do not read the rest of the body
        await response(scope, receive, send)


def create_app(engine: Engine, tokenizer, cfg: ServeConfig) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine's worker thread (and the throughput log) and stops them."""
    from .metrics import ServeMetrics, log_throughput

    metrics = ServeMetrics(engine)
    engine.metrics = metrics
    metrics.watch_experts(engine.adapters.experts.values() if engine.adapters is not None else [])
    grammars = _GrammarCache(tokenizer, engine)
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
    app.add_middleware(BodyLimitMiddleware, limit=cfg.max_request_bytes)
    if cfg.api_key:  # added last: runs first, so an unauthenticated body is never read
        app.add_middleware(ApiKeyMiddleware, api_key=cfg.api_key)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

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

    @app.get("/v1/models/{name}")
    async def model(name: str):
        resolve(name)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest):
        adapter = resolve(body.model)
        prompt_ids, cfgs = await run_in_threadpool(_prepare_chat, body, tokenizer, cfg.context_length, grammars)
        tools = body.tools is not None and body.effective_tool_choice != "none"
        handle = submit(prompt_ids, adapter, cfgs)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(replies.chat_stream(handle, body.model, include_usage, token_text, tools, _failed_event))
        try:
            choices, prompt, completion = await replies.collect([handle])
        except replies.StreamFailed as e:
            raise _failed_error(e.event) from None
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
        prepared = await run_in_threadpool(_prepare_completion, body, tokenizer, cfg.context_length)
        handles = [(submit(ids, adapter, cfgs), echo) for ids, cfgs, echo in prepared]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(replies.completion_stream(handles, body.model, include_usage, token_text,
                                                  body.logprobs is not None, _failed_event))
        try:
            choices, prompt, completion = await replies.collect([h for h, _ in handles])
        except replies.StreamFailed as e:
            raise _failed_error(e.event) from None
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
            ids = await run_in_threadpool(_render, tokenizer, body.messages, None, body.add_generation_prompt)
        else:
            ids = await run_in_threadpool(_encode, tokenizer, body.prompt, body.add_special_tokens)
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
        log.info("loaded LoRA adapter '%s' from %s", body.lora_name, path)
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
        log.info("unloaded LoRA adapter '%s'", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


class _GrammarCache:
    """xgrammar compilers for the tokenizer, built on first use (the `structured` extra may be missing)."""

    def __init__(self, tokenizer, engine: Engine) -> None:
        self.tokenizer, self.engine = tokenizer, engine
        self._grammars = None

    def get(self) -> constrained.Grammars:
        if self._grammars is None:
            if not constrained.available():
                raise ApiError(400, "'response_format' and 'tools' need constrained decoding, which needs xgrammar: "
                                    "pip install 'hybridmoe[structured]' on the server", code="unsupported")
            from hybridmoe.generate import eos_token_ids

            model = self.engine.adapters.model
            vocab = model.get_output_embeddings().weight.shape[0]  # logits width (may exceed len(tokenizer))
            self._grammars = constrained.Grammars(self.tokenizer, vocab, sorted(eos_token_ids(model, self.tokenizer)))
        return self._grammars


def _render(tokenizer, messages: list[schemas.Message], tools: list[dict] | None, generation_prompt: bool = True):
    """Chat-template ``messages`` (and ``tools``) into token ids, or a 400 naming what the template refused."""
    from jinja2 import TemplateError

    template = getattr(tokenizer, "chat_template", None) or ""
    if tools and "tools" not in template:
        raise ApiError(400, "this model's chat template does not render tools; start the server with a "
                            "--chat-template that does", param="tools")
    try:
        ids = tokenizer.apply_chat_template([m.as_template_message() for m in messages], tools=tools,
                                            add_generation_prompt=generation_prompt, tokenize=True, return_dict=False)
    except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/user/assistant/..."
        raise ApiError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _budget(n_prompt: int, max_new: int | None, context_length: int | None, what: str) -> int:
    """The completion length: ``max_new``, or what is left of the context; a 400 when they do not fit."""
    if context_length is not None:
        if n_prompt >= context_length:
            raise ApiError(400, f"the prompt is {n_prompt} tokens, which leaves no room in this model's context of "
                                f"{context_length} tokens; shorten the {what}", param=what,
                           code="context_length_exceeded")
        if max_new is None:
            max_new = context_length - n_prompt
        elif n_prompt + max_new > context_length:
            raise ApiError(400, f"this model's context is {context_length} tokens, but the request asks for "
                                f"{n_prompt + max_new} ({n_prompt} in the {what}, {max_new} in the completion); "
                                f"lower max_tokens or shorten the {what}", param="max_tokens",
                           code="context_length_exceeded")
    return max_new if max_new is not None else 4096


def _sampling(body: schemas.SamplingParams, max_new: int, logprobs: int | None, grammar=None) -> list[ServeSampling]:
    """One config per choice; choice i of a seeded request uses seed + i (choices differ, and repeat)."""
    try:
        base = ServeSampling(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                             top_k=max(body.top_k, 0), repetition_penalty=body.repetition_penalty, seed=body.seed,
                             stop_strings=tuple(body.stop or ()), min_p=body.min_p,
                             presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                             logprobs=logprobs, grammar=grammar, ignore_eos=body.ignore_eos)
    except HybridMoEError as e:  # ranges are checked by the schema; this is a second line of defence
        raise ApiError(400, f"invalid sampling settings: {e}", code="invalid_value") from None
    return [replace(base, seed=None if body.seed is None else (body.seed + i) % 2**64) for i in range(body.n)]


def _prepare_chat(body: schemas.ChatCompletionRequest, tokenizer, context_length: int | None, grammars: _GrammarCache):
    """Prompt token ids and one sampling config per choice, or a 400 naming what is wrong (runs off the loop)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    prompt_ids = _render(tokenizer, body.messages, tools)
    max_new = _budget(len(prompt_ids), body.max_new_tokens, context_length, "messages")
    grammar = None
    try:
        choice = body.effective_tool_choice
        if tools and choice != "none":
            grammar = grammars.get().tools(tools, choice, parallel=body.parallel_tool_calls)
        elif body.response_format is not None and body.response_format.type == "json_object":
            grammar = grammars.get().json_object()
        elif body.response_format is not None and body.response_format.type == "json_schema":
            grammar = grammars.get().json_schema(body.response_format.json_schema.schema_)
    except HybridMoEError as e:
        raise ApiError(400, str(e), param="tools" if tools else "response_format", code="invalid_value") from None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return prompt_ids, _sampling(body, max_new, logprobs, grammar)


def _prepare_completion(body: schemas.CompletionRequest, tokenizer, context_length: int | None):
    """Per prompt: (token ids, one sampling config per choice, echo prefix), or a 400 (runs off the loop)."""
    out = []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            ids = _encode(tokenizer, prompt)
            text = prompt
        else:
            if any(t >= len(tokenizer) for t in prompt):
                raise ApiError(400, f"prompt token ids must be below the vocabulary size {len(tokenizer)}",
                               param="prompt")
            ids, text = prompt, tokenizer.decode(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization; send some text", param="prompt")
        max_new = _budget(len(ids), body.max_tokens, context_length, "prompt")
        out.append((ids, _sampling(body, max_new, body.logprobs), text if body.echo else ""))
    return out
