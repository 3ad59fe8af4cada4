"""Reliability you can show (issue 21): a corruption matrix over every index artifact, and security basics.

Matrix: each artifact of an indexed workspace is damaged (truncated to half, emptied, random bytes, or
valid JSON of the wrong shape), then `ask`, `doctor` and `index` must each succeed or exit 1 with one line
and no traceback, whose hint names a command that works: run it, and `ask` answers again. The workspace is
indexed once (twice, so a segment carries dead rows) and copied per case.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, Cli, write_recipe

SUBSET = ("policies", "products")  # a small copy of examples/corpus keeps every rebuild to a few seconds
QUESTION = "How long is the warranty on a VX-200 sensor?"

DAMAGES = {
    "half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "random": lambda p: p.write_bytes(np.random.default_rng(0).bytes(max(64, p.stat().st_size))),
    "list": lambda p: p.write_text("[1,2,3]"),
    "object": lambda p: p.write_text("{}"),
    "null": lambda p: p.write_text("null"),
}


def _gen(ws: Path) -> Path:
    return ws / "index" / (ws / "index" / "CURRENT").read_text().strip()


def _seg(ws: Path) -> Path:
    """The base segment: the one with dead rows after the second run."""
    return ws / "index" / "segments" / (_gen(ws) / "SEGMENTS").read_text().split()[0]


ARTIFACTS = {
    "CURRENT": lambda ws: ws / "index" / "CURRENT",
    "manifest.json": lambda ws: _gen(ws) / "manifest.json",
    "SEGMENTS": lambda ws: _gen(ws) / "SEGMENTS",
    "dead.npy": lambda ws: next(_gen(ws).glob("dead-*.npy")),
    "recipe.yaml": lambda ws: _gen(ws) / "recipe.yaml",
    **{name: (lambda n: lambda ws: _seg(ws) / n)(name) for name in (
        "segment.json", "chunks.sqlite", "vectors.npy", "ids.npy", "order.npy", "bm25/terms.npy",
        "bm25/indptr.npy", "bm25/docs.npy", "bm25/tfs.npy", "bm25/doclen.npy")},
}
FULL = ("CURRENT", "manifest.json", "segment.json", "vectors.npy")
DAMAGE_NAMES = sorted(DAMAGES)
CASES = [(a, d) for a in FULL for d in DAMAGE_NAMES]
CASES += [(a, DAMAGE_NAMES[k % len(DAMAGE_NAMES)]) for k, a in enumerate(a for a in ARTIFACTS if a not in FULL)]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A folder holding corpus/ and ws/, indexed twice so the base segment has a dead-rows file."""
    folder = tmp_path_factory.mktemp("reliab")
    for sub in SUBSET:
        shutil.copytree(EXAMPLES / sub, folder / "corpus" / sub)
    recipe = write_recipe(folder / "r.yaml", "r", folder / "ws")
    cli = Cli()
    cli.json("index", folder / "corpus", "--recipe", recipe)
    page = folder / "corpus" / "products" / "hub-g4-gateway.md"
    page.write_text(page.read_text() + "\nRevised: the gateway now ships with a wall mount.\n")
    cli.json("index", folder / "corpus", "--recipe", recipe)
    assert list(_gen(folder / "ws" / "r").glob("dead-*.npy"))
    return folder


def _copy(indexed: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A private copy of the indexed workspace: (corpus, recipe, workspace folder)."""
    shutil.copytree(indexed / "ws", tmp_path / "ws")
    recipe = write_recipe(tmp_path / "r.yaml", "r", tmp_path / "ws")
    return indexed / "corpus", recipe, tmp_path / "ws" / "r"


def _one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _follow_hint(cli, line: str, corpus: Path, recipe: Path) -> None:
    """Run the command an error's hint names."""
    assert "trtrag index" in line, f"the hint names no command that repairs the index: {line}"
    extra = ("--rebuild",) if "--rebuild" in line else ()
    cli.json("index", corpus, "--recipe", recipe, *extra)


def _answers(cli, recipe: Path) -> None:
    res = cli.json("ask", QUESTION, "--recipe", recipe)
    assert res["passages"] and res["passages"][0]["source"].startswith("policies/warranty-vx")


@pytest.mark.parametrize("artifact,damage", CASES, ids=[f"{a}-{d}" for a, d in CASES])
def test_a_damaged_artifact_is_recovered_or_one_line(cli, indexed, tmp_path, artifact, damage):
    corpus, recipe, ws = _copy(indexed, tmp_path)
    DAMAGES[damage](ARTIFACTS[artifact](ws))
    for args in (("ask", QUESTION), ("doctor",)):
        res = cli(*args, "--recipe", recipe, ok=None)
        if res.exit_code != 0:
            line = _one_line_error(res)
            if args[0] == "ask":
                assert "trtrag index" in line, line
    res = cli("index", corpus, "--recipe", recipe, "--json", ok=None)
    if res.exit_code != 0:
        _follow_hint(cli, _one_line_error(res), corpus, recipe)
    _answers(cli, recipe)


def test_current_naming_a_missing_or_outside_folder_is_repaired(cli, indexed, tmp_path):
    corpus, recipe, ws = _copy(indexed, tmp_path)
    for pointer in ("gen-missing\n", "..\n", "../../..\n", "\n"):
        (ws / "index" / "CURRENT").write_text(pointer)
        line = _one_line_error(cli("ask", QUESTION, "--recipe", recipe, ok=None))
        assert "trtrag index" in line
        cli.json("index", corpus, "--recipe", recipe)
        _answers(cli, recipe)


def test_a_vectors_file_holding_objects_is_refused_not_unpickled(cli, indexed, tmp_path):
    corpus, recipe, ws = _copy(indexed, tmp_path)
    path = _seg(ws) / "vectors.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    line = _one_line_error(cli("ask", QUESTION, "--recipe", recipe, ok=None))
    assert "damaged" in line and "trtrag index <corpus> --rebuild" in line
