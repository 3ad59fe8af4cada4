"""`trtrag ask`: answer a question from the index, with numbered citations."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import JsonOpt, RecipeOpt, SetOpt, command, console, emit_json, load, print_warnings


@command
def ask(question: str = typer.Argument(..., help="The question."),
        top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Passages to return (retrieve.top_k)."),
        mode: Optional[str] = typer.Option(None, "--mode", help="Rerank mode: hybrid, rrf, bm25 or dense "
                                           "(retrieve.mode)."),
        stream: bool = typer.Option(False, "--stream", help="Print the answer as it is generated."),
        server: Optional[str] = typer.Option(None, "--server", help="Ask a running `trtrag serve` at this URL "
                                             "instead of opening the index here."),
        api_key: Optional[str] = typer.Option(None, "--api-key", help="Key for --server (default: the variable "
                                              "named by serve.api_key_env)."),
        recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
        as_json: bool = JsonOpt) -> None:
    """Answer a question from the index, with numbered citations."""
    from trtrag_cli.pipeline import Pipeline, check_question

    check_question(question)
    cfg = load(recipe, set_, {"retrieve.top_k": ("--top-k", top_k), "retrieve.mode": ("--mode", mode)})

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if server:
        from trtrag_cli.serve import client

        key = api_key or os.environ.get(cfg.serve.api_key_env) or None
        result = client.ask(server, question, top_k, mode, key)  # the server does not stream /v1/ask
    else:
        with Pipeline(cfg, max_wait_ms=0, workers=1) as pipe:  # one question: nothing to wait for
            result = pipe.ask(question, on_piece=show if stream and not as_json else None)
    if as_json:
        emit_json(result)
        return
    err = console(stderr=True)
    print_warnings(err, result["warnings"])
    sys.stdout.write(("" if result["streamed"] else result["answer"]) + "\n\n")  # streamed: already shown
    for cite in result["citations"]:
        sys.stdout.write(f"[{cite['n']}] {cite['source']} ({cite['chunk']})\n")
    t = result["timings_ms"]
    err.print(f"encode {t['encode']:.1f} ms, search {t['search']:.1f} ms, rerank {t['rerank']:.1f} ms, "
              f"answer {t['answer']:.1f} ms", style="dim", markup=False)
    g = result["generation"]
    if g:
        speed = f", {g['tokens_per_s']} tok/s" if g["tokens_per_s"] else ""
        err.print(f"{g['generator']}: {g['prompt_tokens']} prompt + {g['output_tokens']} answer tokens, "
                  f"first token {g['ttft_ms']} ms{speed}", style="dim", markup=False)
