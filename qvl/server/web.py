"""The web page `qvl serve` answers at `/`: static files shipped in qvl/server/static/, no build step.

  GET /                  static/index.html
  GET /static/<name>     the page's own CSS and JS (only files that exist in static/, nothing above it)

Both are public (app.py's auth middleware lets `is_public(method, path)` through); the page then calls
the API routes with the key the user typed, so auth, limits and errors are the server's. Every page
response carries a Content-Security-Policy that allows scripts, styles and connections from this origin
only (no inline script, no other host), and images/videos from this origin, data: and blob: URLs
(thumbnails of attached files).
"""
from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from qvl.server.errors import APIError

STATIC_DIR = Path(__file__).parent / "static"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' data: blob:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'; object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


def is_public(method: str, path: str) -> bool:
    """The page and its assets load without a key (GET/HEAD only); every API route stays protected."""
    return method in ("GET", "HEAD") and (path == "/" or path.startswith("/static/"))


def _file(path: Path) -> Response:
    ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return Response(path.read_bytes(), media_type=ctype, headers=HEADERS)


def install(app: FastAPI) -> None:
    """Add GET / and GET /static/{name} to `app`."""
    assets = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.name != "index.html"}

    @app.get("/", include_in_schema=False)
    async def index():
        return _file(STATIC_DIR / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = assets.get(name)
        if path is None:
            raise APIError(f"Not found: GET /static/{name}", status=404)
        return _file(path)
