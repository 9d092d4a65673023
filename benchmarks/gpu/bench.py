"""The GPU run: CUDA tests, greedy parity with transformers, offline and serving benchmarks, one table.

Run by benchmarks/gpu/run.sh (on the GPU machine, `--device cuda`; dry-run on a CPU with
`--device cpu --quick`). The model has SmolLM2-135M's architecture (30 layers, hidden
576, 9 heads / 3 KV heads, vocab 49152) with seeded random weights, built here with
transformers: the embedded GGUF does not fit the 64 MiB that travels to the GPU
machine, and speed depends on the shapes alone (every request has a fixed output
length, `ignore_eos`).

Steps, each timed and logged under --out: (1) the CUDA test subset (Triton kernels, the
backend, graphs); (2) greedy tokens against transformers on the same weights, fp32 and
bf16; (3) offline throughput, N requests x 128 prompt x 128 output tokens, inferd with
CUDA graphs, inferd eager, transformers `generate` (eager, one padded batch);
(4) `inferd serve` + `inferd bench serve` at concurrency 1, 16, 64; (5) the floor: the
weights' bytes per decode step over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=0)


def make_model(path: Path, quick: bool) -> Path:
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import CHAT_TEMPLATE

    config = dict(SMOLLM2, num_hidden_layers=4) if quick else SMOLLM2
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    synthetic_tokenizer(config["vocab_size"]).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE}))
    return path


def synthetic_tokenizer(vocab: int):
    """Byte-level BPE over the whole vocabulary with no merges: every id decodes to text of its own (so
    streamed tokens arrive one by one, as a real tokenizer's do), and any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [f"\u0120w{i}" for i in range(vocab - len(tokens))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def run_tests(out: Path) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/layers/triton",
           "tests/engine/test_triton_backend.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"passed": proc.returncode == 0, "summary": last, "seconds": time.perf_counter() - t0}


def greedy_parity(model_dir: Path, device: str, dtype: str, n_tokens: int) -> dict:
    import transformers

    from inferd import LLM, SamplingParams

    tdtype = getattr(torch, dtype)
    prompts = [[5 + (7 * i + 3 * j) % 1900 for j in range(12 + 5 * i)] for i in range(4)]
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=tdtype).to(device).eval()
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=n_tokens,
                              do_sample=False, min_new_tokens=n_tokens)
            expected.append(gen[0, len(p):].tolist())
    del hf
    llm = LLM(str(model_dir), device=device, dtype=dtype, progress=False)
    got = [o.outputs[0].token_ids for o in
           llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True))]
    first_diff = [next((i for i, (a, b) in enumerate(zip(e, g)) if a != b), None) for e, g in zip(expected, got)]
    return {"dtype": dtype, "identical": sum(d is None for d in first_diff), "of": len(prompts),
            "first_divergence": first_diff}


def offline(model_dir: Path, device: str, n: int, in_len: int, out_len: int, eager: bool) -> dict:
    from inferd import LLM, SamplingParams

    llm = LLM(str(model_dir), device=device, progress=False, enforce_eager=eager, max_num_seqs=min(n, 256))
    prompts = [[5 + (11 * i + j) % 1900 for j in range(in_len)] for i in range(n)]
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))   # warm-up
    _sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    _sync(device)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "inferd" + (" eager" if eager else " graphs"), "seconds": dt, "output_tok_s": tokens / dt}


def hf_offline(model_dir: Path, device: str, n: int, in_len: int, out_len: int) -> dict:
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16 if device == "cuda"
                                                       else torch.float32).to(device).eval()
    ids = torch.tensor([[5 + (11 * i + j) % 1900 for j in range(in_len)] for i in range(n)], device=device)
    with torch.no_grad():
        mask = torch.ones_like(ids)
        hf.generate(ids[:4], attention_mask=mask[:4], pad_token_id=0, max_new_tokens=4, min_new_tokens=4,
                    do_sample=False)
        _sync(device)
        t0 = time.perf_counter()
        gen = hf.generate(ids, attention_mask=mask, pad_token_id=0, max_new_tokens=out_len, min_new_tokens=out_len,
                          do_sample=False)
        _sync(device)
    dt = time.perf_counter() - t0
    return {"engine": "transformers generate (eager)", "seconds": dt,
            "output_tok_s": (gen.shape[1] - in_len) * n / dt}


def serving(model_dir: Path, device: str, out: Path, levels: list[tuple[int, int]], in_len: int,
            out_len: int) -> list[dict]:
    port = 8731
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(out / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", str(model_dir), "--device", device,
                               "--port", str(port), "--max-num-seqs", "64"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    rows = []
    try:
        _wait_ready(port, server)
        for concurrency, prompts in levels:
            result = out / f"serve_c{concurrency}.json"
            subprocess.run([sys.executable, "-m", "inferd.cli", "bench", "serve", "--base-url",
                            f"http://127.0.0.1:{port}", "--num-prompts", str(prompts), "--max-concurrency",
                            str(concurrency), "--input-len", str(in_len), "--output-len", str(out_len),
                            "--seed", "0", "--result-json", str(result)], cwd=ROOT, env=env, check=True,
                           capture_output=True)
            r = json.loads(result.read_text())
            m = r.get("metrics", r)
            rows.append({"concurrency": concurrency, "ttft_ms": m["ttft_ms"]["median"],
                         "tpot_ms": m["tpot_ms"]["median"], "output_tok_s": m["output_throughput"],
                         "failed": m["failed"]})
    finally:
        server.terminate()
        server.wait(30)
    return rows


def _wait_ready(port: int, server: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError("inferd serve exited; see serve.log")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError("inferd serve did not answer in time")


def floor(model_dir: Path, device: str) -> dict:
    """Bytes a decode step must read (the weights once) over the measured device copy bandwidth."""
    from safetensors.torch import load_file

    weight_bytes = sum(t.numel() * t.element_size() for t in load_file(str(model_dir / "model.safetensors")).values())
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync(device)
    bandwidth = 2 * x.numel() * 10 / (time.perf_counter() - t0)
    return {"weight_bytes": weight_bytes, "copy_GBps": bandwidth / 1e9, "decode_floor_ms": 1e3 * weight_bytes / bandwidth}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="a dry run: a 4-layer model, few requests")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    quick, device = args.quick, args.device
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__}
    model_dir = make_model(args.out.parent / "gpu-bench-model" if quick else Path("/tmp/gpu-bench-model"), quick)
    steps = [
        ("tests", lambda: run_tests(args.out)),
        ("parity", lambda: [greedy_parity(model_dir, device, dt, 8 if quick else 32)
                            for dt in ("float32", "bfloat16")]),
        ("offline", lambda: [offline(model_dir, device, *(8, 16, 16) if quick else (256, 128, 128), eager=False),
                             offline(model_dir, device, *(8, 16, 16) if quick else (256, 128, 128), eager=True),
                             hf_offline(model_dir, device, *(8, 16, 16) if quick else (256, 128, 128))]),
        ("serving", lambda: serving(model_dir, device, args.out, [(1, 4)] if quick else [(1, 32), (16, 128), (64, 256)],
                                    16 if quick else 128, 16 if quick else 128)),
        ("floor", lambda: floor(model_dir, device)),
    ]
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            report[name] = step()
        except Exception as e:  # noqa: BLE001 - one failed step must not lose the others' numbers
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{name}] {time.perf_counter() - t0:.1f}s", flush=True)
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    return 0


def table(r: dict) -> str:
    lines = [f"device: {r['device']}  torch {r['torch']}", f"tests: {r.get('tests')}"]
    for p in r.get("parity", []) if isinstance(r.get("parity"), list) else [r.get("parity")]:
        lines.append(f"greedy parity vs transformers: {p}")
    fl = r.get("floor", {})
    lines.append(f"floor: {fl}")
    lines.append("| offline | seconds | output tok/s |")
    for o in r.get("offline", []) if isinstance(r.get("offline"), list) else [r.get("offline")]:
        lines.append(f"| {o.get('engine', o)} | {o.get('seconds', 0):.2f} | {o.get('output_tok_s', 0):.0f} |")
    lines.append("| serving concurrency | TTFT ms | TPOT ms | output tok/s |")
    for s in r.get("serving", []) if isinstance(r.get("serving"), list) else [r.get("serving")]:
        lines.append(f"| {s.get('concurrency', s)} | {s.get('ttft_ms')} | {s.get('tpot_ms')} | {s.get('output_tok_s')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
