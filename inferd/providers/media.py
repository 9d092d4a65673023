"""Images in chat requests: OpenAI's `image_url` content parts, fetched, checked and preprocessed.

`MediaLoader.load(body)` returns the request's images in the order of their parts
(engine/image_processor.py's `ProcessedImage`: tiles and content hash), or raises a
400 naming the part (`messages.<i>.content.<j>.image_url`). A `data:` URL is decoded
in place (base64, a MIME type of PNG, JPEG, WebP or GIF, at most `max_bytes`). An
http(s) URL is fetched only when its host is one of `allowed_domains` (the
`--allowed-media-domains` flag, empty by default: no fetching at all, so a request
cannot make the server call out), without following redirects, within
`timeout_s` for the whole fetch and `max_bytes` for the body (read in chunks and cut
as soon as it is exceeded, whatever Content-Length says). `detail` is honoured:
`low` is the whole image at one tile, `high` the split into tiles, `auto` (or none)
what the model's processor config says.

Decoding and preprocessing run on one worker thread (`ThreadPoolExecutor(1)`): off the
event loop, and one image at a time, so a burst of images takes at most one core from
the engine core's decoding. The image processor caches results by content hash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import urllib.parse
from dataclasses import dataclass

import httpx

from inferd.engine.image_processor import FORMATS, ImageError, ImageProcessor, ProcessedImage
from inferd.wire.errors import ErrorKind, InferdError
from inferd.wire.schema import ChatCompletionRequest

_DETAIL_SPLIT = {None: None, "auto": None, "low": False, "high": True}


@dataclass(frozen=True)
class MediaLimits:
    allowed_domains: tuple[str, ...] = ()
    max_bytes: int = 20_000_000
    timeout_s: float = 10.0


def _invalid(param: str, message: str) -> InferdError:
    return InferdError(ErrorKind.INVALID_REQUEST, f"{param}: {message}", status=400, param=param,
                       code="invalid_image")


def image_parts(body: ChatCompletionRequest) -> list[tuple[str, object]]:
    """(param, image_url) of every image part, in prompt order."""
    found = []
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type == "image_url":
                    found.append((f"messages.{i}.content.{j}.image_url", part.image_url))
    return found


class MediaLoader:
    def __init__(self, processor: ImageProcessor, limits: MediaLimits):
        self.processor, self.limits = processor, limits
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inferd-images")

    async def load(self, body: ChatCompletionRequest) -> list[ProcessedImage]:
        images = []
        loop = asyncio.get_running_loop()
        for param, image_url in image_parts(body):
            if image_url is None or not image_url.url:
                raise _invalid(param, "an image_url part needs image_url.url")
            if image_url.detail not in _DETAIL_SPLIT:
                raise _invalid(f"{param}.detail", f"{image_url.detail!r} is not one of auto, low, high")
            data, mime = await self._fetch(image_url.url, param)
            try:
                images.append(await loop.run_in_executor(self._pool, self.processor.process, data, mime,
                                                         _DETAIL_SPLIT[image_url.detail]))
            except ImageError as e:
                raise _invalid(param, str(e)) from e
        return images

    async def _fetch(self, url: str, param: str) -> tuple[bytes, str | None]:
        if url.startswith("data:"):
            return self._data_url(url, param)
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise _invalid(param, "the URL must be a data: URL (or http(s) where the server allows it), "
                           f"not {parsed.scheme or 'a relative'} URL")
        host = (parsed.hostname or "").lower()
        if host not in self.limits.allowed_domains:
            allowed = ", ".join(self.limits.allowed_domains)
            raise _invalid(param, f"images are not fetched from {host!r}; "
                           + (f"allowed hosts: {allowed}" if allowed else
                              "this server takes data: URLs only (--allowed-media-domains is not set)"))
        try:
            return await asyncio.wait_for(self._get(url, param), self.limits.timeout_s)
        except asyncio.TimeoutError:
            raise _invalid(param, f"fetching the image took longer than {self.limits.timeout_s:g} s") from None
        except httpx.HTTPError as e:
            raise _invalid(param, f"the image could not be fetched: {type(e).__name__}") from e

    async def _get(self, url: str, param: str) -> tuple[bytes, str | None]:
        limit = self.limits.max_bytes
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.limits.timeout_s, trust_env=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _invalid(param, f"fetching the image answered HTTP {response.status_code}")
                mime = response.headers.get("content-type", "").split(";")[0].strip().lower() or None
                self._check_mime(mime, param)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise _invalid(param, f"the image is larger than {limit} bytes")
                    chunks.append(chunk)
        return b"".join(chunks), mime

    def _data_url(self, url: str, param: str) -> tuple[bytes, str]:
        header, comma, payload = url[len("data:"):].partition(",")
        mime, *options = header.split(";")
        mime = mime.strip().lower()
        if not comma or "base64" not in options:
            raise _invalid(param, "a data: URL must be base64 (data:image/png;base64,...)")
        self._check_mime(mime, param)
        if len(payload) * 3 // 4 > self.limits.max_bytes + 2:
            raise _invalid(param, f"the image is larger than {self.limits.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True), mime
        except (binascii.Error, ValueError) as e:
            raise _invalid(param, "the data: URL is not valid base64") from e

    @staticmethod
    def _check_mime(mime: str | None, param: str) -> None:
        if mime not in set(FORMATS.values()) | {"image/jpg"}:
            raise _invalid(param, f"MIME type {mime!r} is not an image type the server takes "
                           f"({', '.join(sorted(FORMATS.values()))})")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
