"""The operator's page, ``GET /ui``: static files shipped inside the package (``service/ui/``).

Plain HTML, CSS and ES modules with no build step and nothing fetched from elsewhere: the page talks
only to the server that served it (``/adapters``, ``/embed``, ``/segment`` and the admin endpoints),
which its Content-Security-Policy enforces in the browser too. The page is public like ``GET
/adapters``; what changes state needs the admin token, which the operator types into the page (kept
in the tab's ``sessionStorage``, sent as ``Authorization: Bearer``).

``/ui`` is the page's one URL: its assets are referenced relatively (``ui/app.js``), so the page also
works behind a reverse proxy that serves wesam under a path prefix; ``/ui/`` redirects to it.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations at runtime.
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.responses import Response

UI_DIR = Path(__file__).resolve().parent / "ui"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# Only plain file names of the shipped kinds: no path separators, no dot files, nothing else in the folder.
ASSET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(?:html|js|css)$")
# Same-origin only (no CDN, no inline script), not framable (the page has buttons that change what is
# served: clickjacking protection), and no Referer carrying the page's URL elsewhere.
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated, so a server upgrade never runs an old page against a new API
}


def asset_path(name: str) -> "Path | None":
    """The shipped file called ``name``, or None (unknown, or not a name the page may be served)."""
    if not ASSET_NAME.match(name):
        return None
    path = UI_DIR / name
    return path if path.is_file() else None


def add_ui_routes(app: "FastAPI") -> None:
    """``GET /ui`` (the page), ``GET /ui/`` (redirects to it), ``GET /ui/{asset}``; not in the OpenAPI document."""
    from starlette.exceptions import HTTPException
    from starlette.responses import RedirectResponse, Response

    def serve(name: str) -> "Response":
        path = asset_path(name)
        if path is None:
            raise HTTPException(404, f"no such file in the operator's page: {name!r}")
        return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)

    # No return annotations on the handlers: FastAPI would read them as response models.
    @app.get("/ui", include_in_schema=False, response_model=None)
    async def ui_page():
        return serve("index.html")

    @app.get("/ui/", include_in_schema=False, response_model=None)
    async def ui_slash():
        return RedirectResponse("../ui", status_code=308)  # relative: right behind a path prefix too

    @app.get("/ui/{name}", include_in_schema=False, response_model=None)
    async def ui_asset(name: str):
        return serve(name)
