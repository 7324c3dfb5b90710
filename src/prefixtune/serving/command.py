"""The command line of the server: `prefixtune serve` and `python -m prefixtune.serving`.

`add_arguments` is shared by both entry points, so the two never drift apart; its defaults come from
`Settings`, which holds the one copy of each default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from prefixtune.errors import PrefixTuneError
from prefixtune.serving.app import serve
from prefixtune.serving.limits import Settings


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `prefixtune serve` (shared with `python -m prefixtune.serving`)."""
    d = Settings()
    a = parser.add_argument
    a("--model", required=True, help="base model: a folder, a hub name, or a built-in alias (smollm2, minilm)")
    a("--prefixes", required=True, help="folder with one subfolder per prefix (created if missing); watched")
    a("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    a("--port", type=int, default=8000, help="port (default: %(default)s)")
    a(
        "--admin-token",
        default=os.environ.get("PREFIXTUNE_ADMIN_TOKEN"),
        help="token for /admin/prefixes; prefer the PREFIXTUNE_ADMIN_TOKEN variable (command lines are visible "
        "to other users). Without one the admin endpoints are disabled",
    )
    a("--served-model-name", default=None, help="id of the base model in requests (default: the folder's name)")
    a("--max-batch-size", type=int, default=d.max_batch_size, help="rows per batch (default: %(default)s)")
    a("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a request waits for others to batch with")
    a("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (default: %(default)s)")
    a("--max-upload-bytes", type=int, default=d.max_upload_bytes, help="largest admin upload (default: %(default)s)")
    a("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest prompt (default: %(default)s)")
    a("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens (default: %(default)s)")
    a(
        "--reload-interval",
        type=float,
        default=d.reload_interval_s,
        dest="reload_interval_s",
        help="seconds between folder scans; 0: off",
    )
    a(
        "--request-timeout",
        type=float,
        default=d.request_timeout_s,
        dest="request_timeout_s",
        help="seconds before a request is abandoned",
    )
    a("--max-queue", type=int, default=d.max_queue, help="queued requests before answering 503")
    a(
        "--timeout-keep-alive",
        type=int,
        default=d.timeout_keep_alive,
        help="seconds an idle connection stays open (default: %(default)s)",
    )
    a("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    a("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype (default: float32)")
    a("--threads", type=int, default=None, dest="num_threads", help="torch CPU threads")
    a("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"])
    return parser


def run_from_args(args: argparse.Namespace | Mapping[str, Any]) -> None:
    """Run `serve` with options from a parser that `add_arguments` filled (a Namespace, or a dict
    from which None values may have been dropped: missing options take their defaults)."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    defaults = vars(add_arguments(argparse.ArgumentParser()).parse_args(["--model", "", "--prefixes", ""]))
    options = {k: v if given.get(k) is None else given[k] for k, v in defaults.items()}
    options["reload_interval_s"] = options["reload_interval_s"] or None
    logging.basicConfig(level=options["log_level"].upper(), format="%(levelname)s %(name)s: %(message)s")
    serve(options.pop("model"), options.pop("prefixes"), **options)


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(
        argparse.ArgumentParser(
            prog="prefixtune serve", description="Serve many prefixes of one frozen model over an OpenAI-compatible API"
        )
    )
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except PrefixTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
