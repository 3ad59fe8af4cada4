"""`trtrag doctor`: versions, GPUs, and the backend each stage of the recipe resolves to, and why."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import JsonOpt, RecipeOpt, SetOpt, command, console, emit_json, load


@command
def doctor(recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
           as_json: bool = JsonOpt) -> None:
    """Versions, GPU, the backend each stage resolves to and why; exits 1 when `ask` would fail."""
    from trtrag_cli.doctor import run_doctor

    report = run_doctor(load(recipe, set_))
    if as_json:
        emit_json(report)
        _fail_on_problems(report["problems"])
        return
    from rich.table import Table
    from rich.text import Text

    out = console()
    out.print(f"Python {report['python']} on {report['platform']}; recipe {report['recipe']}", markup=False)
    out.print("GPUs: " + (", ".join(f"{g['name']} ({g['memory_mib']} MiB, sm {g['compute_capability']})"
                                    for g in report["gpus"]) or "none"), markup=False)
    libs = Table(title="libraries")
    libs.add_column("package")
    libs.add_column("version")
    for name, ver in report["libraries"].items():
        libs.add_row(Text(name), Text(ver or "-"))
    out.print(libs)
    stages = Table(title="stages")
    for col in ("stage", "backend", "ok", "why"):
        stages.add_column(col)
    for name, st in report["stages"].items():
        stages.add_row(Text(name), Text(st["backend"]), "yes" if st["ok"] else "MISSING", Text(st["why"]))
    out.print(stages)
    trt = report["tensorrt"]
    out.print("TensorRT plans: " + (f"{trt['runtime']} {trt['version']}, " if trt["runtime"] else "") + trt["why"],
              markup=False)
    for line in report.get("advice", []):
        out.print(f"advice: {line}", markup=False, style="yellow")
    _fail_on_problems(report["problems"])


def _fail_on_problems(problems: list[str]) -> None:
    """One `error:` line per problem on stderr, then exit 1 (doctor: where `ask` would fail)."""
    for line in problems:
        console(stderr=True).print(f"error: {line}", markup=False)
    if problems:
        raise typer.Exit(1)
