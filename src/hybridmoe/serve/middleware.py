"""ASGI middleware that runs before any route: API-key auth and the request-body size limit."""

from __future__ import annotations

import hmac

from .errors import ApiError


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

    def __init__(self, app, limit) -> None:
        self.app = app
        self._limit = limit  # bytes, or a function returning them (read per request: the limit can change)

    @property
    def limit(self) -> int:
        return self._limit() if callable(self._limit) else self._limit

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
