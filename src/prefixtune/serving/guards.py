"""What protects the server from its clients before any handler runs.

- `admin_error`: the admin token check (constant-time), for /admin/ requests.
- `BodyLimit`: a pure ASGI middleware that bounds a request body's size and the time to send it, and
  refuses admin requests without the right token before their (large) bodies are read.
- `HeaderTimeoutH11Protocol`: a deadline for a request's headers, which uvicorn alone does not set.

Each bounds what one connection can cost, so a slow, huge or unauthorised request is refused early,
with OpenAI's error shape, instead of tying up memory or a connection slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from prefixtune.serving.limits import RequestError, Settings, error_body


def admin_error(token: str | None, headers: Mapping[str, str]) -> RequestError | None:
    """Why a request may not use the admin endpoints (None: it may). Constant-time comparison."""
    if not token:
        return RequestError(
            403, "admin endpoints are disabled: start the server with an admin token", "permission_error"
        )
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return RequestError(
            401,
            "missing admin token: send 'Authorization: Bearer <token>'",
            "authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return RequestError(403, "wrong admin token", "permission_error")
    return None


async def _receive_by(receive: Callable, deadline: float) -> dict:
    """The next ASGI message, or TimeoutError once `deadline` (time.monotonic) has passed."""
    return await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))


class BodyLimit:
    """Pure ASGI guard, before any handler buffers a body: refuse bodies over the limit (declared
    Content-Length, then bytes actually received) with 413, bodies not received within
    `body_timeout_s` with 408, and admin requests without the right token before reading them."""

    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = s.max_body_bytes
        if scope["path"].startswith("/admin/"):
            err = admin_error(s.admin_token, headers)
            if err is not None:
                return await self._refuse(send, receive, err, limit)
            limit = s.max_upload_bytes
        too_large = RequestError(413, f"request body larger than {limit} bytes", code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._refuse(send, receive, RequestError(400, "invalid Content-Length"), 0)
            if int(declared) > limit:
                return await self._refuse(send, receive, too_large, int(declared))
        chunks, size = [], 0
        deadline = time.monotonic() + s.body_timeout_s
        while True:
            try:
                message = await _receive_by(receive, deadline)
            except TimeoutError:
                err = RequestError(408, f"the request body was not received within {s.body_timeout_s:g} s")
                return await self._send(send, err)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(send, receive, too_large, 4 * limit, more=message.get("more_body", False))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(
        self, send: Callable, receive: Callable, err: RequestError, drain: int, more: bool = True
    ) -> None:
        """Answer `err`, first reading (and dropping) a body of up to 4x the limit, so the client gets to
        read the answer instead of a reset connection from a server that closed while it was writing."""
        budget = min(drain, 4 * max(self.settings.max_body_bytes, 1 << 16))
        deadline = time.monotonic() + self.settings.body_timeout_s
        with contextlib.suppress(TimeoutError):
            while more and budget > 0:
                message = await _receive_by(receive, deadline)
                if message["type"] == "http.disconnect":
                    return
                budget -= len(message.get("body", b""))
                more = message.get("more_body", False)
        await self._send(send, err)

    @staticmethod
    async def _send(send: Callable, err: RequestError) -> None:
        payload = json.dumps(error_body(err)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for a request's headers: `timeout_keep_alive` seconds from
    the connection opening (or the previous response). uvicorn alone closes idle keep-alive connections,
    but a fresh connection that sends nothing, or half its headers, would stay open for ever."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.timeout_keep_alive, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE:
            self.timeout_keep_alive_handler()
