"""`trtrag recipe show|schema`: the resolved recipe, and its JSON Schema for editors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.util.errors import TrtragError

app = typer.Typer(no_args_is_help=True, help="Show the resolved recipe or its JSON Schema.")


def _fail(exc: TrtragError, as_json: bool) -> None:
    """One line on stderr (and a JSON error document with --json), exit code from the error."""
    if as_json:
        sys.stdout.write(json.dumps({"error": exc.message, "hint": exc.hint}) + "\n")
    sys.stderr.write(f"error: {exc.message}" + (f" — {exc.hint}" if exc.hint else "") + "\n")
    raise typer.Exit(exc.exit_code)


@app.command("show")
def show(recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe YAML (default: "
                                               "recipes/default.yaml)."),
         set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe value, e.g. --set "
                                                  "retrieve.top_k=10 (repeatable)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML.")) -> None:
    """The recipe after defaults and --set overrides, as YAML (or JSON)."""
    from trtrag_cli.recipe.schema import dump_recipe, load_recipe

    try:
        cfg = load_recipe(recipe, set_ or [])
    except TrtragError as exc:
        _fail(exc, as_json)
    sys.stdout.write(json.dumps(cfg.to_dict(), indent=2) + "\n" if as_json else dump_recipe(cfg))


@app.command("schema")
def schema() -> None:
    """The recipe's JSON Schema (for editors: e.g. `# yaml-language-server: $schema=recipe.schema.json`)."""
    from trtrag_cli.recipe.schema import Recipe

    sys.stdout.write(json.dumps(Recipe.model_json_schema(), indent=2) + "\n")
