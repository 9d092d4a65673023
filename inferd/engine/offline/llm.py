"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`.

An embedding model (a BERT-family encoder directory, or "default-embedding") is
detected from its config.json and served by an `Embedder` instead of the
generation engine: `LLM("default-embedding").embed(texts)`.
"""

from __future__ import annotations

from typing import Any, Sequence

from tqdm import tqdm

from inferd.engine.config import EngineConfig
from inferd.engine.embedding.embedder import Embedder, EmbeddingOutput, EmbeddingRequestOutput
from inferd.engine.embedding.spec import is_embedding_model
from inferd.engine.offline.llm_engine import LLMEngine
from inferd.engine.outputs import RequestOutput
from inferd.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Run a model offline: batches every prompt it is given through one engine.

    `model` is a Hugging Face directory, a .gguf file, or None for the embedded
    default model; other keyword arguments are `EngineConfig` options (dtype,
    kv_cache_bytes, block_size, max_num_seqs, max_num_batched_tokens, ...).
    For an embedding model (see the module docstring) they are `EmbedConfig`
    options (dtype, device, num_threads, max_batch_tokens, progress).
    """

    def __init__(self, model: str | None = None, **engine_options: Any):
        self.engine: LLMEngine | None = None
        self.embedder: Embedder | None = None
        if is_embedding_model(model):
            self.embedder = Embedder(model, **engine_options)
        else:
            self.engine = LLMEngine(EngineConfig(model=model, **engine_options))

    @property
    def tokenizer(self):
        return self._generation_engine().tokenizer

    def _generation_engine(self) -> LLMEngine:
        if self.engine is None:
            raise ValueError(f"{self.embedder.model_name} is an embedding model: "
                             "use LLM.embed(), not generate() or chat()")
        return self.engine

    def embed(self, prompts: str | Sequence[str] | Sequence[list[int]], *, truncate: bool = False,
              dimensions: int | None = None) -> list[EmbeddingRequestOutput]:
        """Embed texts (or token id lists, used as they are), as vLLM's `LLM.embed` does.

        Returns one `EmbeddingRequestOutput` per prompt, in order:
        `out.outputs.embedding` is a list of floats, `out.prompt_token_ids` the tokens
        it was computed from. Inputs longer than the model's limit raise
        `InvalidParameterError` unless `truncate`; `dimensions` cuts Matryoshka models'
        vectors (other models allow only their own size).
        """
        if self.embedder is None:
            raise ValueError("LLM.embed needs an embedding model (a BERT-family encoder directory, "
                             "or 'default-embedding'); this one generates text")
        result = self.embedder.embed(prompts, truncate=truncate, dimensions=dimensions)
        return [EmbeddingRequestOutput(str(i), EmbeddingOutput(v.tolist()), ids)
                for i, (v, ids) in enumerate(zip(result.vectors, result.token_ids))]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; `priority` (one per prompt, lower is scheduled
        sooner, as in vLLM) matters only when they do not all fit in the engine at once."""
        self._generation_engine()
        if isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params: give one, or one per prompt")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError("priority: give one per prompt")
        return self._run(prompts, params_list, use_tqdm, priorities)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[Prompt], params_list: list[SamplingParams], use_tqdm: bool,
             priorities: list[int]) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, params, priority in zip(prompts, params_list, priorities):
                rid = engine.next_request_id()
                engine.add_request(rid, prompt, params, priority)
                ids.append(rid)
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm)
        while len(done) < len(ids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[rid] for rid in ids]
