"""The playground: a page at /playground that compares prefixes side by side, served by `prefixtune serve`.

The page is three static files shipped in the package (plain HTML, CSS and JavaScript: no build step). It talks
to the server's own OpenAI endpoints like any other client, so what it shows is what the API answers; the routes
here add only what those endpoints lack, all of it read-only:

- GET / (when nothing else answers there) redirects to the page; GET /playground, /playground/app.js and
  /playground/style.css are the page, with a Content-Security-Policy that lets it load nothing but its own files
  and talk to nothing but this server, so even a bug that put model output into HTML could not run a script.
- GET /playground/settings: the base model, its task, whether chat and the admin endpoints are on, and the
  limits the page's controls respect.
- GET /v1/models/{name}/card and /v1/models/{name}/curves.png: a served prefix's card and training curves,
  read from its folder by `prefix_card` (which keeps every read inside that folder).

They are ordinary routes of the app, so the app-wide guards (`guards.BodyLimit`, uvicorn's limits) stand in
front of them as of every endpoint, and their errors have OpenAI's shape like the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

from prefixtune.serving import prefix_card
from prefixtune.serving.limits import RequestError
from prefixtune.serving.server import PrefixServer

PAGE = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def page_file(name: str) -> bytes:
    """One of the page's files, from the installed package."""
    try:
        return (resources.files("prefixtune.serving") / "playground" / name).read_bytes()
    except OSError:
        raise RequestError(500, f"the playground's {name} is not installed with prefixtune", "server_error") from None


def _page_route(name: str) -> Callable[[], Awaitable[Response]]:
    async def serve_file() -> Response:
        body = await asyncio.to_thread(page_file, name)
        return Response(body, media_type=PAGE[name], headers={**HEADERS, "Content-Security-Policy": CSP})

    return serve_file


def install_playground(app: FastAPI, srv: PrefixServer) -> None:
    """Add the page and its read-only endpoints to `app` (after `routes.install_routes`, whose error handlers
    they use)."""
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        # relative, so that behind a proxy that serves this server under a path it stays under that path
        app.add_api_route("/", lambda: RedirectResponse("playground"), methods=["GET"], include_in_schema=False)
    app.add_api_route("/playground", _page_route("index.html"), methods=["GET"], include_in_schema=False)
    for name in ("app.js", "style.css"):
        app.add_api_route(f"/playground/{name}", _page_route(name), methods=["GET"], include_in_schema=False)

    @app.get("/playground/settings", include_in_schema=False)
    async def settings() -> dict:
        s = srv.settings
        return {
            "model": srv.base_id,
            "task": srv.engine.task,
            "chat": bool(getattr(srv.tokenizer, "chat_template", None)),
            "admin": bool(s.admin_token),
            "max_tokens_limit": s.max_tokens_limit,
            "max_upload_bytes": s.max_upload_bytes,
        }

    @app.get("/v1/models/{name}/card")
    async def card(name: str) -> dict:
        folder = prefix_card.folder_of(srv.folder.root, name, srv.folder.names())
        return await asyncio.to_thread(prefix_card.card, folder)

    @app.get("/v1/models/{name}/curves.png")
    async def curves(name: str) -> Response:
        folder = prefix_card.folder_of(srv.folder.root, name, srv.folder.names())
        return Response(await asyncio.to_thread(prefix_card.curves, folder), media_type="image/png", headers=HEADERS)
