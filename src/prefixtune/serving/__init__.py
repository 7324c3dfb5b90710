"""An OpenAI-compatible HTTP server for many prefixes on one frozen model (`prefixtune serve`).

A request's `model` field names the prefix (the base model's id: no prefix); rows of different
prefixes share one batch. Prefixes live in a folder, one subfolder each, and appear without a
restart. From the outside in: `app` builds and runs it, `guards` act before any handler, `routes`
lists the endpoints, `server` holds `PrefixServer`, `work` is one request in flight; the worker
thread is `scheduler` (continuous batching for decoders, over `running_batch`) or `batcher`
(requests collected, then run together), and `engine` makes their model calls; `limits` holds
`Settings` and `RequestError`. Everything logs to the `prefixtune.server` logger.

`create_app`, `serve` and `running` load FastAPI and uvicorn on first use, so that `limits` (which
the command line reads for its defaults) imports without them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "running", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from prefixtune.serving import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
