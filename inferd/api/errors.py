"""Errors as HTTP responses: every exception a route raises becomes the OpenAI envelope.

The error type and its envelope are wire/errors.py's (`InferdError`,
`client_error`); this module turns them into responses and installs the
handlers, so a malformed body, an unknown path, a refused key, a limit, a failed
deployment and a bug all answer in the same shape with the right status.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from inferd.wire.errors import InferdError, client_error, http_error
from inferd.wire.schema import validation_error


def error_response(error: InferdError) -> Response:
    return Response(error.encoded(), status_code=error.status, media_type="application/json",
                    headers=error.headers)


def _validation_error(exc: RequestValidationError) -> InferdError:
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return http_error(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    return validation_error(exc)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(_validation_error(exc))

    async def on_http(_: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if status == 404:
            message = "not found: no such endpoint"
        return error_response(http_error(status, message, headers=dict(exc.headers or {})))

    async def on_error(_: Request, exc: Exception) -> Response:
        return error_response(client_error(exc))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (InferdError, Exception):
        app.add_exception_handler(cls, on_error)
