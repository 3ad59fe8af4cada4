"""The `trtrag` command: one thin module per command, registered here; `main` is the console script.

Each command loads the recipe, calls one function and renders the result: the result on stdout (text
and tables), diagnostics and progress on stderr, one JSON document on stdout with `--json`. Exit codes
(see cli/common.py): 0 success, 1 user error, 2 usage error, 70 a bug (with its traceback), 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from trtrag_cli.cli import ask, bench, build_engine, calibrate, doctor, evaluate, index, recipe_cmd, serve
from trtrag_cli.cli.common import VersionOpt, guarded

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def _app(version: bool = VersionOpt) -> None:
    """Build and run a fast retrieval-augmented generation service from one YAML recipe."""


# The workflow in order; a new command is one line here (its module under trtrag_cli/cli/, its function
# decorated with common.command).
app.command("index")(index.index)
app.command("calibrate")(calibrate.calibrate)
app.command("build-engine")(build_engine.build_engine)
app.command("ask")(ask.ask)
app.command("serve")(serve.serve)
app.command("eval")(evaluate.eval_)
app.command("bench")(bench.bench)
app.command("doctor")(doctor.doctor)
app.add_typer(recipe_cmd.app, name="recipe")


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: run the app; a crash keeps its traceback and exits 70."""
    sys.exit(guarded(lambda: app(args=argv, prog_name="trtrag")))
