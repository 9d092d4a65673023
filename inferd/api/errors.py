"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure a client can cause or meet maps here to a 4xx/5xx with a message
that says what was wrong. Deployments (the local engine and remote providers
alike) fail with a classified `ProviderError` that already carries its status,
code, parameter and retry hint; the API's own checks raise `APIError`.
`api_error()` is the one mapping; the exception handlers and the error events of
a broken SSE stream both use it, so a stream that fails mid-way says why instead
of ending like a success.
"""

from __future__ import annotations

import logging
import math

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from inferd.tenancy.quota import QuotaExceeded
from inferd.providers.base import ErrorKind, ProviderError
from inferd.wire.schema import validation_error

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
          403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        return Response(msgspec.json.encode(self.body()), status_code=self.status,
                        media_type="application/json", headers=self.headers)


def api_error(exc: BaseException) -> APIError:
    """The client-facing error for an exception (500 only for genuine bugs)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QuotaExceeded):
        headers = {} if exc.retry_after is None else {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return APIError(exc.status, exc.message, code=exc.code, headers=headers,
                        type="insufficient_quota" if exc.status == 402 else "rate_limit_error")
    if isinstance(exc, ProviderError) and exc.kind is ErrorKind.AUTH:
        # the upstream refused inferd's own credentials: a server-side problem, not the client's key
        return APIError(502, f"an upstream provider rejected this server's credentials: {exc.message}",
                        code="upstream_authentication_error", type="server_error")
    if isinstance(exc, ProviderError):
        headers = {} if exc.retry_after is None else {"Retry-After": str(max(1, round(exc.retry_after)))}
        kind_type = exc.body()["error"]["type"]
        return APIError(exc.status, exc.message, param=exc.param, code=exc.code,
                        type=_TYPES.get(exc.status, kind_type),
                        headers=headers)
    log.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    return api_error(validation_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(_: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc).response()

    async def on_http(_: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if status == 404:
            message = "not found: no such endpoint"
        err = APIError(status, message, headers=dict(exc.headers or {}))
        return err.response()

    async def on_error(_: Request, exc: Exception) -> Response:
        return api_error(exc).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (APIError, ProviderError, QuotaExceeded, Exception):
        app.add_exception_handler(cls, on_error)
