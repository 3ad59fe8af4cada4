"""What every command shares: recipe loading, option checks, the two consoles, JSON output, error handling.

Streams: a command's result (text and tables) goes to stdout, diagnostics and progress to stderr, and
`--json` replaces the result with one JSON document on stdout. Exit codes: 0 success; 1 a user error
(`TrtragError`: bad recipe, missing input, missing optional package); 2 bad usage (Click's own parse errors
and option values out of range, `UsageError`); 70 (EX_SOFTWARE) a crash, i.e. a bug, with its traceback;
130 interrupted.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from trtrag_cli.util.errors import MissingDependency, TrtragError, UsageError

EX_SOFTWARE = 70  # sysexits.h: internal software error; lets CI tell a bug from a user error (1, 2)
EX_INTERRUPTED = 130
PIPE_WIDTH = 1000  # in a pipe or log file tables keep their natural width instead of 80 columns

RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe YAML (default: recipes/default.yaml).")
SetOpt = typer.Option(None, "--set", help="Override a recipe value, e.g. --set retrieve.top_k=10 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout instead of the text result.")


def console(stderr: bool = False):
    """A Rich console on stdout (results) or stderr (diagnostics) that never hard-wraps piped output."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = PIPE_WIDTH
    return out


def emit_json(data: Any) -> None:
    """Write one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def error_line(exc: TrtragError) -> str:
    """The one line a user error prints."""
    return f"error: {exc.message}" + (f" — {exc.hint}" if exc.hint else "")


def _missing(exc: ModuleNotFoundError) -> MissingDependency | None:
    """A bare `import x` of a known optional package, said as MissingDependency; None for anything else."""
    from trtrag_cli.util import deps

    name = (exc.name or "").split(".")[0]
    return deps.missing(name) if name in deps.KNOWN else None


def version() -> str:
    """The installed trtrag version."""
    from trtrag_cli.util.deps import version as dist_version

    return dist_version("trtrag") or "unknown"


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"trtrag {version()}\n")
        raise typer.Exit(0)


VersionOpt = typer.Option(False, "--version", callback=_print_version, is_eager=True, expose_value=False,
                          help="Print the trtrag version and exit.")


def command(fn: Callable) -> Callable:
    """Make fn a command: `--version` beside its options, and a user error said as one line (plus a JSON
    error document under --json) with its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs.pop("version", None)  # handled by its eager callback
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as exc:
            missing = _missing(exc)
            if missing is None:
                raise
            _fail(missing, kwargs.get("as_json", False))
        except TrtragError as exc:
            _fail(exc, kwargs.get("as_json", False))
        except KeyboardInterrupt:
            console(stderr=True).print("interrupted; published artifacts are untouched", markup=False)
            raise typer.Exit(EX_INTERRUPTED) from None

    signature = inspect.signature(fn)
    wrapper.__signature__ = signature.replace(parameters=[  # Typer reads the options from the signature
        *signature.parameters.values(),
        inspect.Parameter("version", inspect.Parameter.KEYWORD_ONLY, default=VersionOpt, annotation=bool)])
    return wrapper


def _fail(exc: TrtragError, as_json: bool):
    if as_json:
        emit_json({"error": exc.message, "hint": exc.hint})
    console(stderr=True).print(error_line(exc), markup=False)
    raise typer.Exit(exc.exit_code) from None


def guarded(run: Callable[[], Any]) -> int:
    """Run the CLI; an exception that escapes it is a bug: print its traceback, return EX_SOFTWARE.

    SystemExit passes through with its code, so user and usage errors keep 1 and 2.
    """
    try:
        run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the point is to catch what nothing else did
        traceback.print_exc()
        sys.stderr.write(f"trtrag: internal error ({type(exc).__name__}): this is a bug; please report it with "
                         f"the traceback above (exit code {EX_SOFTWARE})\n")
        return EX_SOFTWARE
    return 0


def load(recipe: Optional[Path], overrides: Optional[List[str]], options: dict[str, tuple[str, Any]] | None = None):
    """The recipe with its --set overrides, then the options that mirror recipe keys, checked the same way.

    options: recipe key -> (option name, value); None means the option was not given. An option's value
    goes through the recipe's own validation, and a refusal names the option (exit code 2).
    """
    from trtrag_cli.recipe.schema import load_recipe

    given = {key: pair for key, pair in (options or {}).items() if pair[1] is not None}
    extra = [f"{key}={json.dumps(value)}" for key, (_, value) in given.items()]  # JSON scalars are YAML scalars
    try:
        return load_recipe(recipe, list(overrides or []) + extra)
    except TrtragError as exc:
        for key, (flag, value) in given.items():
            if key in exc.message:
                reason = exc.message[exc.message.index(key):]
                hint = exc.hint if exc.hint and "--set" not in exc.hint else f"{flag} sets {key}"
                raise UsageError(f"{flag} {value}: {reason}", hint) from None
        raise


def at_least(flag: str, value: int, low: int, hint: str = "") -> int:
    """Check an option that has no recipe key: value >= low, else a one-line usage error."""
    if value < low:
        raise UsageError(f"{flag} must be at least {low}, got {value}", hint or None)
    return value


def int_list(flag: str, text: str, low: int = 1, example: str = "1,32,1000") -> tuple[int, ...]:
    """Parse a comma-separated list of integers, each at least low."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}", f"e.g. {flag} {example}") \
            from None
    for v in values:
        if v < low:
            raise UsageError(f"{flag} values must be at least {low}, got {v}", f"e.g. {flag} {example}")
    return values


def print_warnings(out, warnings: list[str], limit: int = 5) -> None:
    """Print the first warnings on a (stderr) console and say how many more --json holds."""
    for w in warnings[:limit]:
        out.print(f"warning: {w}", markup=False, style="yellow")
    if len(warnings) > limit:
        out.print(f"... and {len(warnings) - limit} more warnings (see --json)", style="yellow", markup=False)
