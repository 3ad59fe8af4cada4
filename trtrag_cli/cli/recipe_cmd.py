"""`trtrag recipe show|schema`: the resolved recipe, and its JSON Schema for editors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import JsonOpt, RecipeOpt, SetOpt, VersionOpt, command, emit_json, load

app = typer.Typer(no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def _group(version: bool = VersionOpt) -> None:
    """Show the resolved recipe or its JSON Schema."""


@app.command("show")
@command
def show(recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt, as_json: bool = JsonOpt) -> None:
    """The recipe after defaults and --set overrides, as YAML (or JSON)."""
    from trtrag_cli.recipe.schema import dump_recipe

    cfg = load(recipe, set_)
    if as_json:
        emit_json(cfg.to_dict())
    else:
        sys.stdout.write(dump_recipe(cfg))


@app.command("schema")
@command
def schema() -> None:
    """The recipe's JSON Schema (for editors: e.g. `# yaml-language-server: $schema=recipe.schema.json`)."""
    from trtrag_cli.recipe.schema import Recipe

    sys.stdout.write(json.dumps(Recipe.model_json_schema(), indent=2) + "\n")
