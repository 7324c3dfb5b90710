"""`python -m prefixtune.server` and the old import path; the server itself is `prefixtune.serving`."""

import sys

from prefixtune.serving.app import create_app, running, serve, uvicorn_config
from prefixtune.serving.command import add_arguments, main, run_from_args

__all__ = ["add_arguments", "create_app", "main", "run_from_args", "running", "serve", "uvicorn_config"]

if __name__ == "__main__":
    sys.exit(main())
