"""Images to tiles and prompt tokens for a vision-language model (Idefics3 / SmolVLM), on the API side.

`ImageProcessor.process(data)` decodes an image file (PNG, JPEG, WebP, GIF; Pillow,
imported on first use so the engine core never needs it) and does what the model's
`Idefics3ImageProcessor` does, from its `VisionSpec`: convert to RGB (transparency
over white), resize so the longest edge is `longest_edge` (Lanczos), then to whole
tiles of `tile_size` and split into them row by row, plus the whole image at one tile
(the global image), or without splitting resize it to one tile; then rescale and
normalize to float32 [tiles, 3, tile, tile]. `prompt_text` is the text that stands
for the image in the prompt (the processor's expansion of `<image>`: a row/column tag
and `tokens_per_tile` image tokens per tile, then the global image's).

Results are cached by the sha256 of the file's bytes (LRU, bounded in bytes): the
same image sent again is not decoded again, and the hash names the image to the
engine (its encoder cache and the prefix cache key on it). Bad input raises
`ImageError` with a message for the user: a truncated or undecodable file, a format
other than the one its MIME type names, more pixels than `max_pixels`.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from inferd.engine.messages import ImageData
from inferd.models.checkpoint import VisionSpec

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
MAX_SIDE = 4096  # the processor's bound on a resized image's edge


class ImageError(ValueError):
    """An image the server cannot take (the message says why)."""


@dataclass(frozen=True)
class ProcessedImage:
    hash: str            # sha256 of the file's bytes, hex
    pixels: np.ndarray   # float32 [tiles, 3, tile, tile]
    rows: int            # tile grid of the split image (0, 0: one tile, not split)
    cols: int
    num_tokens: int      # image tokens in the prompt (tiles * tokens_per_tile)

    def message(self) -> ImageData:
        """As the engine core takes it."""
        return ImageData(self.hash, self.num_tokens, list(self.pixels.shape), self.pixels.tobytes())


class ImageProcessor:
    def __init__(self, spec: VisionSpec, *, max_pixels: int = 32_000_000, cache_bytes: int = 256 << 20):
        self.spec = spec
        self.max_pixels = max_pixels
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, bool], ProcessedImage] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.cache_hits = 0

    # -- prompt text ----------------------------------------------------------------------

    def prompt_text(self, image: ProcessedImage, image_token: str = "<image>") -> str:
        """What `Idefics3Processor` puts in place of one `<image>` of the rendered prompt."""
        seq = image_token * self.spec.tokens_per_tile
        fake, glob = "<fake_token_around_image>", "<global-img>"
        text = ""
        for r in range(image.rows):
            for c in range(image.cols):
                text += f"{fake}<row_{r + 1}_col_{c + 1}>{seq}"
            text += "\n"
        if image.rows:
            text += "\n"
        return f"{text}{fake}{glob}{seq}{fake}"

    def expand(self, text: str, images: list[ProcessedImage], placeholder: str = "<image>") -> str:
        """A rendered prompt with each `placeholder` (one per image, in order) replaced by its image's
        text; raises `ImageError` when the counts differ."""
        pieces = text.split(placeholder)
        if len(pieces) - 1 != len(images):
            raise ImageError(f"the prompt has {len(pieces) - 1} image placeholder(s) ({placeholder}) for "
                             f"{len(images)} image(s); text may not contain {placeholder} itself")
        out = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            out += [self.prompt_text(image, placeholder), piece]
        return "".join(out)

    # -- pixels ---------------------------------------------------------------------------

    def process(self, data: bytes, mime: str | None = None, split: bool | None = None) -> ProcessedImage:
        """Decode and preprocess an image file; `mime`: the type the client declared (checked against
        the file), `split`: tile the image (None: as the model's processor config says)."""
        split = self.spec.do_image_splitting if split is None else split
        key = (hashlib.sha256(data).hexdigest(), split)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return hit
        image = self._decode(data, mime)
        tiles, rows, cols = self._tiles(image, split)
        pixels = self._normalize(tiles)
        out = ProcessedImage(key[0], pixels, rows, cols, len(tiles) * self.spec.tokens_per_tile)
        self._remember(key, out)
        return out

    def _remember(self, key, out: ProcessedImage) -> None:
        size = out.pixels.nbytes
        if size > self.cache_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = out
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.pixels.nbytes

    def _decode(self, data: bytes, mime: str | None):
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageError(f"the image has too many pixels (the limit is {self.max_pixels})") from e
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a bad file
            raise ImageError("the data is not an image in a supported format "
                             f"({', '.join(sorted(FORMATS.values()))})") from e
        actual = FORMATS.get(image.format)
        if actual is None:
            raise ImageError(f"image format {image.format} is not supported "
                             f"(supported: {', '.join(sorted(FORMATS.values()))})")
        if mime is not None and mime != actual and not (mime == "image/jpg" and actual == "image/jpeg"):
            raise ImageError(f"the image is {actual}, not {mime} as its MIME type says")
        w, h = image.size
        if w * h > self.max_pixels:
            raise ImageError(f"the image is {w}x{h} pixels; the limit is {self.max_pixels} pixels")
        try:
            image.load()
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data
            raise ImageError(f"the {actual} image is truncated or corrupt: {e}") from e
        if not self.spec.do_convert_rgb:
            return image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")

    def _resize(self, image, height: int, width: int):
        return image.resize((width, height), resample=self.spec.resample)

    def _tiles(self, image, split: bool) -> tuple[list, int, int]:
        """The tiles (PIL images of tile x tile pixels) in prompt order, and the grid's rows and columns."""
        spec, tile = self.spec, self.spec.tile_size
        if spec.do_resize:
            image = self._resize(image, *_longest_edge_size(image.height, image.width, spec.longest_edge))
        if not split:
            return [self._resize(image, tile, tile)], 0, 0
        image = self._resize(image, *_whole_tiles_size(image.height, image.width, tile))
        if image.height <= tile and image.width <= tile:
            return [image], 0, 0
        rows, cols = image.height // tile, image.width // tile
        tiles = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
                 for r in range(rows) for c in range(cols)]
        return tiles + [self._resize(image, tile, tile)], rows, cols

    def _normalize(self, tiles: list) -> np.ndarray:
        spec = self.spec
        arrays = []
        for t in tiles:
            a = np.asarray(t)
            a = a[:, :, None] if a.ndim == 2 else a
            if spec.do_rescale:  # in float64 then down, as the reference processor rounds
                a = (a.astype(np.float64) * spec.rescale_factor).astype(np.float32)
            else:
                a = a.astype(np.float32)
            if spec.do_normalize:
                a = (a - np.array(spec.image_mean, np.float32)) / np.array(spec.image_std, np.float32)
            arrays.append(a.transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(arrays), dtype=np.float32)


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The processor's first resize: the longest edge to `longest`, the other edge even, at most MAX_SIDE."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, int(MAX_SIDE / aspect)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, int(MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def _whole_tiles_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both edges up to whole tiles, keeping the aspect ratio as the processor does."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width
