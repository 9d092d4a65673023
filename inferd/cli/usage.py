"""`inferd usage`: the showback report over the usage ledger, as a table, CSV or JSON.

Kept free of heavy imports so `inferd --help` stays fast: the report and the
store are imported when the command runs. Bad input raises ValueError, which
`inferd`'s main prints as `inferd: error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

FORMATS = ("table", "csv", "json")


def add_usage_parser(subparsers) -> None:
    """Add `usage` to the `inferd` subparsers."""
    p = subparsers.add_parser(
        "usage", help="usage and cost per team, model, key or day, from the ledger",
        description="Sums requests, errors, tokens and cost from the usage ledger over a time window, "
                    "grouped as asked, with latency percentiles over the requests that succeeded. "
                    "Times are Unix seconds, an ISO date (UTC midnight) or an ISO datetime (naive = UTC).")
    p.add_argument("--store", default=None, help="store URL (default: $INFERD_STORE or the local SQLite file)")
    p.add_argument("--start", default=None, metavar="T", help="first instant included")
    p.add_argument("--end", default=None, metavar="T", help="first instant excluded")
    p.add_argument("--group-by", default=None, metavar="KEYS",
                   help="comma-separated, any of team, model, key, day, deployment, served_model, endpoint, version "
                        "(default: one total row)")
    p.add_argument("--team", default=None, help="only this team's requests")
    p.add_argument("--key", dest="key_id", default=None, metavar="KEY_ID", help="only this key's requests")
    p.add_argument("--tz", default=None, metavar="ZONE", help="IANA time zone of the day groups (default UTC)")
    p.add_argument("--format", default="table", choices=FORMATS)
    p.set_defaults(func=run_usage)


def run_usage(args: argparse.Namespace) -> int:
    from inferd.store import default_store_url, open_store
    from inferd.tenancy import showback

    # check every argument before touching the store, so a typo never creates a database file
    group_by = showback.parse_group_by(args.group_by)
    zone = showback.parse_tz(args.tz)
    start = showback.parse_time(args.start) if args.start is not None else None
    end = showback.parse_time(args.end) if args.end is not None else None
    if start is not None and end is not None and start >= end:
        raise ValueError(f"--start ({args.start}) must be before --end ({args.end})")
    if args.format not in FORMATS:
        raise ValueError(f"unknown format {args.format!r}: allowed values are {', '.join(FORMATS)}")

    store = open_store(args.store or default_store_url())
    try:
        groups = store.run_sync(lambda tx: showback.usage_report(
            tx, start=start, end=end, group_by=group_by, team=args.team, key_id=args.key_id, tz=zone))
    finally:
        store.close()

    if args.format == "json":
        out = json.dumps([g.to_dict() for g in groups], indent=2)
    elif args.format == "csv":
        out = showback.render_csv(groups, group_by)
    else:
        out = showback.render_table(groups, group_by)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0
