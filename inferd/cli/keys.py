"""`inferd keys create|list|revoke` and `inferd teams set|list`: tenancy from the command line.

These work on the store directly (the same file or database a server uses, and
while it runs), so the first keys can be made before any server starts. A
new key's secret is printed once; it is not stored and cannot be shown again.
"""

from __future__ import annotations

import argparse
import json
import time

from inferd.store import default_store_url, open_store
from inferd.tenancy import keys
from inferd.tenancy.keys import Limits


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help=f"store URL (default: $INFERD_STORE or {default_store_url()})")


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, default=None, metavar="USD", help="spend allowed per budget period")
    p.add_argument("--budget-period", default="monthly", choices=keys.BUDGET_PERIODS)
    p.add_argument("--rpm", type=int, default=None, help="requests per minute")
    p.add_argument("--tpm", type=int, default=None, help="tokens per minute (prompt + completion)")
    p.add_argument("--max-parallel", type=int, default=None, help="requests in flight at once")


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(args.budget, args.budget_period, args.rpm, args.tpm, args.max_parallel)


def _in_store(args: argparse.Namespace, fn):
    store = open_store(args.store)
    try:
        return store.run_sync(fn)
    finally:
        store.close()


def _fmt(value) -> str:
    return "-" if value is None else str(value)


def _print_rows(rows: list[dict], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def cmd_keys_create(args: argparse.Namespace) -> int:
    limits = _limits(args)
    info, secret = _in_store(args, lambda tx: keys.create_key(
        tx, team=args.team, now=time.time(), name=args.name, limits=limits, is_admin=args.admin,
        cache_ttl=args.cache_ttl))
    if args.json:
        print(json.dumps({**info.to_dict(), "key": secret}))
    else:
        print(f"created {info.id} for team {info.team!r}; the key (shown only now):\n{secret}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    rows = [k.to_dict() for k in _in_store(args, lambda tx: keys.list_keys(tx, args.team, args.all))]
    if args.json:
        print(json.dumps(rows))
    else:
        _print_rows(rows, ["id", "prefix", "team", "name", "is_admin", "budget_usd", "budget_period", "rpm", "tpm",
                           "max_parallel", "revoked"])
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    if not _in_store(args, lambda tx: keys.revoke_key(tx, args.key_id, time.time())):
        raise ValueError(f"no live key has the id {args.key_id!r}")
    print(f"revoked {args.key_id}")
    return 0


def cmd_teams_set(args: argparse.Namespace) -> int:
    limits = _limits(args)
    info = _in_store(args, lambda tx: keys.set_team(tx, args.team, limits, time.time()))
    print(json.dumps(info.to_dict()) if args.json else f"team {info.name!r}: {info.limits}")
    return 0


def cmd_teams_list(args: argparse.Namespace) -> int:
    rows = [t.to_dict() for t in _in_store(args, keys.list_teams)]
    if args.json:
        print(json.dumps(rows))
    else:
        _print_rows(rows, ["name", "budget_usd", "budget_period", "rpm", "tpm", "max_parallel"])
    return 0


def add_keys_parsers(sub) -> None:
    k = sub.add_parser("keys", help="API keys: create, list, revoke")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key for a team (printed once)")
    create.add_argument("--team", required=True)
    create.add_argument("--name", default=None)
    create.add_argument("--admin", action="store_true", help="may manage keys and see every team's usage")
    create.add_argument("--cache-ttl", type=float, default=None, metavar="S",
                        help="answer repeated identical requests from the response cache for S seconds")
    _add_limits(create)
    lst = ksub.add_parser("list", help="list keys (never their secrets)")
    lst.add_argument("--team", default=None)
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = ksub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    for p, fn in ((create, cmd_keys_create), (lst, cmd_keys_list), (revoke, cmd_keys_revoke)):
        _add_store(p)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)

    t = sub.add_parser("teams", help="teams and their limits")
    tsub = t.add_subparsers(dest="teams_command", required=True)
    tset = tsub.add_parser("set", help="create a team or replace its limits")
    tset.add_argument("team")
    _add_limits(tset)
    tlist = tsub.add_parser("list")
    for p, fn in ((tset, cmd_teams_set), (tlist, cmd_teams_list)):
        _add_store(p)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)
