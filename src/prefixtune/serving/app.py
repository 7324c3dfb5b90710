"""Building the app (`create_app`) and running it under uvicorn (`serve`, or `running` for tests).

`create_app` loads the frozen base model and the prefixes, wires the routes and the body guard, and
ties the batcher's worker thread and the folder poller to the app's lifespan. uvicorn runs with the
settings that bound what a connection can cost: a short keep-alive, a header deadline
(`guards.HeaderTimeoutH11Protocol`) and a connection limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from prefixtune import tasks
from prefixtune.assets import resolve_model
from prefixtune.errors import PrefixTuneError, first_line
from prefixtune.serving.guards import BodyLimit, HeaderTimeoutH11Protocol
from prefixtune.serving.limits import UVICORN_FIELDS, Settings
from prefixtune.serving.openmp import release_thread_pool
from prefixtune.serving.packed_linear import pack_linear_layers
from prefixtune.serving.playground_routes import install_playground
from prefixtune.serving.routes import install_routes
from prefixtune.serving.server import PrefixServer


def load_base(name: str, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any, str]:
    """The frozen base model, its tokenizer and task. A saved classifier keeps its head and labels,
    since classification prefixes are trained against them; never remote code."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise PrefixTuneError(f"cannot load model {name!r}: {first_line(exc)}") from None
    if any("SequenceClassification" in a for a in getattr(config, "architectures", None) or []):
        labels = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
        model, tokenizer, task = tasks.load_model(name, "classification", config.num_labels, labels)
    else:
        model, tokenizer, task = tasks.load_model(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, getattr(torch, dtype or "float32")).eval()
    pack_linear_layers(model)  # decoding steps of a few rows run faster through oneDNN; no-op for classifiers
    return model, tokenizer, task


def create_app(
    model_path_or_name: str,
    prefixes_dir: str | Path,
    *,
    served_model_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    num_threads: int | None = None,
    **limits: Any,
) -> FastAPI:
    """Load the base model and every prefix in `prefixes_dir`, and return the FastAPI app serving them.

    `limits` are the fields of `Settings` (max_batch_size, max_wait_ms, max_body_bytes, max_upload_bytes,
    max_prompt_tokens, max_tokens_limit, admin_token, reload_interval_s, request_timeout_s,
    body_timeout_s, send_timeout_s, max_queue, and the connection-level ones uvicorn reads), with
    its defaults. The app's worker thread starts with
    the app's lifespan (uvicorn runs it). `reload_interval_s` None or 0 turns folder polling off (a
    request naming a new subfolder still loads it).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    settings = Settings(**limits)
    settings.admin_token = settings.admin_token or None
    model, tokenizer, task = load_base(model_path_or_name, device, dtype)
    base_id = served_model_name or (
        Path(model_path_or_name).name if os.sep in model_path_or_name else model_path_or_name
    )
    srv = PrefixServer(model, tokenizer, task, prefixes_dir, base_id, settings)
    release_thread_pool()  # the worker thread runs the model from now on: its OpenMP team must be the only one

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        srv.batcher.start()
        poller = asyncio.create_task(srv.poll()) if settings.reload_interval_s else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            await asyncio.to_thread(srv.batcher.stop)

    app = FastAPI(title="prefixtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.prefixtune = srv
    install_routes(app, srv)
    install_playground(app, srv)
    app.add_middleware(BodyLimit, settings=settings)
    return app


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> uvicorn.Config:
    """The uvicorn settings `serve` uses: short keep-alive, header deadline, bounded connections.
    `options` are the connection-level fields of `Settings` (`UVICORN_FIELDS`)."""
    unknown = sorted(set(options) - set(UVICORN_FIELDS))
    if unknown:
        raise PrefixTuneError(f"unknown server option(s) {unknown}; uvicorn takes {', '.join(UVICORN_FIELDS)}")
    o = Settings(**options)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=HeaderTimeoutH11Protocol,
        ws="none",
        lifespan="on",
        timeout_keep_alive=o.timeout_keep_alive,
        limit_concurrency=o.max_connections,
        timeout_graceful_shutdown=10,
        log_level=o.log_level,
    )


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **options: Any) -> Iterator[str]:
    """Serve `app` from a background thread with `serve`'s settings and yield its base URL; port 0
    picks a free one. For tests, benchmarks and notebooks; `serve` is the way to run a server."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, host, sock.getsockname()[1], **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="prefixtune-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        if not server.started:
            raise RuntimeError("the server did not start")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve(
    model_path_or_name: str, prefixes_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, **options: Any
) -> None:
    """Build the app and run it with uvicorn until interrupted. `options` are the keyword arguments
    of `create_app`; the connection-level ones among its `Settings` also reach uvicorn."""
    app = create_app(model_path_or_name, prefixes_dir, **options)
    connection = {k: options[k] for k in UVICORN_FIELDS if k in options}
    uvicorn.Server(uvicorn_config(app, host, port, **connection)).run()
