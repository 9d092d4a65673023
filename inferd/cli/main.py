"""Command line: `inferd serve | generate | bench | keys | teams | usage | batch | examples | models`.

Engine options are shared by every command that loads a model, so `serve` and
`generate` accept the same flags with the same meaning.
"""

from __future__ import annotations

import argparse
import logging
import sys

from inferd.api.body_limits import DEFAULT_MAX_REQUEST_BYTES
from inferd.engine.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--kv-cache-bytes", default="1GiB", help="KV cache budget on CPU, e.g. 512MiB, 2GiB")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: the fraction of the GPU's memory the engine may use (weights, activations and "
                   "the KV cache, which gets the rest)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs")
    g.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None,
                   help="CUDA: decode batch sizes to capture (default 1, 2, 4, 8, 16, ... up to --max-num-seqs)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=64, help="most requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step (default: 512 on the CPU, 2048 on a GPU)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--num-threads", type=int, default=None, help="torch threads (default: all cores)")
    g.add_argument("--quantization", default="auto", choices=["auto", "none", "gguf", "gguf-q8", "int8", "int4"],
                   help="auto: a Q4_0/Q4_1/Q8_0 GGUF file computes with its own blocks on the CPU (gguf: integer "
                        "dot products over two int8 terms per activation, the same bits at any batch size), "
                        "anything else in floats; gguf-q8: one int8 term, as llama.cpp (~1.8x the prompt "
                        "throughput, 0.5%% worse perplexity: docs/benchmarks.md); none: "
                        "floats (--dtype); int8 (<= 3 rows) or int4 (<= 16 rows): float weights plus lossy "
                        "copies for small batches (see docs/benchmarks.md)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="auto: the model's dtype; int8: int8 levels with a scale per token and head, about "
                        "twice the tokens in the same --kv-cache-bytes (docs/benchmarks.md has its accuracy); "
                        "fp8: the same with float8 e4m3 values, for GPUs (the CPU kernels read int8)")
    g.add_argument("--reasoning-parser", default=None, choices=["think", "deepseek_r1", "qwen3", "none"],
                   help="split <think>...</think> into reasoning_content (default: when the chat template "
                        "thinks)")
    g.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                   help="a Jinja chat template, or a file holding one, instead of the model's own")
    g.add_argument("--grammar-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a structured-output or tool grammar that takes longer to compile is refused (400)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM names it: {"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 1, "adaptive": true}, or {"method": '
                        '"draft_model", "model": PATH, "quantization": "int4"} (see docs/speculative_decoding.md)')
    g.add_argument("--speculative-method", default=None, choices=["ngram", "draft_model"],
                   help="shorthand: turn speculative decoding on with this proposer (prompt lookup, or a draft "
                        "model: without --speculative-model, the target's own weights)")
    g.add_argument("--speculative-model", default=None, metavar="PATH",
                   help="shorthand: a draft model with the target's tokenizer (a model directory or .gguf file)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="the most draft tokens a request verifies in a step (default 4)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of shared prompt prefixes (default: on)")
    v = p.add_argument_group("images (vision-language models, docs/vision.md)")
    v.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                   help="hosts whose http(s) image URLs the server fetches (default: none, data: URLs only)")
    v.add_argument("--max-image-bytes", default="20MB", help="the largest image file taken")
    v.add_argument("--max-image-pixels", type=int, default=32_000_000, help="the most pixels an image may have")
    v.add_argument("--media-fetch-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="the longest fetching one image URL may take")
    v.add_argument("--vision-cache-bytes", default="256MiB",
                   help="memory for decoded images (API process) and for encoder outputs (engine core), each")


def engine_config(args: argparse.Namespace, model: str | None) -> EngineConfig:
    return EngineConfig(
        model=model, dtype=args.dtype, device=args.device, kv_cache_bytes=args.kv_cache_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        cuda_graph_sizes=args.cuda_graph_sizes, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, num_threads=args.num_threads,
        enable_prefix_caching=args.enable_prefix_caching, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype, reasoning_parser=args.reasoning_parser, chat_template=args.chat_template,
        grammar_timeout_s=args.grammar_timeout, speculative_config=speculative_config(args),
        allowed_media_domains=args.allowed_media_domains, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, media_fetch_timeout_s=args.media_fetch_timeout,
        vision_cache_bytes=args.vision_cache_bytes)


def speculative_config(args: argparse.Namespace) -> dict | None:
    """--speculative-config, with --speculative-method, --speculative-model and --num-speculative-tokens filled
    in (they win over the same keys); EngineConfig checks the result."""
    shorthands = {"method": args.speculative_method, "model": args.speculative_model,
                  "num_speculative_tokens": args.num_speculative_tokens}
    if args.speculative_config is None and args.speculative_method is None and args.speculative_model is None:
        if args.num_speculative_tokens is not None:
            raise ValueError("--num-speculative-tokens needs --speculative-method, --speculative-model or "
                             "--speculative-config")
        return None
    from inferd.engine.spec_decode.config import SpeculativeConfig

    config = SpeculativeConfig.options(args.speculative_config or "{}")
    config.update({k: v for k, v in shorthands.items() if v is not None})
    return config


def cmd_generate(args: argparse.Namespace) -> int:
    from inferd.engine.offline.llm_engine import LLMEngine
    from inferd.engine.sampling_params import SamplingParams

    engine = LLMEngine(engine_config(args, args.model))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed, top_p=args.top_p)
    if args.chat:
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    engine.add_request("cli", prompt, params)
    while engine.has_unfinished:
        for out in engine.step():
            sys.stdout.write(out.outputs[0].text_delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from inferd.api.server import run_server

    return run_server(args, engine_config(args, args.model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferd", description="Self-hosted AI inference server.")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    gen.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded model)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("model", nargs="?", default=None,
                       help="HF model directory or .gguf file (default: embedded model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--embedding-model", default=None, metavar="MODEL",
                       help="also serve an embedding model on /v1/embeddings: a sentence-transformers "
                            "directory, or 'default-embedding' (all-MiniLM-L6-v2)")
    serve.add_argument("--config", default=None,
                       help="gateway config (YAML): model groups, local and remote deployments, routing, "
                            "fallbacks; the engine flags below are the defaults of its local engines")
    serve.add_argument("--api-key", default=None,
                       help="the admin key (default: $INFERD_API_KEY); keys made with `inferd keys create` "
                            "are checked as well; with neither, the server is open (a key given here shows "
                            "in `ps`: prefer --api-key-file or the environment)")
    serve.add_argument("--api-key-file", default=None, metavar="PATH",
                       help="read the admin key from this file (its first line)")
    serve.add_argument("--allow-open-admin", action="store_true",
                       help="on a server without keys, let loopback clients use /admin (closed otherwise)")
    serve.add_argument("--store", default=None,
                       help="where keys, limits and the usage ledger live: sqlite:///PATH or "
                            "postgresql://USER@HOST/DB (default: $INFERD_STORE or a SQLite file in the "
                            "user data directory)")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="requests queued beyond --max-num-seqs before 503 + Retry-After "
                            "(default 256, or each local deployment's max_waiting_requests)")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="largest JSON request body accepted; larger ones get 413 (default 8 MiB)")
    serve.add_argument("--batch-concurrency", type=int, default=8,
                       help="batch lines (the Batch API) this server runs at once, at low priority")
    serve.add_argument("--batch-lease-s", type=float, default=30.0,
                       help="a batch line claimed by a server that died is run again after this long")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGTERM")
    serve.add_argument("--versions-poll-s", type=float, default=1.0, metavar="SECONDS",
                       help="how often the server reads the model versions from the store (changes made through "
                            "another replica, automatic rollback, unloading drained versions)")
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    from inferd.cli.batch import add_batch_parser
    from inferd.cli.bench import add_bench_parser
    from inferd.cli.examples import add_examples_parser
    from inferd.cli.keys import add_keys_parsers
    from inferd.cli.models import add_models_parser
    from inferd.cli.usage import add_usage_parser
    add_bench_parser(sub)  # inferd bench throughput | serve
    add_keys_parsers(sub)  # inferd keys ... | teams ...
    add_usage_parser(sub)  # inferd usage
    add_batch_parser(sub)  # inferd batch submit | status | results
    add_examples_parser(sub)  # inferd examples fraud | recommender
    add_models_parser(sub)  # inferd models list | deploy | promote | rollback | history
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"inferd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
