"""What the engine returns to its users (the `LLM` API and the server)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str


# one dict per position: token id -> Logprob; the chosen token comes first
PositionLogprobDict = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobDict] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None     # stop | length | abort
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # what this step added, for streaming
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[PositionLogprobDict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PositionLogprobDict | None] | None = None
    finished: bool = False
    num_cached_tokens: int = 0
