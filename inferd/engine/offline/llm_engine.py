"""In-process engine: tokenizer + engine core + output processor, stepped by the caller.

This is what the offline `LLM` API drives. The server runs the same core in its
own process and the same output processor on the API side.
"""

from __future__ import annotations

import itertools

from inferd.engine.client.output_processor import OutputProcessor
from inferd.engine.config import EngineConfig
from inferd.engine.core.engine_core import EngineCore
from inferd.engine.messages import ImageData
from inferd.engine.outputs import RequestOutput
from inferd.engine.sampling_params import InvalidParameterError, SamplingParams
from inferd.engine.tokenizer import Tokenizer, with_chat_template
from inferd.models.loader import load_checkpoint


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        ckpt = load_checkpoint(config.model, progress=config.progress)
        self.tokenizer = Tokenizer(with_chat_template(ckpt.tokenizer, config.chat_template))
        self.core = EngineCore(config, ckpt, self.tokenizer.eos_token_ids)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, images: list[ImageData] = ()) -> None:
        """Queue a request; `priority`: lower is scheduled sooner (see engine/core/scheduler.py); `images`:
        a vision-language prompt's images, in the order of their tokens in `prompt`."""
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise InvalidParameterError("prompt", "must be a string or a list of token ids")
        # validate before registering, so a rejected request leaves nothing behind
        self.core.validate(ids, params, priority, images)
        for cid, child_params in self.processor.add_request(request_id, text, ids, params):
            self.core.add_request(cid, ids, child_params, priority, images)

    def abort_request(self, request_id: str) -> None:
        for cid in self.processor.child_ids(request_id):
            self.core.abort(cid)
        self.processor.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.core.has_unfinished

    def step(self) -> list[RequestOutput]:
        outputs, to_abort = self.processor.process(self.core.step())
        for cid in to_abort:
            self.core.abort(cid)
        return outputs
