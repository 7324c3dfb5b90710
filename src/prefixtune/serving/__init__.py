"""An OpenAI-compatible HTTP server for many prefixes on one frozen model (`prefixtune serve`).

A request's `model` field names the prefix (the base model's id: no prefix), and requests that
arrive together share one mixed-prefix batch. Prefixes live in a folder, one subfolder each, and
appear without a restart. From the outside in: `app` builds and runs it, `guards` act before any
handler, `routes` lists the endpoints, `server` holds `PrefixServer`, `work` is one request in
flight, `batcher` and `engine` are the worker thread and its model calls; `limits` holds `Settings`
and `RequestError`. Everything logs to the `prefixtune.server` logger.
"""

from prefixtune.serving.app import create_app, running, serve

__all__ = ["create_app", "running", "serve"]
