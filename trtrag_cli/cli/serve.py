"""`trtrag serve`: /ask and an OpenAI-compatible /v1/chat/completions over HTTP until interrupted."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import RecipeOpt, SetOpt, command, console, load
from trtrag_cli.util.errors import UsageError


@command
def serve(host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8000, "--port", help="Port (0: any free one, printed)."),
          generate_only: bool = typer.Option(False, "--generate-only", help="Serve the generator as an "
                                             "OpenAI-compatible node, without an index."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Serve /ask and an OpenAI-compatible /v1/chat/completions over HTTP until interrupted."""
    from trtrag_cli.generate.base import SamplingParams
    from trtrag_cli.generate.registry import model_context, open_backend, served_name
    from trtrag_cli.serve.server import Service, make_server

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be within 0..65535, got {port}", "0 picks any free port")
    cfg = load(recipe, set_)
    pipeline = None
    if not generate_only:
        from trtrag_cli.pipeline import Pipeline

        pipeline = Pipeline(cfg)
    backend = None
    if cfg.answer.generator.backend != "extractive" or generate_only:  # open_backend refuses extractive
        backend = getattr(getattr(pipeline, "generator", None), "backend", None) if pipeline else None
        backend = backend or open_backend(cfg.answer.generator, cfg.serve.generate_max_batch)
        model_context(backend, cfg.answer.generator)
    service = Service(pipeline, backend, model_name=Path(served_name(cfg.answer.generator)).name,
                      defaults=SamplingParams.from_recipe(cfg.answer.sampling))
    server = make_server(service, host, port)
    bound = server.server_address
    console(stderr=True).print(f"serving on http://{bound[0]}:{bound[1]} (ask: {pipeline is not None}, "
                               f"generate: {backend is not None}); Ctrl-C stops", markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
        if pipeline is not None:
            pipeline.__exit__(None, None, None)
