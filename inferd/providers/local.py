"""`LocalEngineDeployment`: a model running on inferd's own engine, as a gateway deployment.

It owns an `AsyncEngine` (the engine core in its own process), runs typed
requests through `LocalChat` / `LocalCompletion` (the request id is the
engine's, so its log lines name it),
and turns the engine's exceptions into classified `InferdError`s so the gateway
treats a local engine exactly like a remote one: overload is `OVERLOADED` with
the engine's retry hint, a prompt over the context length is `CONTEXT_LENGTH`,
a dead core is `SERVER`, a bad parameter is `INVALID_REQUEST` naming it.
A vision-language model's deployment also owns the `MediaLoader` (providers/media.py)
that fetches and preprocesses a chat request's images before it is tokenized.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from inferd.engine.client.async_client import (AsyncEngine, EngineDeadError, EngineOverloadedError, RequestAbortedError,
                                               RequestMetrics, RequestRejectedError)
from inferd.engine.config import EngineConfig
from inferd.engine.image_processor import ImageProcessor
from inferd.engine.messages import Stats
from inferd.engine.process_link import ChildHost
from inferd.engine.sampling_params import InvalidParameterError
from inferd.engine.tokenizer import ChatTemplateError, Tokenizer
from inferd.providers.base import Deployment, ModelInfo
from inferd.providers.constraints import check_grammar
from inferd.providers.local_chat import LocalChat
from inferd.providers.local_completions import LocalCompletion
from inferd.providers.media import MediaLimits, MediaLoader, image_parts
from inferd.wire.errors import ErrorKind, InferdError
from inferd.wire.request import InferenceRequest

_RUNS = {"chat": LocalChat, "completions": LocalCompletion}


def engine_error(exc: Exception) -> InferdError | None:
    """The classified error for an engine-side exception (None: not an engine error, a bug)."""
    if isinstance(exc, InferdError):
        return exc
    if isinstance(exc, InvalidParameterError):
        if "maximum context length" in str(exc):
            return InferdError(ErrorKind.CONTEXT_LENGTH, str(exc), status=400, param=exc.param,
                                 code="context_length_exceeded")
        return InferdError(ErrorKind.INVALID_REQUEST, str(exc), status=400, param=exc.param)
    if isinstance(exc, ChatTemplateError):
        return InferdError(ErrorKind.INVALID_REQUEST, f"messages: {exc}", status=400, param="messages")
    if isinstance(exc, RequestRejectedError):
        return InferdError(ErrorKind.INVALID_REQUEST, str(exc), status=400)
    if isinstance(exc, EngineOverloadedError):
        return InferdError(ErrorKind.OVERLOADED, str(exc), status=503, code="server_overloaded",
                             retry_after=exc.retry_after)
    if isinstance(exc, EngineDeadError):
        return InferdError(ErrorKind.SERVER, f"the model engine is not available: {exc}", status=503,
                             code="engine_unavailable")
    if isinstance(exc, RequestAbortedError):
        return InferdError(ErrorKind.SERVER, str(exc), status=503, code="shutting_down", retry_after=5)
    return None


def refusal(check_accepting) -> InferdError | None:
    """Why a client's `check_accepting()` would refuse a request now, classified (None: it would not)."""
    try:
        check_accepting()
    except Exception as e:  # noqa: BLE001 - it says why the client takes nothing
        return engine_error(e)
    return None


@contextlib.contextmanager
def classified():
    try:
        yield
    except Exception as e:
        err = engine_error(e)
        if err is None or err is e:
            raise
        raise err from e


class LocalEngineDeployment(Deployment):
    """A local engine core serving one model under `model_name`."""

    takes_prefill = True  # continue_final_message (local_chat.py)

    def __init__(self, name: str, model_name: str, config: EngineConfig, *,
                 max_waiting_requests: int = 256, host: ChildHost | None = None):
        self.name, self.model_name = name, model_name
        self.engine = AsyncEngine(config, max_waiting_requests=max_waiting_requests, host=host)
        self.media: MediaLoader | None = None

    async def start(self) -> None:
        info = await self.engine.start()
        if info.vision is not None:
            c = self.engine.config
            processor = ImageProcessor(info.vision, max_pixels=c.max_image_pixels, cache_bytes=c.vision_cache_bytes)
            self.media = MediaLoader(processor, MediaLimits(tuple(c.allowed_media_domains), c.max_image_bytes,
                                                            c.media_fetch_timeout_s))

    @property
    def info(self) -> ModelInfo:
        i = self.engine.info
        return ModelInfo(self.model_name, source=i.source, max_model_len=i.max_model_len, vocab_size=i.vocab_size)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def stats(self) -> Stats:
        return self.engine.stats

    def observe_requests(self, on_done: Callable[[RequestMetrics], None]) -> None:
        self.engine.on_request_done = on_done

    @property
    def healthy(self) -> bool:
        return self.engine.is_healthy

    def unavailable(self) -> InferdError:
        return refusal(self.engine.check_accepting) or super().unavailable()

    @property
    def capacity(self) -> int:
        """Requests the engine runs at once; more wait in its queue."""
        return self.engine.info.max_num_seqs

    def _run(self, request: InferenceRequest, images: list):
        if request.endpoint not in _RUNS:
            raise InferdError(ErrorKind.INVALID_REQUEST, f"{self.model_name!r} does not serve {request.endpoint}",
                              status=400, param="model")
        if request.endpoint == "chat" and self.media is not None:
            return LocalChat(self.engine, request, self.model_name, self.media.processor, images)
        return _RUNS[request.endpoint](self.engine, request, self.model_name)

    async def _prepared(self, request: InferenceRequest):
        """The request's images fetched and preprocessed (providers/media.py), the request tokenized (its
        template rendered) on a worker thread, so a long prompt never holds the event loop, and its
        grammar checked within its bound."""
        images = []
        if self.media is not None and request.endpoint == "chat" and image_parts(request.body):
            self.engine.check_accepting(request.body.n)  # before the work of decoding images
            images = await self.media.load(request.body)
        run = await asyncio.to_thread(self._run, request, images)
        await check_grammar(run.params.grammar, run.constraint_param, self.engine.config.grammar_timeout_s)
        return run

    async def request(self, request: InferenceRequest) -> dict:
        with classified():
            run = await self._prepared(request)
            return await run.response()

    async def stream(self, request: InferenceRequest) -> AsyncIterator[dict]:
        with classified():
            run = await self._prepared(request)
            chunks = run.stream()
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

    async def drain(self, timeout: float) -> None:
        await self.engine.drain(timeout)

    async def aclose(self) -> None:
        if self.media is not None:
            self.media.close()
        await self.engine.shutdown()
