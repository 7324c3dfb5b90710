"""The limits of one server instance (request, queue and connection), and what a prefix may be called.

They live apart from the code that enforces them because every layer reads them: the body-size
guard, the request checks, the batcher, the prefix folder and the command line's defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A prefix name: also a folder name and part of a URL, so no dots, slashes or spaces.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")


@dataclass
class Settings:
    """Limits of one server instance; each one bounds the memory or time a single request can take."""

    max_batch_size: int = 8
    max_wait_ms: float = 10.0
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
    # Connection level, read by uvicorn rather than by the app:
    timeout_keep_alive: int = 5
    max_connections: int = 1024
    log_level: str = "info"


UVICORN_FIELDS = ("timeout_keep_alive", "max_connections", "log_level")
