"""`trtrag serve`: the pipeline as an HTTP service (FastAPI + uvicorn) until SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import RecipeOpt, SetOpt, command, load
from trtrag_cli.util.errors import UsageError


@command
def serve(host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (serve.host, default "
                                             "127.0.0.1; 0.0.0.0 opens it to the network)."),
          port: Optional[int] = typer.Option(None, "--port", help="Port (serve.port; 0: any free one, printed)."),
          api_key: Optional[str] = typer.Option(None, "--api-key", help="Key every /v1 request must send as "
                                                "'Authorization: Bearer <key>' (default: the variable named by "
                                                "serve.api_key_env; unset: no auth)."),
          generate_only: bool = typer.Option(False, "--generate-only", help="Serve the generator as an "
                                             "OpenAI-compatible node, without an index."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Serve ask, retrieval, embeddings and OpenAI chat over HTTP; SIGTERM drains and exits 0. See docs/serve.md."""
    from trtrag_cli.serve.app import make_app
    from trtrag_cli.serve.run import bind, serve as run_server
    from trtrag_cli.serve.state import Service

    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"--port must be within 0..65535, got {port}", "0 picks any free port")
    cfg = load(recipe, set_, {"serve.host": ("--host", host), "serve.port": ("--port", port)})
    key = api_key or os.environ.get(cfg.serve.api_key_env) or None
    service = Service(cfg, generate_only).preflight()
    sock = bind(cfg.serve.host, cfg.serve.port)
    run_server(make_app(service, key), service, sock)
    # Drained. A generation still running on a worker thread (cut off past serve.drain_s) would abort
    # the interpreter's teardown inside torch; the server's work is done, so leave at once with 0.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
