"""How one request fails: an exception that carries its HTTP status and OpenAI error type/code.

The worker thread, the request handlers and the ASGI guards all raise or send `RequestError`, and
every error leaves the server in OpenAI's shape {"error": {"message", "type", "param", "code"}}, so
clients written for OpenAI's API read our errors without special cases.
"""

from __future__ import annotations

from prefixtune.collection import UnknownPrefixError
from prefixtune.errors import PrefixTuneError


class RequestError(Exception):
    """A failure of one request, with the HTTP status and OpenAI error type/code to answer it with."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers

    @classmethod
    def of(cls, exc: BaseException) -> RequestError:
        if isinstance(exc, RequestError):
            return exc
        if isinstance(exc, UnknownPrefixError):
            return cls(404, str(exc), code="model_not_found")
        if isinstance(exc, PrefixTuneError):
            return cls(400, str(exc))
        return cls(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")


class Overloaded(RequestError):
    def __init__(self, depth: int):
        super().__init__(503, f"server overloaded: {depth} requests are already queued; retry later", "server_error")


def error_body(err: RequestError) -> dict:
    """OpenAI's error object for `err`: the JSON body of an error response or of a stream's last event."""
    return {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}
