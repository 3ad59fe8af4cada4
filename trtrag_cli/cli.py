"""The `trtrag` command: each command loads the recipe, calls one function, renders the result.

Human output goes to stderr through Rich; `--json` prints one JSON document on stdout. Exit codes:
0 success, 1 user error (one line, no traceback), 2 usage error.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .errors import TrtragError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build and run a fast retrieval-augmented generation service from one YAML recipe.")

RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe YAML (default: recipes/default.yaml).")
SetOpt = typer.Option(None, "--set", help="Override a recipe value, e.g. --set retrieve.top_k=10 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def command(fn: Callable) -> Callable:
    """Turn TrtragError into one line (or a JSON error document) and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrtragError as exc:
            if kwargs.get("as_json"):
                _emit_json({"error": exc.message, "hint": exc.hint})
            line = f"error: {exc.message}" + (f" — {exc.hint}" if exc.hint else "")
            _console().print(line, markup=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _console().print("interrupted; the existing index is untouched", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def _recipe(recipe: Optional[Path], overrides: Optional[List[str]]):
    from .recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def _print_warnings(console, warnings: list[str], limit: int = 5) -> None:
    for w in warnings[:limit]:
        console.print(f"warning: {w}", markup=False, style="yellow")
    if len(warnings) > limit:
        console.print(f"... and {len(warnings) - limit} more warnings (see --json)", style="yellow")


@app.command()
@command
def index(paths: List[Path] = typer.Argument(..., help="Corpus folders or files."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          as_json: bool = JsonOpt) -> None:
    """Chunk, embed and index a corpus (incremental: only new or changed files are embedded)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .indexing import run_index

    cfg = _recipe(recipe, set_)
    console = _console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=as_json) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            task = bar.tasks[tasks[stage]]
            elapsed = task.elapsed or 0.0
            rate = f"{done / elapsed:.0f} chunks/s" if stage == "embed" and elapsed > 0 else ""
            bar.update(tasks[stage], completed=done, total=total, rate=rate)

        report = run_index(cfg, paths, progress)
    if as_json:
        _emit_json(report)
        return
    c = report["counts"]
    rate = f", {report['docs_per_s']} docs/s" if report["docs_per_s"] else ""
    console.print(f"indexed {c['chunks_total']} chunks into {report['workspace']} in {report['seconds']:.1f} s "
                  f"({report['documents_indexed']} documents embedded{rate}; encoder {report['encoder']})")
    console.print(f"files: {c['files_added']} added, {c['files_changed']} changed, {c['files_removed']} removed, "
                  f"{c['files_unchanged']} unchanged; chunks embedded: {c['chunks_embedded']}"
                  + (f" at {report['embed_chunks_per_s']} chunks/s" if report["embed_chunks_per_s"] else ""))
    if report["skipped"]:
        console.print("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(report["skipped"].items())))
    for note in report["notes"]:
        console.print(f"note: {note}")
    _print_warnings(console, report["warnings"])


@app.command()
@command
def ask(question: str = typer.Argument(..., help="The question."),
        top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Passages to return."),
        mode: Optional[str] = typer.Option(None, help="Rerank mode: hybrid, rrf, bm25 or dense."),
        recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
        as_json: bool = JsonOpt) -> None:
    """Answer a question from the index, with numbered citations."""
    from .pipeline import Pipeline, check_question

    check_question(question)
    cfg = _recipe(recipe, set_)
    with Pipeline(cfg) as pipe:
        result = pipe.ask(question, top_k=top_k, mode=mode)
    if as_json:
        _emit_json(result)
        return
    console = _console()
    _print_warnings(console, result["warnings"])
    sys.stdout.write(result["answer"] + "\n\n")
    for cite in result["citations"]:
        sys.stdout.write(f"[{cite['n']}] {cite['source']} ({cite['chunk']})\n")
    t = result["timings_ms"]
    console.print(f"encode {t['encode']:.1f} ms, search {t['search']:.1f} ms, rerank {t['rerank']:.1f} ms, "
                  f"answer {t['answer']:.1f} ms", style="dim")


@app.command("eval")
@command
def eval_(queries: Path = typer.Option(..., "--queries", "-q", help="JSONL: {query, relevant: [source, ...]}"),
          modes: Optional[str] = typer.Option(None, "--modes", help="Comma-separated modes to compare, "
                                              "e.g. bm25,dense,rrf,hybrid (default: the recipe's)."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          as_json: bool = JsonOpt) -> None:
    """Recall@k and MRR@k on known-item queries, and latency percentiles per stage."""
    from rich.progress import Progress

    from .evaluate import KS, run_eval

    cfg = _recipe(recipe, set_)
    mode_list = [m.strip() for m in modes.split(",") if m.strip()] if modes else None
    console = _console()
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("eval", total=None)
        report = run_eval(cfg, queries, mode_list,
                          progress=lambda _s, done, total: bar.update(task, completed=done, total=total))
    if as_json:
        _emit_json(report)
        return
    from rich.table import Table

    table = Table(title=f"{report['queries']} queries, encoder {report['encoder']}")
    table.add_column("mode")
    for k in KS:
        table.add_column(f"R@{k}", justify="right")
    table.add_column("MRR@10", justify="right")
    table.add_column("P50 ms", justify="right")
    table.add_column("P99 ms", justify="right")
    for mode, res in report["modes"].items():
        m, lat = res["metrics"], res["latency_ms"]["total"]
        table.add_row(mode, *[f"{m[f'recall@{k}']:.3f}" for k in KS], f"{m['mrr@10']:.3f}",
                      f"{lat['p50']:.2f}", f"{lat['p99']:.2f}")
    console.print(table)
    if report["unknown_relevant_count"]:
        console.print(f"warning: {report['unknown_relevant_count']} relevant sources are not in the index, e.g. "
                      + ", ".join(report["unknown_relevant_sources"][:3]), style="yellow", markup=False)


@app.command()
@command
def doctor(recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
           as_json: bool = JsonOpt) -> None:
    """Versions, GPU, and the backend each stage of the recipe resolves to, and why."""
    from .doctor import run_doctor

    report = run_doctor(_recipe(recipe, set_))
    if as_json:
        _emit_json(report)
        return
    from rich.table import Table

    console = _console()
    console.print(f"Python {report['python']} on {report['platform']}; recipe {report['recipe']}")
    console.print("GPUs: " + (", ".join(f"{g['name']} ({g['memory_mib']} MiB, sm {g['compute_capability']})"
                                        for g in report["gpus"]) or "none"))
    libs = Table(title="libraries")
    libs.add_column("package")
    libs.add_column("version")
    for name, ver in report["libraries"].items():
        libs.add_row(name, ver or "-")
    console.print(libs)
    stages = Table(title="stages")
    for col in ("stage", "backend", "ok", "why"):
        stages.add_column(col)
    for name, st in report["stages"].items():
        stages.add_row(name, st["backend"], "yes" if st["ok"] else "MISSING", st["why"])
    console.print(stages)


def main() -> None:
    """Console-script entry point."""
    app()
