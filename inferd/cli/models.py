"""`inferd models list | deploy | promote | rollback | history`: model versions, through a running server.

Deploying loads the new version on the server, so these commands call its admin
API (api/routes_models.py) rather than the store: the server says at once whether
the version loaded, and why not. SPEC is a YAML or JSON file, or the text of one:
one deployment as it would stand under a group's `deployments:` in the config, or
a list of them. Replicas sharing the store follow within their poll interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from inferd.cli.http_api import Api, add_server_args

_DEPLOY_TIMEOUT_S = 900.0  # a local model loads before the answer comes


def read_spec(text: str) -> object:
    """A spec from a file path, or the spec's own YAML/JSON text."""
    path = Path(text)
    try:
        source = path.read_text() if path.is_file() else text
    except OSError as e:
        raise ValueError(f"cannot read {text}: {e.strerror or e}") from None
    try:
        spec = yaml.safe_load(source)
    except yaml.YAMLError as e:
        raise ValueError(f"the spec is not valid YAML or JSON: {e}") from None
    if not isinstance(spec, (dict, list)):
        raise ValueError(f"the spec must be a deployment (a mapping) or a list of them, or a file holding one; "
                         f"{text!r} is neither")
    return spec


def _serving(card: dict) -> str:
    canary = f"  canary {card['canary']} ({card['canary_percent']:g}% of keys)" if card["canary"] else ""
    return f"{card['model']}: stable {card['stable']}{canary}"


def _loaded(card: dict) -> list[str]:
    lines = []
    for v in card["loaded"]:
        health = v["health"] or {}
        state = "draining" if v["draining"] else "serving"
        lines.append(f"  {v['label']:<12} {state:<9} in flight {v['in_flight']:<4} requests {health.get('requests', 0):<6}"
                     f" errors {health.get('error_rate', 0.0):.1%}  {', '.join(v['deployments'])}")
    return lines


def _print(card: dict, as_json: bool) -> None:
    print(json.dumps(card, indent=2) if as_json else "\n".join([_serving(card), *_loaded(card)]))


def cmd_list(args: argparse.Namespace) -> int:
    api = Api(args)
    if args.model:
        cards = [api.call("GET", f"/admin/models/{args.model}").json()]
    else:
        cards = api.call("GET", "/admin/models").json()["data"]
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    for card in cards:
        print(_serving(card))
        for line in _loaded(card):
            print(line)
        for v in card.get("versions", []):
            print(f"  version {v['label']:<12} {v['hash'][:12]}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    body = {"spec": read_spec(args.spec), "canary": args.canary, "label": args.label}
    card = Api(args, timeout=_DEPLOY_TIMEOUT_S).call("POST", f"/admin/models/{args.model}/deploy", json=body).json()
    _print(card, args.json)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    _print(Api(args, timeout=_DEPLOY_TIMEOUT_S).call("POST", f"/admin/models/{args.model}/promote").json(), args.json)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else None
    card = Api(args, timeout=_DEPLOY_TIMEOUT_S).call("POST", f"/admin/models/{args.model}/rollback", json=body).json()
    _print(card, args.json)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    events = Api(args).call("GET", f"/admin/models/{args.model}/history", params={"limit": args.limit}).json()["data"]
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    from datetime import datetime, timezone

    for e in events:
        when = datetime.fromtimestamp(e["ts"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        moved = f"{e['previous']} -> {e['label']}" if e["previous"] else e["label"] or ""
        share = f" ({e['canary_percent']:g}%)" if e["canary_percent"] else ""
        reason = f"  {e['reason']}" if e["reason"] else ""
        print(f"{when}  {e['action']:<13} {moved}{share}{reason}")
    return 0


def add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="model versions on a running server: list, deploy, promote, rollback, history")
    msub = p.add_subparsers(dest="models_command", required=True)
    lst = msub.add_parser("list", help="what each model group serves, and its versions")
    lst.add_argument("model", nargs="?", default=None)
    deploy = msub.add_parser("deploy", help="load SPEC as a version of MODEL and send it traffic")
    deploy.add_argument("model")
    deploy.add_argument("spec", help="a YAML/JSON file, or its text: one deployment or a list of them")
    deploy.add_argument("--canary", type=float, default=None, metavar="PERCENT",
                        help="send this percent of API keys to it (default: all traffic)")
    deploy.add_argument("--label", default=None, help="the version's label (default: the next v<number>)")
    promote = msub.add_parser("promote", help="make the canary the stable version")
    promote.add_argument("model")
    rollback = msub.add_parser("rollback", help="take the canary out, or return to the previous stable version")
    rollback.add_argument("model")
    rollback.add_argument("--reason", default=None)
    hist = msub.add_parser("history", help="deploys, promotions, rollbacks and failed loads, newest first")
    hist.add_argument("model")
    hist.add_argument("--limit", type=int, default=50)
    for q, fn in ((lst, cmd_list), (deploy, cmd_deploy), (promote, cmd_promote), (rollback, cmd_rollback),
                  (hist, cmd_history)):
        add_server_args(q)
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=fn)
