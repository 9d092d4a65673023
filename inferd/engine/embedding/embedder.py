"""`Embedder`: an embedding model in this process — texts or token ids in, vectors out.

It resolves the model argument (a directory, or None / "default-embedding" for
the bundled all-MiniLM-L6-v2), reads its `EmbedSpec` (engine/embedding/spec.py),
builds the BERT encoder (models/bert.py) and runs:

    tokenize (engine/embedding/tokenizer.py) -> length-sorted padded batches under a
    token budget -> encoder -> pooling -> L2 normalization -> optional Matryoshka cut

Sorting by length before batching, and starting a new batch when an input would
need much padding, means a batch holds inputs of similar length, so little of
the work is spent on padding; results are put back in input order.
The offline `LLM.embed` uses it directly; the server runs it in its own process
(engine/embedding/process.py), whose dynamic batches go through `embed_ids`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from inferd.engine.embedding.spec import EmbedConfig, EmbedSpec, SpecFacts, encoder_dir, is_encoder_config, load_spec
from inferd.engine.embedding.tokenizer import EmbedInputs, EmbedTokenizer
from inferd.models.bert import build_bert
from inferd.models.default_embedding_model import resolve_embedding_model
from inferd.models.hf_loader import load_hf_dir

# padding an input may get in a batch: this many tokens, or this fraction of the width
PAD_SLACK_TOKENS = 16
PAD_SLACK_FRACTION = 0.25


@dataclass
class EmbedResult:
    vectors: np.ndarray            # float32 [inputs, dimensions], in input order
    token_ids: list[list[int]]     # what each vector was computed from, special tokens included

    @property
    def num_tokens(self) -> list[int]:
        """Tokens per input (usage's prompt tokens)."""
        return [len(ids) for ids in self.token_ids]

    @property
    def total_tokens(self) -> int:
        return sum(map(len, self.token_ids))


@dataclass
class EmbeddingOutput:
    """vLLM's shape for one vector, which `LLM.embed` returns."""

    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """vLLM's shape for one input's result."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


class Embedder(SpecFacts):
    """An embedding model loaded in this process.

    `Embedder(model, **options)` takes `EmbedConfig` options (dtype, device,
    num_threads, max_batch_tokens, ...), or `Embedder(EmbedConfig(...))`.
    """

    def __init__(self, model: str | os.PathLike | EmbedConfig | None = None, **options):
        self.config = model if isinstance(model, EmbedConfig) else EmbedConfig(
            model=None if model is None else str(model), **options)
        path, name = resolve_embedding_model(self.config.model)
        ckpt = load_hf_dir(encoder_dir(path), progress=self.config.progress)
        if not is_encoder_config(ckpt.config):
            raise ValueError(f"model: {name} is not a BERT-family encoder (config.json architectures "
                             f"{ckpt.config.get('architectures')}, model_type {ckpt.config.get('model_type')!r})")
        self.spec: EmbedSpec = load_spec(path, name, ckpt.config, ckpt.tokenizer.tokenizer_json)
        self.tokenizer = EmbedTokenizer(self.spec)
        torch.set_num_threads(self.config.threads())
        self.device = self.config.torch_device()
        self.dtype = self.config.torch_dtype(self.device)
        self.model = build_bert(ckpt.config, ckpt.tensors, self.dtype, self.device)
        self.pad_id = self.model.cfg.pad_token_id
        self.num_forward_passes = 0  # since start: padded batches run through the encoder

    def embed(self, inputs: EmbedInputs, *, truncate: bool = False,
              dimensions: int | None = None) -> EmbedResult:
        """Embed texts or token id lists; InvalidParameterError on bad input or `dimensions`."""
        self.spec.check_dimensions(dimensions)
        ids = self.tokenizer.encode(inputs, truncate)
        vectors = self.spec.apply_dimensions(self.embed_ids(ids), dimensions)
        return EmbedResult(vectors, ids)

    @torch.inference_mode()
    def embed_ids(self, seqs: list[list[int]]) -> np.ndarray:
        """Pooled (and normalized) vectors [len(seqs), dimension] of checked token id lists."""
        out = np.empty((len(seqs), self.dimension), dtype=np.float32)
        for rows, width in self._batches([len(s) for s in seqs]):
            out[rows] = self._forward([seqs[i] for i in rows], width)
        return out

    def _batches(self, lengths: list[int]) -> list[tuple[list[int], int]]:
        """Input indices grouped into padded batches: (rows, padded length).

        Longest first, so the first input of a batch sets its width; an input joins
        while the batch stays within the token budget and its padding stays within
        the slack, so one long input does not make many short ones pay for its width."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        batches: list[tuple[list[int], int]] = []
        for i in order:
            if batches:
                rows, width = batches[-1]
                if ((len(rows) + 1) * width <= self.config.max_batch_tokens
                        and width - lengths[i] <= max(PAD_SLACK_TOKENS, width * PAD_SLACK_FRACTION)):
                    rows.append(i)
                    continue
            batches.append(([i], lengths[i]))
        return batches

    def _forward(self, batch: list[list[int]], width: int) -> np.ndarray:
        lengths = torch.tensor([len(s) for s in batch])
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, :len(s)] = torch.tensor(s)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        padded = bool((lengths < width).any())
        hidden = self.model(ids.to(self.device), mask.to(self.device) if padded else None)
        self.num_forward_passes += 1
        pooled = pool(hidden.float(), mask.to(self.device), lengths.to(self.device), self.spec.pooling)
        if self.spec.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """[batch, length, hidden] -> [batch, hidden], as sentence-transformers' Pooling does."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":  # right padding: the last real token is at length - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    if mode == "max":
        return hidden.masked_fill(~mask[:, :, None], -1e9).amax(dim=1)
    summed = (hidden * mask[:, :, None]).sum(dim=1)
    count = mask.sum(dim=1, keepdim=True).to(hidden.dtype).clamp(min=1e-9)
    return summed / (count if mode == "mean" else count.sqrt())
