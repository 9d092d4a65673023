"""Speculative decoding options (vLLM's `speculative_config` names), validated where they enter."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

METHODS = ("ngram",)


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4   # the most drafts one request gets in a step
    prompt_lookup_max: int = 4        # longest suffix n-gram looked up in the request's tokens
    prompt_lookup_min: int = 1        # shortest one that still proposes
    # per step and request, speculate only where it is expected to pay (spec_decode/policy.py);
    # False: every request gets every draft the proposer finds (for tests and measurements)
    adaptive: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method: {self.method!r} is not supported; allowed: "
                             f"{', '.join(METHODS)} (a draft model is not supported yet)")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                raise ValueError(f"speculative_config.{name}: must be an integer in [1, 64], got {v!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive: must be true or false, got {self.adaptive!r}")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a config object, a dict, or JSON text (the CLI's `--speculative-config`)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config: not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config: must be an object such as "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown option(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(known))}")
        return cls(**value)

    def to_dict(self) -> dict:
        return asdict(self)
