"""OpenAI-style HTTP errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import schemas
from .events import Failed


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


def failed_error(ev: Failed) -> ApiError:
    return ApiError(_FAILED_STATUS.get(ev.code, 500), ev.message, code=ev.code, type_="server_error",
                    retry=ev.code not in ("non_finite_logits", "timeout"))  # the same request would fail again


def failed_event(ev: Failed) -> dict:
    err = failed_error(ev)
    return schemas.error_body(err.message, err.type, code=err.code)


_TAGS = {"body", "str", "int", "float", "bool", "list", "dict"}


def validation_error(exc: RequestValidationError) -> ApiError:
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
