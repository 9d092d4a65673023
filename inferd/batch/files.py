"""The Files API's files, kept in the store: uploaded batch input, and the output and error files of batches.

Files belong to the team of the key that made them (None on an open server);
a team sees only its own, an admin or an open server sees all. Content is
text (JSONL) and lives in the store, so every replica serves every file.
`parse_batch_input` checks an upload line by line, as the Batch API reads it,
so a bad file is refused at upload with the line that is wrong.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from inferd.classic.tensors import infer_path_params
from inferd.store.base import Tx
from inferd.wire.json_shape import JSONShapeError, loads_checked

PURPOSES = ("batch", "batch_output", "fine-tune", "assistants", "vision", "user_data", "evals")
BATCH_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}
INFER_URL = "/v2/models/{name}[/versions/{version}]/infer"
MAX_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file


def batch_endpoint(url: object) -> str | None:
    """The endpoint a batch url names: chat, completions, embeddings, or a tensor model's infer call
    (`infer`, or `infer@<version>` when the path names a version), so rows can be scored in bulk;
    None for any other url."""
    if not isinstance(url, str):
        return None
    if url in BATCH_URLS:
        return BATCH_URLS[url]
    params = infer_path_params(url)
    if params is None:
        return None
    return "infer" if "version" not in params else f"infer@{params['version']}"


def batch_urls() -> str:
    """The urls a batch may name, for error messages."""
    return ", ".join([*BATCH_URLS, INFER_URL])
MAX_LINES = 50_000


@dataclass(frozen=True)
class FileInfo:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


@dataclass(frozen=True)
class BatchLine:
    line: int          # 1-based, as editors count
    custom_id: str
    url: str
    body: dict


def parse_batch_input(content: str) -> list[BatchLine]:
    """The requests of a batch input file; ValueError naming the first bad line."""
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    url = None
    # JSONL lines end at "\n" only: str.splitlines() would also cut at U+2028 and others,
    # which are valid inside JSON strings
    for number, raw in enumerate(content.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            item = loads_checked(raw)
        except JSONShapeError as e:
            raise ValueError(f"{where}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: must be a JSON object with custom_id, method, url and body")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise ValueError(f"{where}: custom_id must be a non-empty string")
        if custom_id in seen:
            raise ValueError(f"{where}: custom_id {custom_id!r} is already used on line {seen[custom_id]}")
        if item.get("method") != "POST":
            raise ValueError(f"{where}: method must be \"POST\"")
        if batch_endpoint(item.get("url")) is None:
            raise ValueError(f"{where}: url must be one of {batch_urls()}, not {item.get('url')!r}")
        if url is not None and item["url"] != url:
            raise ValueError(f"{where}: every line must have the same url ({url}), not {item['url']}")
        url = item["url"]
        if not isinstance(item.get("body"), dict):
            raise ValueError(f"{where}: body must be a JSON object (the request)")
        if item["body"].get("stream"):
            raise ValueError(f"{where}: body.stream is not supported in a batch")
        extra = sorted(set(item) - {"custom_id", "method", "url", "body"})
        if extra:
            raise ValueError(f"{where}: unknown field(s) {', '.join(extra)}")
        seen[custom_id] = number
        lines.append(BatchLine(number, custom_id, url, item["body"]))
        if len(lines) > MAX_LINES:
            raise ValueError(f"a batch input file holds at most {MAX_LINES} requests")
    if not lines:
        raise ValueError("the file has no requests")
    return lines


def owned_by(team: str | None, admin: bool) -> tuple[str, tuple]:
    """The SQL condition (and its parameters) for rows a caller may see: all for admins, else its team's."""
    if admin:
        return "", ()
    if team is None:
        return " AND team IS NULL", ()
    return " AND team = ?", (team,)


def create_file(tx: Tx, *, team: str | None, key_id: str | None, purpose: str, filename: str, content: str,
                now: float) -> FileInfo:
    info = FileInfo("file-" + secrets.token_hex(12), len(content.encode()), int(now), filename, purpose)
    tx.execute("INSERT INTO files (id, team, key_id, purpose, filename, bytes, content, created) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (info.id, team, key_id, purpose, filename, info.bytes, content, now))
    return info


_FILE_COLS = "id, bytes, created, filename, purpose"


def _info(row) -> FileInfo:
    return FileInfo(row[0], row[1], int(row[2]), row[3], row[4])


def get_file(tx: Tx, file_id: str, team: str | None, admin: bool) -> FileInfo | None:
    cond, params = owned_by(team, admin)
    row = tx.fetchone(f"SELECT {_FILE_COLS} FROM files WHERE id = ? AND deleted IS NULL{cond}", (file_id, *params))
    return None if row is None else _info(row)


def file_content(tx: Tx, file_id: str, team: str | None, admin: bool) -> str | None:
    cond, params = owned_by(team, admin)
    return tx.scalar(f"SELECT content FROM files WHERE id = ? AND deleted IS NULL{cond}", (file_id, *params))


def delete_file(tx: Tx, file_id: str, team: str | None, admin: bool, now: float) -> bool:
    cond, params = owned_by(team, admin)
    return tx.execute(f"UPDATE files SET deleted = ?, content = '' WHERE id = ? AND deleted IS NULL{cond}",
                      (now, file_id, *params)) > 0


def list_files(tx: Tx, team: str | None, admin: bool, purpose: str | None = None, limit: int = 10000
               ) -> list[FileInfo]:
    cond, params = owned_by(team, admin)
    if purpose is not None:
        cond += " AND purpose = ?"
        params = (*params, purpose)
    rows = tx.fetchall(f"SELECT {_FILE_COLS} FROM files WHERE deleted IS NULL{cond} ORDER BY created DESC, id DESC "
                       f"LIMIT {int(limit)}", params)
    return [_info(r) for r in rows]
