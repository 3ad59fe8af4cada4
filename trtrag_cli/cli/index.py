"""`trtrag index`: chunk, embed and index a corpus."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import JsonOpt, RecipeOpt, SetOpt, command, console, emit_json, load, print_warnings
from trtrag_cli.cli.progress import Progress


@command
def index(paths: List[Path] = typer.Argument(..., help="Corpus folders or files."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          rebuild: bool = typer.Option(False, "--rebuild", help=(
              "Build from scratch, ignoring the published index and a killed run's saved vectors "
              "(calibration and engines are kept). A damaged index is rebuilt without it.")),
          compact: bool = typer.Option(False, "--compact", help=(
              "Merge the index's segments into one after updating (re-indexing also does it by itself past "
              "index.compact_above and index.max_segments).")),
          as_json: bool = JsonOpt) -> None:
    """Chunk, embed and index a corpus (incremental: only new or changed files are embedded and written)."""
    from trtrag_cli.index.build import run_index

    cfg = load(recipe, set_)
    err = console(stderr=True)
    with Progress(err, unit={"embed": "chunks"}) as progress:
        report = run_index(cfg, paths, progress.update, rebuild=rebuild, compact=compact)
    if as_json:
        emit_json(report)
        return
    out = console()
    c = report["counts"]
    rate = f", {report['docs_per_s']} docs/s" if report["docs_per_s"] else ""
    out.print(f"indexed {c['chunks_total']} chunks into {report['workspace']} in {report['seconds']:.1f} s "
              f"({report['documents_indexed']} documents embedded{rate}; encoder {report['encoder']})", markup=False)
    out.print(f"files: {c['files_added']} added, {c['files_changed']} changed, {c['files_removed']} removed, "
              f"{c['files_unchanged']} unchanged; chunks embedded: {c['chunks_embedded']}"
              + (f" at {report['embed_chunks_per_s']} chunks/s" if report["embed_chunks_per_s"] else "")
              + (f"; {c['chunks_resumed']} resumed from an interrupted run" if c["chunks_resumed"] else "")
              + (f"; {c['chunks_with_embeddings']} brought their own embeddings" if c["chunks_with_embeddings"]
                 else ""),
              markup=False)
    out.print(f"segments: {c['segments']}, dead rows: {c['dead_rows']}"
              + (f"; compacted in {report['compacted']['seconds']:.1f} s" if report["compacted"] else ""),
              markup=False)
    if report["skipped"]:
        out.print("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(report["skipped"].items())),
                  markup=False)
    for note in report["notes"]:
        err.print(f"note: {note}", markup=False)
    print_warnings(err, report["warnings"])
