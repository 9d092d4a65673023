"""`inferd bench throughput | serve`: argument parsers; the work is in throughput.py and serve.py.

Kept free of heavy imports so `inferd --help` stays fast: each command imports
its module when it runs.
"""

from __future__ import annotations

import argparse


def _throughput(args: argparse.Namespace) -> int:
    from inferd.bench import throughput
    from inferd.cli.main import engine_config
    return throughput.main(args, engine_config)


def _serve(args: argparse.Namespace) -> int:
    from inferd.bench import serve
    return serve.main(args)


def add_bench_parser(sub) -> None:
    """Add `bench` with its two subcommands to the `inferd` subparsers `sub`."""
    from inferd.cli.main import add_engine_args

    bench = sub.add_parser("bench", help="benchmarks: offline engine throughput, online serving")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    tp = bsub.add_parser("throughput", help="offline throughput of the engine (inferd.LLM)",
                         description="N requests of seeded random token prompts, all at once, greedy, "
                                     "fixed output length (ignore_eos); reports requests/s, output "
                                     "tokens/s and total tokens/s.")
    tp.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded model)")
    tp.add_argument("--num-requests", type=int, default=64)
    tp.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    tp.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--dataset-random", action="store_true",
                    help="draw each request's lengths uniformly from len * [1 - r, 1 + r] instead of "
                         "using the given lengths exactly")
    tp.add_argument("--range-ratio", type=float, default=0.5, help="r for --dataset-random")
    tp.add_argument("--result-json", default=None, help="also write the result to this JSON file")
    add_engine_args(tp)
    tp.set_defaults(func=_throughput)

    sv = bsub.add_parser("serve", help="online benchmark of a running OpenAI-compatible server",
                         description="Streams requests to a running OpenAI-compatible server (inferd, "
                                     "llama.cpp's llama-server, vLLM) and reports throughput, TTFT, TPOT, "
                                     "ITL, end-to-end latency and goodput, as vLLM's benchmark_serving.")
    sv.add_argument("--base-url", default="http://127.0.0.1:8000")
    sv.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    sv.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    sv.add_argument("--num-prompts", type=int, default=100)
    sv.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (about)")
    sv.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    sv.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    sv.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests/s as a Poisson process (seeded); inf sends all at once (default)")
    sv.add_argument("--seed", type=int, default=None, help="prompts and arrivals (default: a new seed each run)")
    sv.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                    help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (milliseconds)")
    sv.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles to report")
    sv.add_argument("--tokenizer", default="auto",
                    help="model directory or .gguf whose tokenizer measures prompts; 'auto': the embedded "
                         "model's if installed; 'none': estimate lengths")
    sv.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="do not send ignore_eos (outputs may then be shorter than --output-len)")
    sv.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    sv.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    sv.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    sv.add_argument("--result-json", default=None, help="write metrics and per-request timings here")
    sv.add_argument("--save-text", action="store_true", help="keep generated text in --result-json")
    sv.set_defaults(func=_serve)
