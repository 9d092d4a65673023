"""Cold and warm load time of the embedded model, each in a fresh process.

Cold: the GGUF conversion cache is empty (a temporary cache directory), so the file
is parsed and the cache written. Warm: the same cache directory again. Reports the
median of --repeats runs of `LLM()` (model built, KV cache allocated), not counting
the Python/torch import.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine_info, save_json, write_doc_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROBE = """
import json, time
import inferd
t = time.perf_counter()
inferd.LLM(progress=False)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def _once(cache_dir: str) -> float:
    env = {**os.environ, "XDG_CACHE_HOME": cache_dir}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            cold.append(_once(d))
            warm.append(_once(d))
    res = {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm), "cold_all": cold, "warm_all": warm}
    save_json("load_time", {"machine": machine_info(), "results": res})
    m = machine_info()
    write_doc_section("load_time", f"""## Load time of the embedded model

`python benchmarks/load_time.py` — `LLM()` on SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), fresh
process each time, median of {args.repeats}. {m['date']}, {m['cpu']}, {m['cores']} cores.

| | seconds |
|---|---|
| cold (parse GGUF, write the conversion cache) | {res['cold_s']:.2f} |
| warm (conversion cache) | {res['warm_s']:.2f} |
""")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
