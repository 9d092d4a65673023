"""`inferd examples fraud | recommender`: make an example model offline and print the config that serves it."""

from __future__ import annotations

import argparse

import yaml


def _fraud(args: argparse.Namespace) -> int:
    from inferd.classic.examples import fraud

    return _show(fraud(args.out, n_samples=args.samples, n_estimators=args.estimators), "fraud",
                 '{"inputs": [{"name": "input", "shape": [1, 20], "datatype": "FP32", "data": [0.1, ...]}]}')


def _recommender(args: argparse.Namespace) -> int:
    from inferd.classic.examples import recommender

    return _show(recommender(args.out, n_users=args.users, n_items=args.items, dim=args.dim, k=args.k),
                 "recommender", '{"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [42]}]}')


def _show(example, name: str, body: str) -> int:
    print(f"# {example.report}")
    for f in example.files:
        print(f"# wrote {f}")
    print(f"# serve it: inferd serve --config {example.directory / 'inferd.yaml'}")
    print(f"# then: curl -s localhost:8000/v2/models/{name}/infer -d '{body}'")
    text = yaml.safe_dump(example.config, sort_keys=False)
    (example.directory / "inferd.yaml").write_text(text)
    print(text, end="")
    return 0


def add_examples_parser(sub) -> None:
    p = sub.add_parser("examples", help="make an example tensor model (needs the classic-ml extra)")
    kinds = p.add_subparsers(dest="example", required=True)
    f = kinds.add_parser("fraud", help="a gradient-boosted fraud scorer trained on synthetic transactions")
    f.add_argument("--out", default="inferd-fraud", help="directory to write the model and config into")
    f.add_argument("--samples", type=int, default=20_000)
    f.add_argument("--estimators", type=int, default=100)
    f.set_defaults(func=_fraud)
    r = kinds.add_parser("recommender", help="top-k items by dot product of embeddings, as an ONNX graph")
    r.add_argument("--out", default="inferd-recommender", help="directory to write the model and config into")
    r.add_argument("--users", type=int, default=1000)
    r.add_argument("--items", type=int, default=10_000)
    r.add_argument("--dim", type=int, default=32)
    r.add_argument("--k", type=int, default=10)
    r.set_defaults(func=_recommender)
