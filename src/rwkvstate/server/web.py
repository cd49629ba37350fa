"""The built-in chat page: `GET /` and its static files under `/static/` (package data in
server/static/, plain HTML/CSS/JS with no build step and nothing fetched from elsewhere).

The page talks to the same public API as any client (/v1/chat/completions with SSE, the
session endpoints), so it needs the API key like any client; the page itself is public.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
# Everything from this server, nothing inline from elsewhere: a page that cannot reach a CDN
# works the same offline.
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
}


def add_web_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers=HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
