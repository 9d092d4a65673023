"""The one error type: `InferdError`, its kinds, and the OpenAI error envelope.

Every failure a client can cause or meet is an `InferdError`: a bad parameter at
the edge, a refused key, a limit (`tenancy/quota.py` raises its `QuotaExceeded`
subclass), a deployment that failed (the local engine and remote providers
alike). Its `kind` says what the gateway may do about it (retry, fall back, or
hand it to the client as is); its `status`, `code`, `param` and `retry_after`
are what the client sees, in one envelope
(`{"error": {"message", "type", "param", "code"}}`) whose `type` comes from one
status table. `http_error` builds one from a status, for the API's own checks;
`classify_status` reads an upstream's error status and message; `client_error`
is the one mapping from any exception to what the client gets (a stream that
fails mid-way uses it too, so it says why instead of ending like a success).
"""

from __future__ import annotations

import enum
import logging
import math

import msgspec

log = logging.getLogger(__name__)


class ErrorKind(enum.Enum):
    RATE_LIMIT = "rate_limit"          # 429 upstream: retry later (Retry-After) or fall back
    OVERLOADED = "overloaded"          # 503 with a retry hint: the deployment is busy, not broken
    SERVER = "server"                  # 5xx: retry, then fall back
    CONNECTION = "connection"          # refused, reset, DNS: retry, then fall back
    TIMEOUT = "timeout"                # connect / first token / total / stream silence
    CONTEXT_LENGTH = "context_length"  # the prompt does not fit: fall back to a larger model, never retry
    CONTENT_POLICY = "content_policy"  # refused by the provider's policy: propagate, never retry
    INVALID_REQUEST = "invalid_request"  # the client's fault (400/404/413/415/422): propagate
    AUTH = "auth"                      # 401/403 from upstream: a configuration problem, fall back
    DENIED = "denied"                  # 401/403 of inferd's own: the caller's key is missing, wrong or not enough
    QUOTA = "quota"                    # 402/429 of inferd's own: a team's or key's limit
    CLIENT_CLOSED = "client_closed"    # 499: the client went away
    INTERNAL = "internal"              # 500: a bug in inferd

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = {ErrorKind.RATE_LIMIT, ErrorKind.OVERLOADED, ErrorKind.SERVER, ErrorKind.CONNECTION,
              ErrorKind.TIMEOUT}

# The envelope's `type` for each status: the one table.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
          403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
          503: "service_unavailable_error", 504: "timeout_error"}


class InferdError(Exception):
    """A classified failure with what the client sees if it is the final answer.

    `retry_after` (seconds) becomes a `Retry-After` header; `headers` are any others.
    """

    def __init__(self, kind: ErrorKind, message: str, *, status: int = 502, code: str | None = None,
                 param: str | None = None, retry_after: float | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status
        self.code, self.param, self.retry_after = code, param, retry_after
        self.type = type or _TYPES.get(status, "server_error")
        self._headers = headers or {}

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return dict(self._headers)
        return {**self._headers, "Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encoded(self) -> bytes:
        return msgspec.json.encode(self.body())


def _kind_of_status(status: int, retry_after: float | None) -> ErrorKind:
    if status in (401, 403):
        return ErrorKind.DENIED
    if status in (402, 429):
        return ErrorKind.QUOTA
    if status == 499:
        return ErrorKind.CLIENT_CLOSED
    if status == 503:
        return ErrorKind.OVERLOADED if retry_after is not None else ErrorKind.SERVER
    if status >= 500:
        return ErrorKind.INTERNAL if status == 500 else ErrorKind.SERVER
    return ErrorKind.INVALID_REQUEST


def http_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None, retry_after: float | None = None,
               headers: dict[str, str] | None = None) -> InferdError:
    """An error of inferd's own (not an upstream's) for an HTTP status."""
    return InferdError(_kind_of_status(status, retry_after), message, status=status, code=code, param=param,
                       retry_after=retry_after, type=type, headers=headers)


def invalid(message: str, param: str | None = None, *, code: str | None = None) -> InferdError:
    """400: the request itself is wrong, `param` names the field."""
    return InferdError(ErrorKind.INVALID_REQUEST, message, status=400, param=param, code=code)


def classify_status(status: int, message: str, code: str | None = None, *, param: str | None = None,
                    retry_after: float | None = None) -> InferdError:
    """The error for an upstream's HTTP error status and its error body's message/code."""
    text = f"{code or ''} {message}".lower()
    if code == "context_length_exceeded" or "context length" in text or "context window" in text \
            or "too many tokens" in text or "prompt is too long" in text:
        kind = ErrorKind.CONTEXT_LENGTH
    elif code == "content_policy_violation" or "content policy" in text or "content_filter" in text:
        kind = ErrorKind.CONTENT_POLICY
    elif status == 429:
        kind = ErrorKind.RATE_LIMIT
    elif status in (401, 403):
        kind = ErrorKind.AUTH
    elif status == 503 and retry_after is not None:
        kind = ErrorKind.OVERLOADED
    elif status >= 500 or status in (408, 409):
        kind = ErrorKind.SERVER
    else:
        kind = ErrorKind.INVALID_REQUEST
    return InferdError(kind, message, status=status, code=code, param=param, retry_after=retry_after)


def client_error(exc: BaseException) -> InferdError:
    """What the client gets for an exception: the error itself, with an upstream's refusal of inferd's
    own credentials made a 502 (never the client's fault, never its body), and 500 only for bugs."""
    if isinstance(exc, InferdError):
        if exc.kind is ErrorKind.AUTH:
            # the upstream's message may echo the credential's prefix: it stays in the server log
            log.warning("an upstream rejected this server's credentials: %s", exc.message)
            return InferdError(ErrorKind.SERVER, "an upstream provider rejected this server's credentials; "
                               "see the server log", status=502, code="upstream_authentication_error")
        return exc
    log.error("unexpected error", exc_info=exc)
    return InferdError(ErrorKind.INTERNAL, f"internal error ({type(exc).__name__}); see the server log",
                       status=500)
