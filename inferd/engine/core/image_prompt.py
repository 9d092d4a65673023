"""Where a request's images sit in its prompt, and what they contribute to its KV blocks' hashes.

A vision-language prompt holds each image as a run of `<image>` tokens (with row/column
and boundary tokens between tiles, engine/image_processor.py). `ImagePrompt` lists the
prompt positions of those tokens in order; the k-th of them takes row k of `embeds`,
the images' encoder outputs one after the other (engine/core/vision.py fills it). A
step that computes positions [start, end) takes `span(start, end)` of them, so a
prefill chunk may end in the middle of an image and the next chunk picks it up.

The prefix cache must not share a block between two different images behind the same
token ids: `block_key(start, end)` is what a block adds to its hash, the hash of each
image with tokens in the block and the index of its first feature there (so the same
image at another offset differs too). Blocks without image tokens add nothing, so
text-only prefixes hash as they always did.
"""

from __future__ import annotations

import bisect
import struct
from itertools import accumulate

import numpy as np
import torch

from inferd.engine.messages import ImageData
from inferd.engine.sampling_params import InvalidParameterError
from inferd.models.checkpoint import VisionSpec


class ImagePrompt:
    def __init__(self, images: list[ImageData], positions: list[int]):
        self.images = images
        self.positions = positions
        # index into `positions` of each image's first token, and the end
        self.starts = [0, *accumulate(img.num_tokens for img in images)]
        self.digests = [bytes.fromhex(img.hash) for img in images]
        self.embeds: torch.Tensor | None = None  # [len(positions), hidden], once every image is encoded

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The image tokens among prompt positions [start, end), as a range of `positions` (and `embeds`)."""
        return bisect.bisect_left(self.positions, start), bisect.bisect_left(self.positions, end)

    def block_key(self, start: int, end: int) -> bytes:
        lo, hi = self.span(start, end)
        if lo == hi:
            return b""
        key = []
        first = bisect.bisect_right(self.starts, lo) - 1
        last = bisect.bisect_right(self.starts, hi - 1) - 1
        for k in range(first, last + 1):
            key.append(self.digests[k] + struct.pack("<q", max(lo, self.starts[k]) - self.starts[k]))
        return b"".join(key)


def image_prompt_for(prompt_token_ids: list[int], images: list[ImageData],
                     vision: VisionSpec | None) -> ImagePrompt | None:
    """The prompt's `ImagePrompt` (None without images), after checking that its image tokens are
    exactly those of its images and each image's tiles are what the model takes; the errors name
    the parameter."""
    if vision is None:
        if images:
            raise InvalidParameterError("messages", "this model does not take images (it is not a "
                                        "vision-language model)")
        return None
    positions = [i for i, t in enumerate(prompt_token_ids) if t == vision.image_token_id]
    expected = sum(img.num_tokens for img in images)
    if len(positions) != expected:
        raise InvalidParameterError("prompt", f"the prompt holds {len(positions)} image tokens (id "
                                    f"{vision.image_token_id}) but its {len(images)} image(s) stand for {expected}")
    tile = vision.tile_size
    for img in images:
        if (len(img.shape) != 4 or img.shape[1:] != [3, tile, tile]
                or img.num_tokens != img.shape[0] * vision.tokens_per_tile
                or len(img.pixels) != 4 * int(np.prod(img.shape))):
            raise InvalidParameterError("messages", f"image {img.hash[:12]}: its pixels are not "
                                        f"[tiles, 3, {tile}, {tile}] float32 for {img.num_tokens} tokens")
    return ImagePrompt(images, positions) if images else None
