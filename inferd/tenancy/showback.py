"""Showback: who used what, summed from the usage ledger.

`usage_report` reads the ledger rows of a time window (optionally one team's or
one key's), groups them by any of `GROUP_KEYS` and sums requests, errors,
tokens and cost per group, with latency percentiles over the requests that
succeeded. `day` is the UTC date unless a time zone is given (the dashboard
passes the browser's, so its days are the reader's days). `render_table` and `render_csv` format the result for `inferd usage`;
`UsageGroup.to_dict` is the JSON form.

The window and the team/key filter run in SQL, so the database uses its ts and
(team, ts) indexes and only the matching rows travel; grouping and percentiles
run here, because percentile functions differ between SQLite (none) and
PostgreSQL (`percentile_cont`) and one code path is easier to trust.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from inferd.store.base import Tx

GROUP_KEYS = ("team", "model", "key", "day", "deployment", "served_model", "endpoint", "version")

# The ledger column behind each group key; "day" is derived from ts.
_GROUP_COLUMNS = {"team": "team", "model": "model", "key": "key_id", "day": "ts",
                  "deployment": "deployment", "served_model": "served_model", "endpoint": "endpoint",
                  "version": "model_version"}

# What the aggregation reads, besides the group columns: never whole rows.
_METRIC_COLUMNS = ("status", "cancelled", "cache_hit", "prompt_tokens", "cached_tokens",
                   "completion_tokens", "reasoning_tokens", "predictions", "cost_usd", "latency_s", "ttft_s")

# Shown for a NULL group value: requests to an open server carry no key and no team.
NONE_LABEL = "-"


def parse_group_by(text: str | None) -> list[str]:
    """`"team,model"` -> `["team", "model"]`; empty or None -> `[]` (one total row)."""
    if not text or not text.strip():
        return []
    keys = [part.strip().lower() for part in text.split(",")]
    for key in keys:
        if key not in GROUP_KEYS:
            raise ValueError(f"unknown group-by key {key!r}: allowed values are {', '.join(GROUP_KEYS)}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"group-by key repeated in {text!r}")
    return keys


def parse_time(text: str) -> float:
    """Unix seconds from Unix seconds, an ISO date (00:00 UTC) or an ISO datetime (naive = UTC)."""
    text = (text or "").strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"invalid time {text!r}: not a finite number")
        return seconds
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use Unix seconds, an ISO date (2026-11-22) "
                         f"or an ISO datetime (2026-11-22T13:00:00+00:00)") from None
    if moment.tzinfo is None:
        # the ledger is in UTC and a report must not depend on the machine's time zone
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def parse_tz(name: str | None) -> tzinfo:
    """An IANA time zone (`Europe/Paris`) for grouping by day; None or empty -> UTC."""
    if not name or not name.strip():
        return timezone.utc
    try:
        if len(name) > 64:  # the longest IANA name has 32 characters
            raise ValueError(name)
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory of the database, a long name
        raise ValueError(f"unknown time zone {name[:64]!r}: use an IANA name such as UTC or Europe/Paris") from None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy.percentile's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    lo = math.floor(rank)
    a, b = ordered[lo], ordered[min(lo + 1, len(ordered) - 1)]
    t = rank - lo
    # interpolate from the nearer end, as numpy does, so the numbers match numpy's to the last bit
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


@dataclass
class UsageGroup:
    group: dict[str, str]
    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    predictions: int = 0
    total_tokens: int = 0
    cached_share: float = 0.0
    cost_usd: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    ttft_p99_s: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready: the group values first, then every metric."""
        out: dict = dict(self.group)
        out.update({name: getattr(self, name) for name in _METRIC_FIELDS})
        return out


_METRIC_FIELDS = tuple(name for name in UsageGroup.__dataclass_fields__ if name != "group")


@dataclass
class _Acc:
    """Running sums of one group while the rows stream past."""

    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    predictions: int = 0
    costs: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    def add(self, m: dict) -> None:
        self.requests += 1
        failed = m["status"] >= 400
        self.errors += failed
        self.cancelled += bool(m["cancelled"])
        self.cache_hits += bool(m["cache_hit"])
        self.prompt_tokens += m["prompt_tokens"]
        self.cached_tokens += m["cached_tokens"]
        self.completion_tokens += m["completion_tokens"]
        self.reasoning_tokens += m["reasoning_tokens"]
        self.predictions += m["predictions"]
        self.costs.append(m["cost_usd"])
        # an error's latency is how fast it failed, not how fast the service answers
        if not failed and m["latency_s"] is not None:
            self.latencies.append(m["latency_s"])
        if not failed and m["ttft_s"] is not None:
            self.ttfts.append(m["ttft_s"])

    def finish(self, group: dict[str, str]) -> UsageGroup:
        return UsageGroup(
            group=group,
            requests=self.requests, errors=self.errors, cancelled=self.cancelled, cache_hits=self.cache_hits,
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens, reasoning_tokens=self.reasoning_tokens,
            predictions=self.predictions,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            cached_share=self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            cost_usd=math.fsum(self.costs),  # many tiny prices: fsum keeps the total exact-ish and order-free
            latency_p50_s=percentile(self.latencies, 50),
            latency_p95_s=percentile(self.latencies, 95),
            latency_p99_s=percentile(self.latencies, 99),
            ttft_p50_s=percentile(self.ttfts, 50),
            ttft_p95_s=percentile(self.ttfts, 95),
            ttft_p99_s=percentile(self.ttfts, 99),
        )


def _group_value(key: str, raw, tz: tzinfo) -> str:
    if raw is None:
        return NONE_LABEL
    if key == "day":
        return datetime.fromtimestamp(raw, tz=tz).date().isoformat()
    return str(raw)


def _query(start: float | None, end: float | None, team: str | None, key_id: str | None,
           columns: Sequence[str]) -> tuple[str, list]:
    """The SELECT for the window and filters; values only ever go in as parameters."""
    where, params = [], []
    if start is not None:
        where.append("ts >= ?")
        params.append(start)
    if end is not None:
        where.append("ts < ?")
        params.append(end)
    if team is not None:
        where.append("team = ?")
        params.append(team)
    if key_id is not None:
        where.append("key_id = ?")
        params.append(key_id)
    sql = f"SELECT {', '.join(columns)} FROM ledger"  # column names come from our own constants
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql, params


def usage_report(tx: Tx, *, start: float | None = None, end: float | None = None,
                 group_by: Sequence[str] = (), team: str | None = None,
                 key_id: str | None = None, tz: tzinfo = timezone.utc) -> list[UsageGroup]:
    """Usage of rows with start <= ts < end, optionally one team's / key's, per group, sorted by group.

    `day` groups are dates in `tz` (UTC by default).

    With no group_by the answer is always one total row, zeros included, so a
    report over an empty window still says "nothing" rather than nothing.
    """
    group_by = list(group_by)
    for key in group_by:
        if key not in GROUP_KEYS:
            raise ValueError(f"unknown group-by key {key!r}: allowed values are {', '.join(GROUP_KEYS)}")
    group_columns = list(dict.fromkeys(_GROUP_COLUMNS[k] for k in group_by))
    columns = group_columns + list(_METRIC_COLUMNS)
    sql, params = _query(start, end, team, key_id, columns)

    accs: dict[tuple[str, ...], _Acc] = {}
    if not group_by:
        accs[()] = _Acc()
    for row in tx.fetchall(sql, params):
        values = dict(zip(columns, row))
        label = tuple(_group_value(k, values[_GROUP_COLUMNS[k]], tz) for k in group_by)
        accs.setdefault(label, _Acc()).add(values)
    return [accs[label].finish(dict(zip(group_by, label))) for label in sorted(accs)]


# ---- rendering -------------------------------------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _pct(share: float) -> str:
    return f"{share * 100:.1f}%"


_NUMERIC_HEADERS = ("requests", "errors", "prompt", "cached %", "completion", "cost USD",
                    "p50 ms", "p95 ms", "p99 ms")


def _table_cells(g: UsageGroup) -> list[str]:
    return [str(g.requests), str(g.errors), str(g.prompt_tokens), _pct(g.cached_share),
            str(g.completion_tokens), f"{g.cost_usd:.4f}",
            _ms(g.latency_p50_s), _ms(g.latency_p95_s), _ms(g.latency_p99_s)]


def _total_cells(groups: Iterable[UsageGroup]) -> list[str]:
    groups = list(groups)
    prompt = sum(g.prompt_tokens for g in groups)
    cached = sum(g.cached_tokens for g in groups)
    # percentiles do not add up across groups, so the TOTAL line leaves them out
    return [str(sum(g.requests for g in groups)), str(sum(g.errors for g in groups)), str(prompt),
            _pct(cached / prompt if prompt else 0.0), str(sum(g.completion_tokens for g in groups)),
            f"{math.fsum(g.cost_usd for g in groups):.4f}", "-", "-", "-"]


def render_table(groups: Sequence[UsageGroup], group_by: Sequence[str]) -> str:
    """An aligned plain-text table, group columns left-aligned, numbers right-aligned, TOTAL when > 1 group."""
    group_by = list(group_by)
    header = group_by + list(_NUMERIC_HEADERS)
    lines = [[g.group.get(k, NONE_LABEL) for k in group_by] + _table_cells(g) for g in groups]
    if len(groups) > 1:
        # the TOTAL label goes in the first column; with no group columns there is only ever one group
        lines.append(["TOTAL"] + [""] * (len(group_by) - 1) + _total_cells(groups))
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [c.ljust(w) if i < len(group_by) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in lines]
    return "\n".join(out)


def render_csv(groups: Sequence[UsageGroup], group_by: Sequence[str]) -> str:
    """CSV with a header: the group columns, then every UsageGroup metric; empty cell for no value."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(group_by) + list(_METRIC_FIELDS), lineterminator="\n")
    writer.writeheader()
    for g in groups:
        writer.writerow({k: "" if v is None else v for k, v in g.to_dict().items()})
    return buf.getvalue()
