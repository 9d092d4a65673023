"""`inferd serve`: the FastAPI app and its lifecycle around an engine core process.

`run_server` starts the `AsyncEngine` (which spawns the engine core and waits
until the model is loaded), builds the app with `build_app`, and serves it with
uvicorn in the same event loop. On SIGTERM/SIGINT uvicorn stops accepting
connections while the engine drains: requests in flight get `shutdown_timeout`
seconds to finish, then are aborted with a 503 error (an error event in a
stream); finally the core process is stopped and the exit code is 0.

The app: /v1/completions and /v1/chat/completions (routes_*.py), /v1/models,
/health (503 once the engine core is gone), /version and /metrics. An ASGI
middleware gives every response an `X-Request-Id` (the client's, if it sent a
sane one) and checks the API key on /v1 routes when one is configured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import re
import socket
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from starlette.datastructures import Headers
from starlette.responses import Response

from inferd import __version__
from inferd.api import routes_chat, routes_completions, routes_tokenize
from inferd.api.errors import APIError, install_error_handlers
from inferd.api.metrics import Metrics
from inferd.api.protocol import ServerState, json_response, state
from inferd.engine.async_client import AsyncEngine
from inferd.engine.config import EngineConfig

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


class RequestContextMiddleware:
    """X-Request-Id on every response; API key check on /v1 routes."""

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(headers):
            err = APIError(401, "invalid or missing API key; send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
            return await err.response()(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)

    def _authorized(self, headers: Headers) -> bool:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            token = headers.get("x-api-key", "")
        return hmac.compare_digest(token.strip().encode(), self.api_key)


def model_name_from_source(source: str) -> str:
    name = Path(source).name or "model"
    return name[:-5] if name.endswith(".gguf") else name


def build_app(engine: AsyncEngine, *, model_name: str, api_key: str | None = None) -> FastAPI:
    """The API app around a started engine."""
    app = FastAPI(title="inferd", version=__version__, docs_url=None, redoc_url=None)
    metrics = Metrics(model_name)
    engine.on_request_done = metrics.observe
    app.state.inferd = ServerState(engine, metrics, model_name, api_key)
    install_error_handlers(app)
    app.include_router(routes_completions.router)
    app.include_router(routes_chat.router)
    app.include_router(routes_tokenize.router)
    app.add_middleware(RequestContextMiddleware, api_key=api_key)

    @app.get("/health")
    async def health(request: Request):
        eng = state(request).engine
        if eng.is_healthy:
            return json_response({"status": "ok"})
        reason = eng.dead_reason or "the server is shutting down"  # draining: stop routing here
        return json_response({"status": "unavailable", "reason": reason}, status=503)

    @app.get("/version")
    async def version():
        return json_response({"version": __version__})

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        st = state(request)
        st.metrics.update_engine(st.engine.stats, st.engine.is_healthy)
        body, content_type = st.metrics.render()
        return Response(body, media_type=content_type)

    def model_card(st: ServerState) -> dict:
        return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "inferd",
                "root": st.engine.info.source, "max_model_len": st.engine.info.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        return json_response({"object": "list", "data": [model_card(state(request))]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        st = state(request)
        st.check_model(model_id)
        return json_response(model_card(st))

    return app


class _Server(uvicorn.Server):
    """uvicorn, with a hook on the exit signal and a plain exit after a graceful shutdown."""

    def __init__(self, config: uvicorn.Config, on_exit_signal):
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self._on_exit_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            # uvicorn re-raises the captured signal afterwards (for embedding apps);
            # we have shut down in order, so exit normally instead.
            getattr(self, "_captured_signals", []).clear()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_server(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    return asyncio.run(_serve(args, engine_config))


async def _serve(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    max_waiting, shutdown_timeout = args.max_waiting_requests, args.shutdown_timeout
    sock = _bind(args.host, args.port)  # fail fast, before the model loads
    engine = AsyncEngine(engine_config, max_waiting_requests=max_waiting)
    try:
        info = await engine.start()
    except BaseException:
        sock.close()
        raise
    try:
        name = args.served_model_name or model_name_from_source(info.source)
        app = build_app(engine, model_name=name, api_key=args.api_key)
        log.info("serving %s (%s) on http://%s:%d: max_model_len %d, %d KV blocks of %d tokens",
                 name, info.source, args.host, args.port, info.max_model_len, info.num_blocks,
                 info.block_size)
        loop = asyncio.get_running_loop()
        drains: list[asyncio.Task] = []

        def on_exit_signal() -> None:
            loop.call_soon_threadsafe(lambda: drains.append(loop.create_task(engine.drain(shutdown_timeout))))

        config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off",
                                log_level=args.log_level.lower(),
                                timeout_graceful_shutdown=shutdown_timeout + 5)
        server = _Server(config, on_exit_signal)
        await server.serve(sockets=[sock])
        for task in drains:
            await task
    finally:
        await engine.shutdown()
    return 0 if server.started else 1
