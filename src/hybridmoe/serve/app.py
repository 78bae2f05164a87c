"""HTTP routes (FastAPI): OpenAI-compatible chat completions, the model list, a health check, API-key auth.

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(malformed JSON, a bad or unsupported parameter, a prompt over the context), 401 for a missing or wrong API key,
404 for an unknown model or route, 500 when generation itself fails (non-finite logits from a broken adapter; sent
with ``x-should-retry: false``, since the same request would fail again). A failure after a stream has started
arrives as a final ``data: {"error": ...}`` event, which the openai client raises as ``APIError``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from hybridmoe.chat import render_prompt
from hybridmoe.errors import HybridMoEError
from hybridmoe.generation import SamplingConfig

from . import schemas
from .engine import Delta, Engine, Failed, Finished

log = logging.getLogger("hybridmoe.serve")


@dataclass
class ServeConfig:
    base_name: str  # the `model` name that selects the base model (no adapter)
    context_length: int | None  # prompt + completion limit in tokens; None = no limit known
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"


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


_FAILED_STATUS = {"non_finite_logits": 500, "out_of_memory": 503, "internal_error": 500, "shutting_down": 503}


def _failed_error(ev: Failed) -> ApiError:
    return ApiError(_FAILED_STATUS.get(ev.code, 500), ev.message, code=ev.code, type_="server_error",
                    retry=ev.code != "non_finite_logits")  # the same request would hit the same NaN


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


def create_app(engine: Engine, tokenizer, cfg: ServeConfig) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine's worker thread and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="hybridmoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    if cfg.api_key:
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
        msg = "no such route; the API is POST /v1/chat/completions, GET /v1/models, GET /health" \
            if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, msg).response()

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "hybridmoe"}
        if name != cfg.base_name:
            card["parent"] = cfg.base_name  # an adapter on the base model
        return card

    def served() -> list[str]:
        return [cfg.base_name, *engine.adapters.names]

    def resolve(name: str) -> str | None:
        """The adapter a `model` name selects (None = base), or a 404 naming the served models."""
        if name == cfg.base_name:
            return None
        if name in engine.adapters.names:
            return name
        raise ApiError(404, f"the model '{name}' does not exist; served models: {', '.join(served())}",
                       param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "stopped"}, 503)
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting, **engine.stats}

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
        prompt_ids, sampling = _prepare(body, tokenizer, cfg.context_length)
        handle = engine.submit(prompt_ids, adapter, sampling)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(handle, body.model, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts: list[str] = []
        try:
            async for ev in handle.events():
                if isinstance(ev, Delta):
                    parts.append(ev.text)
                elif isinstance(ev, Failed):
                    raise _failed_error(ev)
                else:
                    return schemas.completion(schemas.completion_id(), body.model, "".join(parts), ev.stop_reason,
                                              ev.prompt_tokens, ev.completion_tokens)
        finally:
            handle.cancel()  # no-op when finished; stops the work if this handler was cancelled
        raise ApiError(500, "generation ended without a result", type_="server_error")

    return app


def _prepare(body: schemas.ChatCompletionRequest, tokenizer, context_length: int | None):
    """Prompt token ids and sampling settings, or a 400 naming what is wrong."""
    from jinja2 import TemplateError

    try:
        prompt_ids = render_prompt(tokenizer, [m.as_template_message() for m in body.messages])
    except TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant/user/assistant/..."
        raise ApiError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
    n_prompt = len(prompt_ids)
    max_new = body.max_new_tokens
    if context_length is not None:
        if n_prompt >= context_length:
            raise ApiError(400, f"the prompt is {n_prompt} tokens, which leaves no room in this model's context of "
                                f"{context_length} tokens; shorten the messages", param="messages",
                           code="context_length_exceeded")
        if max_new is None:
            max_new = context_length - n_prompt
        elif n_prompt + max_new > context_length:
            raise ApiError(400, f"this model's context is {context_length} tokens, but the request asks for "
                                f"{n_prompt + max_new} ({n_prompt} in the messages, {max_new} in the completion); "
                                "lower max_tokens or shorten the messages", param="max_tokens",
                           code="context_length_exceeded")
    try:
        sampling = SamplingConfig(max_new_tokens=max_new if max_new is not None else 4096,
                                  temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                  stop_strings=tuple(body.stop or ()))
    except HybridMoEError as e:  # ranges are checked by the schema; this is a second line of defence
        raise ApiError(400, f"invalid sampling settings: {e}", code="invalid_value") from None
    return prompt_ids, sampling


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(handle, model: str, include_usage: bool):
    """Server-sent events: a role chunk, content chunks, a finish chunk, [usage chunk,] ``[DONE]``."""
    cid, created = schemas.completion_id(), int(time.time())
    try:
        yield _event(schemas.chunk(cid, model, created, {"role": "assistant", "content": ""}))
        async for ev in handle.events():
            if isinstance(ev, Delta):
                yield _event(schemas.chunk(cid, model, created, {"content": ev.text}))
            elif isinstance(ev, Finished):
                yield _event(schemas.chunk(cid, model, created, {}, schemas.FINISH_REASON[ev.stop_reason]))
                if include_usage:
                    yield _event(schemas.chunk(cid, model, created, None,
                                               usage_=schemas.usage(ev.prompt_tokens, ev.completion_tokens)))
                yield "data: [DONE]\n\n"
            else:
                err = _failed_error(ev)
                yield _event(schemas.error_body(err.message, err.type, code=err.code))
    finally:
        handle.cancel()  # the client went away mid-stream: stop generating for it
