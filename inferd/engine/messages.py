"""Every message that crosses a process boundary, in one place.

The API process talks to each model process (an engine core, an embedding
process) over ZMQ; messages are msgspec structs, tagged unions encoded as
msgpack. Engine values (`SamplingParams`, `EngineCoreOutput`, `PositionLogprobs`,
`TokenizerSpec`, `EmbedSpec`) travel as they are, so there is one definition of
each. `Shutdown`, `StartupFailed` and `Fatal` are shared by both protocols; the
plumbing that sends them is engine/process_link.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from inferd.engine.embedding.spec import EmbedSpec
from inferd.engine.sampling_params import SamplingParams
from inferd.models.checkpoint import TokenizerSpec, VisionSpec

# -- values inside messages ---------------------------------------------------------------

@dataclass
class PositionLogprobs:
    """Logprobs at one position: the actual token first, then the top-N alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class EngineCoreOutput:
    """What one step produced for one request (deltas, not cumulative)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    new_prompt_logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ImageData:
    """One image of a prompt, preprocessed on the API side (engine/image_processor.py): its tiles as
    float32 [tiles, 3, tile, tile] bytes, the `num_tokens` image tokens they stand for in the prompt,
    and the sha256 of the image file, which names it to the encoder cache and the prefix cache."""

    hash: str
    num_tokens: int
    shape: list[int]
    pixels: bytes


# -- messages every child protocol shares -------------------------------------------------

class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class StartupFailed(msgspec.Struct, tag="startup_failed", array_like=True):
    error: str  # worded for the user: "<what> failed to start: <exception>"


class Fatal(msgspec.Struct, tag="fatal", array_like=True):
    error: str  # the traceback


# -- API process -> engine core -----------------------------------------------------------

class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str                                  # the user's request (for `Rejected`)
    prompt_token_ids: list[int]
    children: list[tuple[str, SamplingParams]]       # core request ids: one per sample
    priority: int = 0                                # lower is scheduled sooner
    images: list[ImageData] = []                     # in the order their tokens come in the prompt


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


ToEngineCore = AddRequest | Abort | Shutdown


# -- engine core -> API process -----------------------------------------------------------

class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    tokenizer: TokenizerSpec
    source: str          # the checkpoint's path
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    pid: int
    vision: VisionSpec | None = None  # a vision-language model's image processing


class Stats(msgspec.Struct, tag="stats", array_like=True):
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0   # fraction of KV blocks in use, 0..1
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0  # since start
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0     # of those, served from it
    # speculative decoding, since start (engine/spec_decode/speculator.py; zeros when it is off)
    spec_decode_num_drafts: int = 0            # request-steps that verified drafts
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = []  # [k]: drafts accepted at position k
    # vision-language models, since start (engine/core/vision.py)
    images_encoded: int = 0            # images run through the vision encoder
    image_encoder_cache_hits: int = 0  # images whose encoder output was cached


class Outputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[EngineCoreOutput]
    scheduled: list[tuple[str, float]]  # (user's request id, monotonic time) on first scheduling
    stats: Stats


class Rejected(msgspec.Struct, tag="rejected", array_like=True):
    request_id: str
    param: str | None
    message: str


FromEngineCore = CoreReady | StartupFailed | Stats | Outputs | Rejected | Fatal


# -- API process -> embedding process -----------------------------------------------------

class EmbedRequest(msgspec.Struct, tag="embed", array_like=True):
    request_id: int
    token_ids: list[list[int]]


ToEmbedder = EmbedRequest | Shutdown


# -- embedding process -> API process -----------------------------------------------------

class EmbedStats(msgspec.Struct, array_like=True):
    """Counters since start. A batch is one dynamic batch of requests; each is
    computed in one or more forward passes (padded sub-batches)."""

    num_requests: int = 0
    num_batches: int = 0
    num_inputs: int = 0
    num_tokens: int = 0
    num_forward_passes: int = 0

    @property
    def mean_batch_size(self) -> float:
        """Requests per dynamic batch."""
        return self.num_requests / self.num_batches if self.num_batches else 0.0


class EmbedReady(msgspec.Struct, tag="ready", array_like=True):
    spec: EmbedSpec
    pid: int


class Embeddings(msgspec.Struct, tag="embeddings", array_like=True):
    request_id: int
    vectors: bytes       # float32, row-major [inputs, spec.dimension]
    stats: EmbedStats


FromEmbedder = EmbedReady | StartupFailed | Embeddings | Fatal
