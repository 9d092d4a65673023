"""The Files API: upload (multipart, as the OpenAI SDK sends it), get, list, read content, delete.

A `purpose: batch` upload is checked line by line as the Batch API will read it;
a bad line is a 400 that names it. A team sees only its own files; an admin key
or an open server sees all.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response

from inferd.api.protocol import json_response, principal, state
from inferd.batch import files
from inferd.wire.errors import http_error

router = APIRouter()


def owner(request: Request) -> tuple[str | None, str | None, bool]:
    """(team, key id, sees everything) of the caller."""
    who = principal(request)
    if who is None:
        return None, None, True
    return who.team, who.key_id, who.is_admin


@router.post("/v1/files")
async def upload(request: Request):
    try:
        form = await request.form(max_part_size=files.MAX_BYTES)
    except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's
        raise http_error(400, f"expected a multipart/form-data upload with 'file' and 'purpose': {e}") from None
    upload_ = form.get("file")
    purpose = form.get("purpose")
    if not isinstance(upload_, UploadFile):
        raise http_error(400, "the 'file' field is missing or not a file", param="file")
    if purpose not in files.PURPOSES:
        raise http_error(400, f"purpose must be one of {', '.join(files.PURPOSES)}", param="purpose")
    raw = await upload_.read()
    if len(raw) > files.MAX_BYTES:
        raise http_error(413, f"the file is larger than {files.MAX_BYTES} bytes", param="file")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise http_error(400, "the file must be UTF-8 text", param="file") from None
    if purpose == "batch":
        try:
            files.parse_batch_input(content)
        except ValueError as e:
            raise http_error(400, f"invalid batch input file: {e}", param="file", code="invalid_batch_file") from None
    team, key_id, _ = owner(request)
    st = state(request)
    now = st.metering.clock()
    info = await st.metering.store.run(lambda tx: files.create_file(
        tx, team=team, key_id=key_id, purpose=purpose, filename=upload_.filename or "upload.jsonl",
        content=content, now=now))
    return json_response(info.to_dict())


async def _get(request: Request, file_id: str) -> files.FileInfo:
    team, _, admin = owner(request)
    info = await state(request).metering.store.run(lambda tx: files.get_file(tx, file_id, team, admin))
    if info is None:
        raise http_error(404, f"no file has the id {file_id!r}", param="file_id", code="file_not_found")
    return info


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, limit: int = 10000):
    team, _, admin = owner(request)
    rows = await state(request).metering.store.run(
        lambda tx: files.list_files(tx, team, admin, purpose, max(1, min(limit, 10000))))
    return json_response({"object": "list", "data": [f.to_dict() for f in rows], "has_more": False})


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str):
    return json_response((await _get(request, file_id)).to_dict())


@router.get("/v1/files/{file_id}/content")
async def get_content(request: Request, file_id: str):
    team, _, admin = owner(request)
    content = await state(request).metering.store.run(lambda tx: files.file_content(tx, file_id, team, admin))
    if content is None:
        raise http_error(404, f"no file has the id {file_id!r}", param="file_id", code="file_not_found")
    return Response(content.encode(), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str):
    team, _, admin = owner(request)
    now = state(request).metering.clock()
    if not await state(request).metering.store.run(lambda tx: files.delete_file(tx, file_id, team, admin, now)):
        raise http_error(404, f"no file has the id {file_id!r}", param="file_id", code="file_not_found")
    return json_response({"id": file_id, "object": "file", "deleted": True})
