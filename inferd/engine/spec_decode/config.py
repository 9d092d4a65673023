"""Speculative decoding options (vLLM's `speculative_config` names), validated where they enter.

Two proposers: `ngram` (prompt lookup, spec_decode/ngram.py) and `draft_model` (a
smaller model with the target's tokenizer, spec_decode/draft_model.py). As in
vLLM, giving a draft `model` alone picks `draft_model`. With `draft_model` and no
`model`, the draft is the target's own weights, at `quantization` if given: the
int4 self-draft (`{"method": "draft_model", "quantization": "int4"}`) needs no
second file. Options of the other proposer are refused, not ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model")
DRAFT_QUANTIZATIONS = ("int8", "int4")
_NGRAM_DEFAULTS = {"prompt_lookup_max": 4, "prompt_lookup_min": 1}


@dataclass
class SpeculativeConfig:
    method: str | None = None         # ngram | draft_model; None: draft_model if a draft is named, else ngram
    num_speculative_tokens: int = 4   # the most drafts one request gets in a step
    prompt_lookup_max: int | None = None  # ngram: longest suffix n-gram looked up (default 4)
    prompt_lookup_min: int | None = None  # ngram: shortest one that still proposes (default 1)
    model: str | None = None          # draft_model: a model directory or .gguf file; None: the target's weights
    quantization: str | None = None   # draft_model: int8 | int4 copies of the draft's weights (CPU, bfloat16)
    # per step and request, speculate only where it is expected to pay (spec_decode/policy.py);
    # False: every request gets every draft the proposer finds (for tests and measurements)
    adaptive: bool = True

    def __post_init__(self):
        if self.method is None:
            self.method = "draft_model" if self.model is not None or self.quantization is not None else "ngram"
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method: {self.method!r} is not supported; allowed: "
                             f"{', '.join(METHODS)}")
        if self.method == "ngram":
            for name in ("model", "quantization"):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config.{name}: only for method draft_model, not ngram")
            for name, default in _NGRAM_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        else:
            for name in _NGRAM_DEFAULTS:
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config.{name}: only for method ngram, not draft_model")
            if self.model is not None and (not isinstance(self.model, str) or not self.model):
                raise ValueError(f"speculative_config.model: must be a path, got {self.model!r}")
            if self.quantization is not None and self.quantization not in DRAFT_QUANTIZATIONS:
                raise ValueError(f"speculative_config.quantization: {self.quantization!r} is not one of "
                                 f"{', '.join(DRAFT_QUANTIZATIONS)} (or null: the draft's own precision)")
        for name in ("num_speculative_tokens", *_NGRAM_DEFAULTS):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                raise ValueError(f"speculative_config.{name}: must be an integer in [1, 64], got {v!r}")
        if self.method == "ngram" and self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive: must be true or false, got {self.adaptive!r}")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a config object, a dict, or JSON text (the CLI's `--speculative-config`)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        return cls(**cls.options(value))

    @classmethod
    def options(cls, value: dict | str) -> dict:
        """The options as a dict (from JSON text or a dict), their names checked; values are checked when
        the config is made, so that the CLI can fill in its shorthand flags first."""
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
        return dict(value)
