"""The engine core: model, KV cache, scheduler and runner behind `add/abort/step`.

It speaks token ids only (and, for a vision-language model, preprocessed images: their
encoder runs here, engine/core/vision.py): text, detokenization and stop strings are the
front-end's job (engine/client/output_processor.py), so the core can run in its own
process and exchange small typed messages with the API process.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time

import torch

from inferd.engine.config import GGUF_TERMS, EngineConfig
from inferd.engine.core import cuda_graphs
from inferd.engine.core.guidance import GrammarCompiler
from inferd.engine.core.image_prompt import image_prompt_for
from inferd.engine.core.kv_cache import KVCacheManager
from inferd.engine.core.model_runner import ModelRunner
from inferd.engine.core.request import Request
from inferd.engine.core.scheduler import Scheduler, SchedulerConfig
from inferd.engine.core.vision import VisionRunner
from inferd.engine.messages import EngineCoreOutput, ImageData
from inferd.engine.sampling_params import InvalidParameterError, SamplingParams, check_context
from inferd.engine.spec_decode.draft_model import DraftModel
from inferd.engine.spec_decode.speculator import Speculator
from inferd.layers import cpu_kernels, kv_storage, quant_blocks, triton_ops
from inferd.layers.attention import AttentionBackend, TorchAttentionBackend
from inferd.layers.triton_attention import TritonAttentionBackend
from inferd.models.checkpoint import Checkpoint
from inferd.models.loader import build_model, build_vision_encoder

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, ckpt: Checkpoint, eos_token_ids: list[int]):
        self.config = config
        torch.set_num_threads(config.threads())
        self.device = config.torch_device()
        # compiled now rather than inside the first request
        kernels = self.device.type == "cpu" and cpu_kernels.available()
        has_blocks = any(t.kind in quant_blocks.PACKABLE for t in ckpt.quantized.values())
        self.quantization = config.resolve_quantization(has_blocks, self.device, kernels)
        self.dtype = config.model_dtype(self.device, self.quantization)
        t0 = time.perf_counter()
        self.model, self.model_config = build_model(ckpt, self.dtype, self.device)
        gguf_terms = GGUF_TERMS.get(self.quantization)
        if gguf_terms:
            packed = self.model.use_gguf_blocks(ckpt.quantized, gguf_terms)
            log.info("%d projections compute with the GGUF file's blocks (%s kernels)", packed,
                     cpu_kernels.load().quant_matmul_path())
        elif self.quantization:
            self.model.quantize(self.quantization)
        log.info("model built in %.2fs (%s, %s)", time.perf_counter() - t0, self.device, self.dtype)
        self.eos_token_ids = frozenset(eos_token_ids)

        spec = config.speculative_config
        draft = None
        if spec is not None and spec.method == "draft_model":
            draft = DraftModel(spec, self.model, ckpt.tokenizer, self.device, self.dtype,
                               gguf_terms=gguf_terms)

        mc = self.model_config
        bytes_per_block = mc.num_layers * config.block_size * kv_storage.bytes_per_token(
            config.kv_cache_dtype, mc.num_kv_heads, mc.head_dim, self.dtype)
        if draft is not None:  # the budget holds both pools, which have the same number of blocks
            bytes_per_block += draft.bytes_per_block(config.block_size, config.kv_cache_dtype)
        num_blocks = self._kv_budget() // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes: budget is below one block ({bytes_per_block} bytes)")
        self.kv_caches = [kv_storage.allocate(config.kv_cache_dtype, num_blocks, config.block_size,
                                              mc.num_kv_heads, mc.head_dim, self.dtype, self.device)
                          for _ in range(mc.num_layers)]
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings, num_blocks * config.block_size)
        if draft is not None:
            draft.allocate(num_blocks, config.block_size, config.kv_cache_dtype)
            if draft.cfg.max_position_embeddings < self.max_model_len:
                log.warning("max_model_len: %d, the draft model's context (was %d)",
                            draft.cfg.max_position_embeddings, self.max_model_len)
                self.max_model_len = draft.cfg.max_position_embeddings
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len,
                                                   spec.num_speculative_tokens if spec is not None else 0), self.kv)
        self.grammars = GrammarCompiler(ckpt.tokenizer, mc.vocab_size, eos_token_ids)
        self._compiling: dict[str, tuple[Request, concurrent.futures.Future]] = {}
        self.speculator = Speculator(spec, self.max_model_len, draft) if spec is not None else None
        self.runner = ModelRunner(self.model, self.kv_caches, config.block_size,
                                  self._attention_backend(bool(gguf_terms)), self.device)
        if self.device.type == "cuda" and not config.enforce_eager and isinstance(self.runner.backend,
                                                                                 TritonAttentionBackend):
            self.runner.graphs = self._capture_graphs(cuda_graphs.cuda_capture())
        self.vision_spec = ckpt.vision
        self.vision = None
        if ckpt.vision is not None:
            self.vision = VisionRunner(build_vision_encoder(ckpt, self.dtype, self.device), self.device,
                                       cache_bytes=config.vision_cache_bytes)

    def _capture_graphs(self, capture: cuda_graphs.Capture) -> cuda_graphs.DecodeGraphs:
        t0 = time.perf_counter()
        sizes = self.config.cuda_graph_sizes or cuda_graphs.default_buckets(self.config.max_num_seqs)
        max_blocks = -(-self.max_model_len // self.config.block_size)
        graphs = cuda_graphs.DecodeGraphs(self.model, self.kv_caches, self.runner.backend, max_blocks, sizes,
                                          self.device, capture)
        log.info("captured CUDA graphs for decode batches of %s in %.1fs", sizes, time.perf_counter() - t0)
        return graphs

    def _attention_backend(self, batch_invariant: bool) -> AttentionBackend:
        """Triton's paged kernels on a GPU (INFERD_TRITON=0 keeps the torch reference path), torch's
        elsewhere."""
        if self.device.type == "cuda" and triton_ops.enabled():
            mc = self.model_config
            return TritonAttentionBackend(mc.num_heads, mc.num_kv_heads)
        return TorchAttentionBackend(batch_invariant=batch_invariant)

    def _kv_budget(self) -> int:
        """CPU: --kv-cache-bytes. CUDA: what --gpu-memory-utilization of the card leaves once the weights
        (and anything else already on it) and the activations of the largest step are counted."""
        if self.device.type != "cuda":
            return self.config.kv_cache_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        allowed = int(total * self.config.gpu_memory_utilization)
        budget = allowed - (total - free) - self._activation_reserve()
        if budget <= 0:
            raise ValueError(f"gpu_memory_utilization: {self.config.gpu_memory_utilization} of {total / 2**30:.1f} GiB "
                             f"leaves no room for the KV cache ({(total - free) / 2**30:.1f} GiB is in use)")
        return budget

    def _activation_reserve(self) -> int:
        """Bytes the largest step may allocate beside the KV cache: its hidden states and projections (twice,
        for the allocator's slack), fp32 logits and the sampler's copies of them, and a fixed 512 MiB for
        CUDA graphs and the matmul library's workspaces."""
        mc, c = self.model_config, self.config
        per_token = (4 * mc.hidden_size + (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
                     + 2 * mc.intermediate_size) * self.dtype.itemsize
        logits = 8 * c.max_num_seqs * mc.vocab_size * 4
        return 2 * c.max_num_batched_tokens * per_token + logits + (512 << 20)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, images: list[ImageData] = ()) -> None:
        """Queue a request; `priority`: lower is scheduled sooner (see engine/core/scheduler.py). A
        constrained one waits for its grammar to compile (on a worker thread) before it is scheduled,
        one with images for their encoder output."""
        self.validate(prompt_token_ids, params, priority, images)
        req = Request(request_id, list(prompt_token_ids), params, self.eos_token_ids, priority=priority,
                      image_prompt=image_prompt_for(prompt_token_ids, list(images), self.vision_spec))
        if params.grammar is None:
            self._queue(req)
        else:
            self._compiling[request_id] = (req, self.grammars.submit(params.grammar))

    def _queue(self, req: Request) -> None:
        if req.image_prompt is not None and req.image_prompt.embeds is None:
            self.vision.submit(req)
        else:
            self.scheduler.add(req)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
                 images: list[ImageData] = ()) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidParameterError("priority", f"must be an integer, got {priority!r}")
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidParameterError("prompt", "must contain at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParameterError("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise InvalidParameterError("logit_bias", f"token id {bad} is outside the vocabulary [0, {vocab})")
        check_context(n, params.max_tokens, self.max_model_len)
        image_prompt_for(prompt_token_ids, list(images), self.vision_spec)

    def abort(self, request_id: str) -> bool:
        pending = self._compiling.pop(request_id, None)
        if pending is not None:
            pending[1].cancel()
            return True
        if self.vision is not None and self.vision.abort(request_id):
            return True
        return self.scheduler.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._compiling) or bool(self.vision and self.vision.pending)

    @property
    def compiling(self) -> set[str]:
        """Requests still waiting for their grammar or their images' encoder output."""
        return set(self._compiling) | (self.vision.pending if self.vision is not None else set())

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Schedule the requests whose grammar is ready; end those whose grammar failed (the edge checks
        grammars with the same compiler and limits, so this is not expected)."""
        if not self._compiling:
            return []
        if not self.scheduler.has_unfinished:  # nothing else to run: wait a little for a compile
            concurrent.futures.wait([f for _, f in self._compiling.values()], timeout=0.01,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        failed = []
        for rid, (req, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[rid]
            try:
                req.matcher = future.result()
            except Exception as e:  # noqa: BLE001 - a grammar the edge let through: end this request only
                log.error("request %s: its grammar did not compile in the engine: %s", rid, e)
                failed.append(EngineCoreOutput(rid, [], finish_reason="abort",
                                               num_prompt_tokens=req.num_prompt_tokens))
                continue
            self._queue(req)
        return failed

    def _admit_encoded(self) -> list[EngineCoreOutput]:
        """Encode images for a while (engine/core/vision.py) and schedule the requests whose images are
        all encoded; end those whose image failed to encode."""
        if self.vision is None or not self.vision.pending:
            return []
        ready, failed = self.vision.advance(busy=self.scheduler.has_unfinished)
        for req in ready:
            self.scheduler.add(req)
        return [EngineCoreOutput(r.request_id, [], finish_reason="abort", num_prompt_tokens=r.num_prompt_tokens)
                for r in failed]

    def step(self) -> list[EngineCoreOutput]:
        failed = self._admit_compiled() + self._admit_encoded()
        out = self.scheduler.schedule()
        if not out.requests:
            return failed
        if self.speculator is None:
            return failed + self.scheduler.update(out, self.runner.execute(out))
        self.speculator.extend(self.scheduler, out)
        started = time.perf_counter()
        result = self.runner.execute(out)
        self.speculator.observe(out, result, time.perf_counter() - started)
        return failed + self.scheduler.update(out, result)
