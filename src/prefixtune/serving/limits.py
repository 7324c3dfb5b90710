"""The limits of one server instance, and how a request fails: `Settings` and `RequestError`.

Every layer reads these two: the body-size guard, the request checks, the batcher, the prefix folder,
the routes and the command line's defaults. They live apart from the code that enforces them, and
this module imports no web framework, so `prefixtune serve` can show its defaults (and refuse with a
helpful line) where FastAPI and uvicorn are not installed.

Every error leaves the server in OpenAI's shape {"error": {"message", "type", "param", "code"}}, so
clients written for OpenAI's API read our errors without special cases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prefixtune.collection import UnknownPrefixError
from prefixtune.errors import PrefixTuneError

# A prefix name: also a folder name and part of a URL, so no dots, slashes or spaces.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")


@dataclass
class Settings:
    """Limits of one server instance; each one bounds the memory or time a single request can take."""

    scheduler: str = "continuous"  # decoders: "continuous" (iteration-level) or "batch" (collect, then generate)
    max_batch_size: int = 8
    max_wait_ms: float = 10.0  # "batch" only: how long a request waits for others
    max_cache_tokens: int = 32768  # "continuous": rows x (longest prompt + prefix + max_tokens) in the KV cache
    prefill_chunk: int = 256  # "continuous": prompt tokens fed per step, so a long prompt never stalls the rest
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 512
    admin_token: str | None = None
    reload_interval_s: float | None = 2.0
    request_timeout_s: float = 300.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    max_queue: int = 1024
    max_loaded_prefixes: int = 0  # 0: every prefix folder loaded at start; n: at most n in memory, loaded on demand
    # Connection level, read by uvicorn rather than by the app:
    timeout_keep_alive: int = 5
    max_connections: int = 1024
    log_level: str = "info"


UVICORN_FIELDS = ("timeout_keep_alive", "max_connections", "log_level")


class RequestError(Exception):
    """A failure of one request, with the HTTP status and OpenAI error type/code to answer it with.

    The worker thread, the request handlers and the ASGI guards all raise or send it."""

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
