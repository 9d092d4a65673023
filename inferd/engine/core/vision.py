"""The vision encoder in the engine core: images encoded between model steps, cached by content hash.

A request with images (engine/core/image_prompt.py) waits here until every image has
its encoder output, then joins the scheduler like any request. Encoding runs on the
core's own thread, in small units (the patch embedding of a tile, then one encoder layer
of one tile at a time: `VisionEncoder.steps`), interleaved with the model steps of the
running requests rather than beside them on other threads: on a machine of a few cores,
two torch thread pools on the same cores slow each other down far more than they gain.
While requests are running, encoding gets at most `share` of the time the rest of the
loop takes (a token bucket: each unit's time is paid for by `share` x the time since the
last one), so decoding slows by at most that fraction while images arrive; with
nothing running, encoding takes the whole loop. One image is encoded at a time, oldest
first; a request waits for all of its images.

Encoder outputs are kept by the image's sha256 (LRU, at most `cache_bytes`): a repeated
image is not encoded again, and a request asking for an image already being encoded
waits for that job. A failure ends the requests that need the image, not the core.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Generator

import numpy as np
import torch

from inferd.engine.core.request import Request
from inferd.engine.messages import ImageData
from inferd.models.siglip import VisionEncoder

log = logging.getLogger(__name__)

# the most loop time one call credits: a step this long earns its full share, while the time since the last
# image (the loop did not ask) earns no burst of encoding
MAX_INTERVAL_S = 2.0


class _Job:
    def __init__(self, image: ImageData, steps: Generator):
        self.image, self.steps = image, steps
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None


class VisionRunner:
    def __init__(self, encoder: VisionEncoder, device: torch.device, *, cache_bytes: int, share: float = 0.5):
        self.encoder, self.device = encoder, device
        self.cache_bytes, self.share = cache_bytes, share
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._jobs: deque[_Job] = deque()                      # oldest first; [0] is being encoded
        self._job_of: dict[str, _Job] = {}
        # each waiting request and its images' outputs so far (None: not yet)
        self._waiting: dict[str, tuple[Request, list[torch.Tensor | None]]] = {}
        self._ready: list[Request] = []  # submitted with every image already cached
        self._credit = 0.0
        self._last = time.perf_counter()
        self.num_encoded = 0
        self.num_cache_hits = 0

    @property
    def pending(self) -> set[str]:
        """Requests waiting for their images."""
        return set(self._waiting) | {r.request_id for r in self._ready}

    def submit(self, req: Request) -> None:
        images = req.image_prompt.images
        outputs: list[torch.Tensor | None] = []
        for image in images:
            cached = self._cache.get(image.hash)
            if cached is not None:
                self._cache.move_to_end(image.hash)
                self.num_cache_hits += 1
            elif image.hash not in self._job_of:
                pixels = torch.from_numpy(np.frombuffer(image.pixels, np.float32).reshape(image.shape).copy())
                job = _Job(image, self.encoder.steps(pixels.to(self.device)))
                self._jobs.append(job)
                self._job_of[image.hash] = job
            outputs.append(cached)
        if all(o is not None for o in outputs):
            self._set_embeds(req, outputs)
            self._ready.append(req)
        else:
            self._waiting[req.request_id] = (req, outputs)

    def abort(self, request_id: str) -> bool:
        if self._waiting.pop(request_id, None) is not None:
            return True
        kept = [r for r in self._ready if r.request_id != request_id]
        found, self._ready = len(kept) < len(self._ready), kept
        return found

    def advance(self, busy: bool) -> tuple[list[Request], list[Request]]:
        """Encode for a while (all of it when not `busy`, else within the share); returns the requests
        now ready to schedule, and those whose image failed to encode."""
        now = time.perf_counter()
        self._credit = min(self.share * MAX_INTERVAL_S,
                           self._credit + self.share * min(MAX_INTERVAL_S, now - self._last))
        finished: list[_Job] = []
        with torch.inference_mode():
            while self._jobs and (not busy or self._credit > 0):
                job = self._jobs[0]
                started = time.perf_counter()
                try:
                    next(job.steps)
                except StopIteration as done:
                    job.result = done.value
                except Exception as e:  # noqa: BLE001 - a bad image must not take the core down
                    log.error("image %s could not be encoded: %s", job.image.hash[:12], e)
                    job.error = e
                self._credit -= time.perf_counter() - started
                if job.result is not None or job.error is not None:
                    self._jobs.popleft()
                    del self._job_of[job.image.hash]
                    finished.append(job)
                    if not busy:
                        break  # let the loop look at its inbox between images
        self._last = time.perf_counter()
        for job in finished:
            if job.result is not None:
                self.num_encoded += 1
                self._remember(job.image.hash, job.result)
        return self._collect(finished)

    def _collect(self, finished: list[_Job]) -> tuple[list[Request], list[Request]]:
        ready, failed, self._ready = self._ready, [], []
        if not finished:
            return ready, failed
        by_hash = {job.image.hash: job for job in finished}
        for rid, (req, outputs) in list(self._waiting.items()):
            broken = False
            for i, image in enumerate(req.image_prompt.images):
                job = by_hash.get(image.hash)
                if job is not None and outputs[i] is None:
                    outputs[i] = job.result
                    broken = broken or job.error is not None
            if broken:
                del self._waiting[rid]
                failed.append(req)
            elif all(o is not None for o in outputs):
                del self._waiting[rid]
                self._set_embeds(req, outputs)
                ready.append(req)
        return ready, failed

    @staticmethod
    def _set_embeds(req: Request, outputs: list[torch.Tensor]) -> None:
        req.image_prompt.embeds = torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _remember(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.cache_bytes or key in self._cache:
            return
        self._cache[key] = value
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()
