"""`trtrag eval`: recall@k and MRR@k on known-item queries, with latency percentiles per stage."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from trtrag_cli.cli.common import JsonOpt, RecipeOpt, SetOpt, command, console, emit_json, load
from trtrag_cli.cli.progress import Progress
from trtrag_cli.util.errors import UsageError


@command
def eval_(queries: Path = typer.Option(..., "--queries", "-q",
                                       help=escape("JSONL, one query a line: {query, relevant: [source, ...]}.")),
          modes: Optional[str] = typer.Option(None, "--modes", help="Comma-separated modes to compare, "
                                              "e.g. bm25,dense,rrf,hybrid (default: retrieve.mode)."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          as_json: bool = JsonOpt) -> None:
    """Recall@k and MRR@k on known-item queries, and latency percentiles per stage."""
    from trtrag_cli.evaluate.known_items import KS, run_eval
    from trtrag_cli.retrieve.retriever import MODES

    mode_list = [m.strip() for m in modes.split(",") if m.strip()] if modes is not None else None
    if mode_list is not None and (not mode_list or set(mode_list) - set(MODES)):
        raise UsageError(f"--modes {modes!r}: each mode must be one of {', '.join(MODES)}",
                         "e.g. --modes bm25,dense,rrf,hybrid")
    cfg = load(recipe, set_)
    with Progress(console(stderr=True), unit={"eval": "queries"}) as progress:
        report = run_eval(cfg, queries, mode_list, progress=progress.update)
    if as_json:
        emit_json(report)
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"{report['queries']} queries, encoder {report['encoder']}"))
    table.add_column("mode")
    for k in KS:
        table.add_column(f"R@{k}", justify="right")
    for col in ("MRR@10", "P50 ms", "P99 ms"):
        table.add_column(col, justify="right")
    for mode, res in report["modes"].items():
        m, lat = res["metrics"], res["latency_ms"]["total"]
        table.add_row(Text(mode), *[f"{m[f'recall@{k}']:.3f}" for k in KS], f"{m['mrr@10']:.3f}",
                      f"{lat['p50']:.2f}", f"{lat['p99']:.2f}")
    console().print(table)
    if report["unknown_relevant_count"]:
        console(stderr=True).print(f"warning: {report['unknown_relevant_count']} relevant sources are not in the "
                                   "index, e.g. " + ", ".join(report["unknown_relevant_sources"][:3]),
                                   style="yellow", markup=False)
