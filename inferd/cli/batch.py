"""`inferd batch submit | status | results`: the Batch API from the command line, through a running server.

`submit` uploads a JSONL file (the OpenAI batch input format), creates the batch
and, with `--wait`, shows a progress bar until it ends; `status` prints the
batch; `results` writes its output (and, with `--errors`, its error) file.
The server and key come from `--base-url` / `--api-key` or `$INFERD_BASE_URL` /
`$INFERD_API_KEY`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from inferd.cli.http_api import Api, add_server_args

FINAL = ("completed", "failed", "expired", "cancelled")


def _summary(b: dict) -> str:
    n = b["request_counts"]
    return f"{b['id']}  {b['status']}  {n['completed']}/{n['total']} done, {n['failed']} failed"


def _wait(api: Api, batch: dict) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=batch["request_counts"]["total"], unit="req", desc=batch["id"], file=sys.stderr)
    try:
        while batch["status"] not in FINAL:
            time.sleep(1.0)
            batch = api.call("GET", f"/v1/batches/{batch['id']}").json()
            n = batch["request_counts"]
            bar.update(n["completed"] + n["failed"] - bar.n)
            bar.set_postfix_str(batch["status"])
    finally:
        bar.close()
    return batch


def cmd_submit(args: argparse.Namespace) -> int:
    path = Path(args.file)
    api = Api(args)
    with path.open("rb") as fh:
        f = api.call("POST", "/v1/files", files={"file": (path.name, fh, "application/jsonl")},
                     data={"purpose": "batch"}).json()
    endpoint = args.endpoint or _endpoint_of(path)
    body = {"input_file_id": f["id"], "endpoint": endpoint, "completion_window": args.completion_window}
    batch = api.call("POST", "/v1/batches", json=body).json()
    print(batch["id"])
    if args.wait:
        batch = _wait(api, batch)
        print(_summary(batch))
        return 0 if batch["status"] == "completed" else 1
    return 0


def _endpoint_of(path: Path) -> str:
    with path.open() as fh:
        for line in fh:
            if line.strip():
                return json.loads(line).get("url", "/v1/chat/completions")
    raise ValueError(f"{path} has no requests")


def cmd_status(args: argparse.Namespace) -> int:
    batch = Api(args).call("GET", f"/v1/batches/{args.batch_id}").json()
    print(json.dumps(batch, indent=2) if args.json else _summary(batch))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    api = Api(args)
    batch = api.call("GET", f"/v1/batches/{args.batch_id}").json()
    if batch["status"] not in FINAL:
        raise ValueError(f"the batch is {batch['status']}; results come when it has ended")
    file_id = batch["error_file_id" if args.errors else "output_file_id"]
    content = api.call("GET", f"/v1/files/{file_id}/content").content if file_id else b""
    if args.output == "-":
        sys.stdout.buffer.write(content)
    else:
        Path(args.output).write_bytes(content)
        print(f"{len(content.splitlines())} lines -> {args.output}")
    return 0


def add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="Batch API jobs on a running server: submit, status, results")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    submit = bsub.add_parser("submit", help="upload a JSONL file and start a batch")
    submit.add_argument("file")
    submit.add_argument("--endpoint", default=None, choices=["/v1/chat/completions", "/v1/completions",
                                                             "/v1/embeddings"],
                        help="default: the url of the file's first line")
    submit.add_argument("--completion-window", default="24h")
    submit.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    status = bsub.add_parser("status")
    status.add_argument("batch_id")
    status.add_argument("--json", action="store_true")
    results = bsub.add_parser("results", help="write the batch's output file")
    results.add_argument("batch_id")
    results.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    results.add_argument("--errors", action="store_true", help="the error file instead")
    for q, fn in ((submit, cmd_submit), (status, cmd_status), (results, cmd_results)):
        add_server_args(q)
        q.set_defaults(func=fn)
