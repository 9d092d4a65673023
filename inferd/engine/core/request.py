"""A request as the engine core sees it: tokens, progress, and its KV blocks.

The engine's one rule lives on this object: `token_ids` is everything known
(prompt, then outputs) and `num_computed_tokens` is how much of it already sits in
the KV cache. The scheduler only ever decides how many of the remaining tokens to
compute next; prefill, chunked prefill, decode and recompute after preemption are
all that same step.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from inferd.engine.core.image_prompt import ImagePrompt
from inferd.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower is scheduled sooner (vLLM's convention); batch work uses 10
    # a vision-language prompt's images: where their tokens are, their encoder output once
    # computed (engine/core/image_prompt.py); None for text
    image_prompt: ImagePrompt | None = None

    def __post_init__(self):
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # the KV cache manager's alone: the block table, the chained hashes of full blocks,
        # and how many of the table are registered in the prefix cache
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (for usage)
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # prompt logprobs already produced (for positions 1..num_prompt_tokens-1);
        # kept across preemption so recomputation does not report them twice
        self.num_prompt_logprobs_done = 0
        # an llguidance matcher when the output is constrained (engine/core/guidance.py), advanced
        # by each sampled token; preemption keeps it, since the tokens it has seen stay
        self.matcher = None
        # speculative decoding (engine/spec_decode/): the draft tokens scheduled in the current step,
        # after token_ids, and the proposer's and acceptance state, kept across preemption
        self.spec_token_ids: list[int] = []
        self.spec = None
        # how many of token_ids a draft model (spec_decode/draft_model.py) holds KV for, in its own pool at
        # this request's slots: valid only with the blocks, so the KV manager zeroes it when it frees them
        # and cuts it to what it keeps when it gives a tail back
        self.num_draft_computed_tokens = 0
        self.generator: torch.Generator | None = None
        if self.params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.params.seed)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (self.params.prompt_logprobs is not None
                and self.num_prompt_logprobs_done < self.num_prompt_tokens - 1)
