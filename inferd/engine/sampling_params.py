"""Per-request sampling parameters, validated where they enter.

Names and defaults follow vLLM's `SamplingParams` (and so the OpenAI API): a user
of either finds the same knobs here. Invalid values raise `InvalidParameterError`
naming the parameter, which the API layer turns into a 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


class InvalidParameterError(ValueError):
    """A request parameter is out of range; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """InvalidParameterError when a prompt and its output cap do not fit the context (the API side checks
    before sending the prompt to the engine, the core again as it admits it)."""
    n = num_prompt_tokens
    if n + (max_tokens or 0) > max_model_len or n >= max_model_len:
        raise InvalidParameterError(
            "max_tokens" if n < max_model_len else "prompt",
            f"this model's maximum context length is {max_model_len} tokens; the prompt "
            f"has {n} tokens and max_tokens is {max_tokens}")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0              # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None          # top-N alternatives per sampled token
    prompt_logprobs: int | None = None   # top-N alternatives per prompt token
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    grammar: str | None = None           # an llguidance grammar the output must match (engine/structured.py)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self):
        def bad(param, msg):
            raise InvalidParameterError(param, msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            bad("max_tokens", f"must be an integer >= 0, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= 20):
                bad(name, f"must be an integer in [0, 20], got {v!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or token < 0:
                bad("logit_bias", f"keys must be token ids (non-negative integers), got {token!r}")
            if not -100 <= bias <= 100:
                bad("logit_bias", f"values must be in [-100, 100], got {bias} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def for_child(self, index: int) -> "SamplingParams":
        """Params for sample `index` of an n > 1 request: n=1, seed offset by index."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)
