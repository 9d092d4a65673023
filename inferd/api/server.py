"""`inferd serve`: the FastAPI app and its lifecycle around the gateway's deployments.

`run_server` builds the gateway from `--config` (or, without one, a single
group serving the model given on the command line), which starts every local
engine core and waits until their models are loaded, builds the app with
`build_app`, and serves it with uvicorn in the same event loop. On SIGTERM/SIGINT
uvicorn stops accepting connections while the local engines drain: requests in
flight get `shutdown_timeout` seconds to finish, then are aborted with a 503
error (an error event in a stream); finally the core processes are stopped and
the exit code is 0.

The app: /v1/completions and /v1/chat/completions (routes_generate.py),
/v1/embeddings, /v1/files and /v1/batches (with the batch runner in the
background), /v1/usage, /v1/deployments (prices and live load), /admin (keys and
teams, Ray replica counts), the web app at / (routes_web.py), the Open Inference Protocol for
tensor models under /v2 (routes_infer.py), /v1/models, /health (503 once a
local engine core is gone or draining), /version and /metrics. An ASGI
middleware gives every response an `X-Request-Id` (the client's, if it sent a
sane one) and an `x-inferd-overhead-ms` header (time spent in inferd itself,
outside deployment calls and retry waits), and resolves the caller's key
(api/auth.py). Every request is metered into the store's ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import socket
import random
import secrets
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.datastructures import Headers
from starlette.responses import Response

from inferd import __version__
from inferd.api import (routes_admin, routes_batches, routes_deployments, routes_embeddings, routes_files,
                        routes_generate, routes_infer, routes_models, routes_replicas, routes_tokenize, routes_usage,
                        routes_web)
from inferd.api.auth import Authenticator
from inferd.api.body_limits import BodyLimits
from inferd.api.errors import error_response, install_error_handlers
from inferd.api.metrics import EngineMetrics, render
from inferd.api.protocol import ServerState, json_response, spawn, state
from inferd.batch.jobs import pinned_versions
from inferd.batch.runner import BatchRunner
from inferd.classic.tensors import infer_path_params
from inferd.engine.config import EngineConfig
from inferd.gateway.config import GatewayConfig, load_config, single_model_config
from inferd.gateway.metrics import GatewayMetrics
from inferd.gateway.router import Gateway
from inferd.gateway.versions import VersionManager
from inferd.models.default_embedding_model import DEFAULT_EMBEDDING_MODEL, DEFAULT_EMBEDDING_MODEL_NAME
from inferd.models.default_model import default_model_path
from inferd.store import Store, open_store
from inferd.tenancy.metering import Metering
from inferd.tenancy.prices import PriceBook
from inferd.tenancy.response_cache import ResponseCache
from inferd.wire.errors import InferdError

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# request ids need to be unique, not secret: 128 bits from a generator seeded once, not a uuid4
# (a system call and a UUID object per request)
_REQUEST_ID_BITS = random.Random(secrets.randbits(128))


class RequestContextMiddleware:
    """X-Request-Id and the overhead header on every response; who is calling, on /v1 and /admin routes."""

    def __init__(self, app, authenticator: Authenticator):
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = f"{_REQUEST_ID_BITS.getrandbits(128):032x}"
        arrival = time.perf_counter()
        request_state = scope.setdefault("state", {})
        request_state["request_id"] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                extra = [header]
                route = request_state.get("route")
                if route is not None:  # time in inferd itself: not upstream, not waiting to retry
                    overhead = time.perf_counter() - arrival - route.upstream_s - route.backoff_s
                    extra.append((b"x-inferd-overhead-ms", f"{max(0.0, overhead) * 1000:.2f}".encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        request_state["principal"] = None
        if self.authenticator.protects(scope["path"]):
            try:
                client = scope.get("client")
                request_state["principal"] = await self.authenticator.principal(
                    scope["path"], headers, client[0] if client else None)
            except InferdError as err:
                return await error_response(err)(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)


class HotPath:
    """The infer calls of tensor models straight to their endpoint, everything else through the app.

    A tensor model's call is a few hundred microseconds of event-loop time, and the app's
    middleware layers (Starlette's error and exception middleware, FastAPI's own) and its
    router's walk over every route were a third of it. The request context (request id, the
    key check) still runs first; the endpoint answers every error itself."""

    def __init__(self, app: FastAPI, authenticator: Authenticator):
        self.app = app
        self.infer = RequestContextMiddleware(routes_infer.infer_asgi, authenticator)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            params = infer_path_params(scope["path"])
            if params is not None:
                scope["app"], scope["path_params"] = self.app, params
                return await self.infer(scope, receive, send)
        await self.app(scope, receive, send)


def model_name_from_source(source: str) -> str:
    name = Path(source).name or "model"
    return name[:-5] if name.endswith(".gguf") else name


def build_app(gateway: Gateway, *, registry: CollectorRegistry, gateway_metrics: GatewayMetrics,
              metering: Metering, authenticator: Authenticator, batch_runner: BatchRunner,
              body_limits: BodyLimits = BodyLimits(), versions: VersionManager | None = None,
              config_path: str | None = None) -> FastAPI:
    """The API app around a started gateway."""
    app = FastAPI(title="inferd", version=__version__, docs_url=None, redoc_url=None)
    engine_metrics = EngineMetrics(registry)
    st = ServerState(gateway, engine_metrics, gateway_metrics, registry, metering, authenticator,
                     ResponseCache(metering.store, metering.clock), batch_runner, body_limits, versions=versions,
                     config_path=config_path)

    def observe(h) -> None:
        if h.deployment.info is not None:
            h.deployment.observe_requests(lambda m, name=h.deployment.info.id: engine_metrics.observe(name, m))

    for h in gateway.handles():  # a Ray deployment's replicas are handles too, watched as they join
        observe(h)
    app.state.inferd = st
    install_error_handlers(app)
    app.include_router(routes_infer.router)  # first: routes match in order, and infer calls are the most frequent
    watch_tensors = routes_infer.attach(app, st)
    if versions is not None:  # deployments of versions loaded later are watched the same way
        versions.on_loaded = lambda h: (observe(h), watch_tensors(h))
    app.include_router(routes_generate.router)
    app.include_router(routes_embeddings.router)
    app.include_router(routes_tokenize.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_models.router)
    app.include_router(routes_replicas.router)
    app.include_router(routes_usage.router)
    app.include_router(routes_files.router)
    app.include_router(routes_batches.router)
    app.include_router(routes_deployments.router)
    routes_web.attach(app)
    app.add_middleware(RequestContextMiddleware, authenticator=authenticator)

    @app.get("/health")
    async def health(request: Request):
        # a replica coming back by itself is not an outage while its group has another that answers
        gateway = state(request).gateway
        served = {g.name for g in gateway.groups if any(h.deployment.healthy for h in g.handles)}
        down = [f"{h.name}: {h.deployment.unavailable().message}"
                for g in gateway.groups for h in g.serving()
                if not h.deployment.healthy and not (h.deployment.recovering and g.name in served)]
        if not down:
            return json_response({"status": "ok"})
        return json_response({"status": "unavailable", "reason": "; ".join(down)}, status=503)

    @app.get("/version")
    async def version():
        return json_response({"version": __version__})

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        st = state(request)
        reports: dict[str, list] = {}  # model name -> (deployment, stats, healthy) of its engines
        for h in st.gateway.handles():
            stats = h.deployment.stats()
            if stats is not None:
                reports.setdefault(h.deployment.info.id, []).append((h.name, stats, h.deployment.healthy))
            st.gateway_metrics.in_flight.labels(h.name).set(h.stats.in_flight)
            st.gateway_metrics.circuit(h.name, h.breaker.gauge_value)
        for model, engines in reports.items():
            st.engine_metrics.update(model, engines)
        body, content_type = render(st.registry)
        return Response(body, media_type=content_type)

    def model_card(st: ServerState, group) -> dict:
        card = {"id": group.name, "object": "model", "created": st.created, "owned_by": "inferd"}
        if group.aliases:
            card["aliases"] = group.aliases
        info = next((h.deployment.info for h in group.serving()
                     if h.deployment.info is not None and h.deployment.info.source), None)
        if info is not None:  # a model this server runs itself: its file, and its context
            # the file's name, not its path: a caller has no business knowing the server's disk layout
            card.update(root=Path(info.source).name, max_model_len=info.max_model_len)
        return card

    @app.get("/v1/models")
    async def list_models(request: Request):
        st = state(request)
        return json_response({"object": "list", "data": [model_card(st, g) for g in st.gateway.groups]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        st = state(request)
        return json_response(model_card(st, st.gateway.resolve(model_id)))

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
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto says TCP, and without it a keep-alive response's body waits for the client's
    # delayed ACK (~40 ms) because uvicorn writes the head and the body separately
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def admin_key(args: argparse.Namespace) -> str | None:
    """The admin key: --api-key, else the first line of --api-key-file, else $INFERD_API_KEY."""
    if args.api_key:
        return args.api_key
    if getattr(args, "api_key_file", None):
        lines = Path(args.api_key_file).read_text().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"--api-key-file: {args.api_key_file} holds no key")
        return lines[0].strip()
    return os.environ.get("INFERD_API_KEY") or None


def run_server(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    if args.config:
        config = load_config(args.config)
    else:
        name = args.served_model_name or model_name_from_source(engine_config.model or str(default_model_path()))
        embedding = None
        if args.embedding_model:
            source = None if args.embedding_model == DEFAULT_EMBEDDING_MODEL else args.embedding_model
            embedding = (DEFAULT_EMBEDDING_MODEL_NAME if source is None else model_name_from_source(source), source)
        config = single_model_config(name, engine_config.model, embedding)
    with _event_loop() as runner:
        return runner.run(_serve(args, config, engine_config))


def _event_loop() -> asyncio.Runner:
    """uvloop where it is installed (a dependency on Linux and macOS): its event loop costs a gateway
    request about a third less CPU than asyncio's (docs/benchmarks.md, gateway overhead)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


async def _serve(args: argparse.Namespace, config: GatewayConfig, engine_config: EngineConfig) -> int:
    shutdown_timeout = args.shutdown_timeout
    sock = _bind(args.host, args.port)  # fail fast, before the models load
    registry = CollectorRegistry()
    gateway_metrics = GatewayMetrics(registry)
    store: Store | None = None
    try:
        store = open_store(args.store)
        versions = await VersionManager.start(config, engine_config, store, gateway_metrics,
                                              max_waiting_requests=args.max_waiting_requests, pinned=pinned_versions,
                                              poll_s=args.versions_poll_s)
    except BaseException:
        sock.close()
        if store is not None:
            store.close()
        raise
    gateway = versions.gateway
    metering: Metering | None = None
    try:
        metering = Metering(store, PriceBook.from_config(versions.effective_config()), max_output_tokens(gateway))

        def versions_changed() -> None:  # new or unloaded versions: their prices and context lengths
            metering.prices = PriceBook.from_config(versions.effective_config())
            metering.max_output = max_output_tokens(gateway)

        versions.on_change = versions_changed
        authenticator = Authenticator(store, admin_key=admin_key(args),
                                      allow_open_admin=args.allow_open_admin)
        batch_runner = BatchRunner(store, gateway, metering, concurrency=args.batch_concurrency,
                                   lease_s=args.batch_lease_s)
        app = build_app(gateway, registry=registry, gateway_metrics=gateway_metrics, metering=metering,
                        authenticator=authenticator, batch_runner=batch_runner,
                        body_limits=BodyLimits(max_bytes=args.max_request_bytes), versions=versions,
                        config_path=args.config)
        log.info("store: %s", store.redacted_url())
        for g in gateway.groups:
            log.info("model %s: %s", g.name, ", ".join(h.name for h in g.handles))
        log.info("serving on http://%s:%d", args.host, args.port)
        loop = asyncio.get_running_loop()
        drains: list[asyncio.Task] = []

        def on_exit_signal() -> None:
            def start_drain():
                # batch lines first: in flight they get the same time; unfinished ones stay to their leases
                drains.append(loop.create_task(batch_runner.stop(shutdown_timeout)))
                for pool in gateway.pools.values():  # no replica starts while the server goes away
                    pool.stop_scaling()
                drains.extend(loop.create_task(h.deployment.drain(shutdown_timeout)) for h in versions.handles())
            loop.call_soon_threadsafe(start_drain)

        if args.config:  # SIGHUP reloads the config, as POST /admin/config/reload does
            loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reload_on_signal(versions, args.config)))

        uv_config = uvicorn.Config(HotPath(app, authenticator), host=args.host, port=args.port, lifespan="off",
                                   log_level=args.log_level.lower(),
                                   timeout_graceful_shutdown=shutdown_timeout + 5)
        server = _Server(uv_config, on_exit_signal)
        batch_runner.start()
        versions.run()
        # everything loaded so far (torch, the models' modules, the app) lives as long as the
        # process: moved out of the collector's view, a full collection no longer walks it (under
        # load one took ~70 ms, the P99 of every request then)
        gc.freeze()
        # a request allocates a few thousand objects, nearly all freed by reference counting; at the
        # default threshold (700) the young generation was collected several times per request
        gc.set_threshold(20_000, 20, 20)
        await server.serve(sockets=[sock])
        for task in drains:
            await task
    finally:
        await versions.aclose()
        if metering is not None:
            await metering.flush()
        store.close()
    return 0 if server.started else 1


async def reload_on_signal(versions: VersionManager, path: str) -> None:
    try:
        await versions.reload_file(path)
    except ValueError as e:  # an invalid file changes nothing; the server goes on as it was
        log.error("config not reloaded: %s", e)


def max_output_tokens(gateway: Gateway) -> dict[str, int]:
    """Per group, the most tokens a request without max_tokens may generate: its local context length."""
    out = {}
    for g in gateway.groups:
        lengths = [h.deployment.info.max_model_len for h in g.handles
                   if h.deployment.info is not None and h.deployment.info.max_model_len
                   and "embeddings" not in h.deployment.endpoints]
        if lengths:
            out[g.name] = max(lengths)
    return out
