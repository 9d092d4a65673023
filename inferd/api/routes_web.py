"""The web app: the playground and the usage dashboard, static files served at `/` and `/ui/...`.

The files live in `inferd/web/` (plain HTML, CSS and JavaScript, with the charting
library vendored as its built file), so the app works offline and needs no build step.
They are public (api/auth.py): the page holds no data, asks for a key when the server
needs one and sends it with every API call it makes, so it sees what that key may see.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    # no-cache: a browser revalidates (cheap, ETag) so an upgraded server never runs yesterday's script
    return FileResponse(WEB_ROOT / "index.html", headers={"Cache-Control": "no-cache"})


def attach(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=WEB_ROOT), name="ui")
