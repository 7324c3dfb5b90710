"""An OpenAI-compatible HTTP server for many prefixes on one frozen model (`prefixtune serve`).

The `model` field of a request names the prefix; the base model's own id means no prefix. Requests
that arrive together share one mixed-prefix batch. Prefixes live in a folder, one subfolder per
prefix named like it, and appear without a restart: the folder is polled, and a request naming a
subfolder not loaded yet loads it first.

Endpoints:
- POST /v1/completions, /v1/chat/completions: max_tokens, temperature (0: greedy), top_p, stop, n,
  stream (server-sent events), stream_options.include_usage. Unsupported OpenAI fields are refused
  (422) rather than silently ignored.
- POST /v1/classify: {"model", "input": str | [str]} -> label and probabilities per input, with the
  label names of the base model's config (id2label).
- GET /v1/models, /v1/models/{id}, /health.
- POST /admin/prefixes/{name}[?replace=true] with a JSON body {"config": <the prefixtune_config.json
  object>, "weights": <base64 of prefixtune_model.safetensors>}; DELETE /admin/prefixes/{name}.
  Both need `Authorization: Bearer <admin token>`; with no token configured they are disabled.
  An upload is loaded (validated) before it becomes visible and is moved into the folder atomically.

Every error has OpenAI's shape {"error": {"message", "type", "code"}}: 400 over a limit, 404 unknown
model, 413 body too large, 422 malformed, 500 a failure inside generation (only that request's),
503 queue full, 504 timed out.

The modules, from the outside in:
- command: the command line (`add_arguments`, `run_from_args`, `main`).
- app: `create_app` (model, prefixes, routes, lifespan) and running it under uvicorn (`serve`, `running`).
- guards: admin token check, body size/time limits, header deadline: before any handler runs.
- routes: the endpoints and OpenAI-shaped error handlers.
- schemas: the request bodies the endpoints accept.
- answers: what the endpoints answer (completions, chat, classify).
- server: what one app owns (`PrefixServer`), how a model id becomes a prefix, and the prompt limits.
- transcript: one request's results as its handler receives them.
- prefix_store: the prefixes folder (polling, atomic admin upload and delete).
- batcher, engine, work: the worker thread, the model calls, and what they share with handlers.
- settings, errors: the limits, and how a request fails.
All of them log to the `prefixtune.server` logger, the name the server has always logged under.
"""

from prefixtune.serving.app import create_app, running, serve

__all__ = ["create_app", "running", "serve"]
