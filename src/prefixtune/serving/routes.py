"""The HTTP surface: every endpoint, and the handlers that give every error OpenAI's shape.

Each endpoint is a thin adapter from a validated body to the module that does the work
(`completions`, `classify`, `state`, `prefix_store`); read this file for the list of what the server
answers, and follow the calls for how.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixtune.serving import answers
from prefixtune.serving.errors import RequestError, error_body
from prefixtune.serving.guards import admin_error
from prefixtune.serving.schemas import ChatRequest, ClassifyRequest, CompletionRequest, UploadRequest
from prefixtune.serving.server import PrefixServer

log = logging.getLogger("prefixtune.server")


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()[:5]
        ]
        return error_response(RequestError(422, "invalid request: " + "; ".join(parts), code="invalid_body"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(RequestError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(RequestError.of(exc))


def _check_admin(srv: PrefixServer, request: Request, name: str) -> None:
    """The token again (the `BodyLimit` guard checked it before the body) and the prefix name."""
    err = admin_error(srv.settings.admin_token, request.headers)
    if err is not None:
        raise err
    srv.check_name(name)


def install_routes(app: FastAPI, srv: PrefixServer) -> None:
    _install_error_handlers(app)

    @app.post("/v1/completions")
    async def completion(body: CompletionRequest, request: Request) -> Response:
        return await answers.generate(srv, request, body)

    @app.post("/v1/chat/completions")
    async def chat_completion(body: ChatRequest, request: Request) -> Response:
        return await answers.generate(srv, request, body)

    @app.post("/v1/classify")
    async def classification(body: ClassifyRequest, request: Request) -> dict:
        return await answers.classify(srv, request, body)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [srv.card(None)] + [srv.card(n) for n in sorted(srv.bank.names())]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        prefix = await srv.find(name)
        return srv.card(prefix)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = srv.batcher.alive
        body = {
            "status": "ok" if ok else "worker stopped",
            "model": srv.base_id,
            "prefixes": len(srv.bank.names()),
            "queued": srv.batcher.pending(),
            "stats": dict(srv.batcher.stats),
            "prefix_errors": srv.folder.errors,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/admin/prefixes/{name}", status_code=201)
    async def upload(name: str, body: UploadRequest, request: Request, replace: bool = False) -> dict:
        _check_admin(srv, request, name)
        try:
            weights = await asyncio.to_thread(base64.b64decode, body.weights, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"weights must be base64: {exc}") from exc
        await srv.batcher.call(lambda: srv.folder.install(name, body.config, weights, replace))
        return srv.card(name)

    @app.delete("/admin/prefixes/{name}")
    async def delete(name: str, request: Request) -> dict:
        _check_admin(srv, request, name)
        await srv.batcher.call(lambda: srv.folder.delete(name))
        return {"id": name, "object": "model", "deleted": True}
