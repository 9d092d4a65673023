"""One ONNX model in an ONNX Runtime session, sized so it cannot starve the LLM engine.

ONNX Runtime's defaults use every core and spin its idle threads; beside an engine core on the
same few cores that would steal the engine's time. So: `intra_op_num_threads` small (default 1,
the batcher's batches are what make it fast), one inter-op thread, sequential execution, and
no spinning (`session.intra_op.allow_spinning` = "0").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferd.classic.loader import onnx_bytes, require
from inferd.classic.signature import Signature


class OnnxModel:
    def __init__(self, model: bytes, intra_op_num_threads: int = 1, source: str = "the model"):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            self.signature = Signature.of(self.session)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own exception types
            raise ValueError(f"ONNX Runtime cannot load {source}: {str(e)[:500]}") from None
        self._names = list(self.signature.output_names)

    @classmethod
    def load(cls, path: str | Path, intra_op_num_threads: int = 1) -> OnnxModel:
        return cls(onnx_bytes(path), intra_op_num_threads, source=str(path))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for `feeds` (blocking: call it off the event loop)."""
        return dict(zip(self._names, self.session.run(self._names, feeds)))
