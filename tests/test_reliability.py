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

SUBSET = ("policies",)  # a small copy of examples/corpus keeps every rebuild to a few seconds
QUESTION = "How long is the warranty on a VX-200 sensor?"
SECTIONS = {"index": {"compact_above": None}}  # a re-index of a small corpus would merge away the dead rows

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
FULL = ("CURRENT", "manifest.json", "segment.json")
DAMAGE_NAMES = sorted(DAMAGES)
CASES = [(a, d) for a in FULL for d in DAMAGE_NAMES]
CASES += [(a, DAMAGE_NAMES[k % len(DAMAGE_NAMES)]) for k, a in enumerate(a for a in ARTIFACTS if a not in FULL)]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A folder holding corpus/ and ws/, indexed twice so the base segment has a dead-rows file."""
    folder = tmp_path_factory.mktemp("reliab")
    for sub in SUBSET:
        shutil.copytree(EXAMPLES / sub, folder / "corpus" / sub)
    recipe = write_recipe(folder / "r.yaml", "r", folder / "ws", **SECTIONS)
    cli = Cli()
    cli.json("index", folder / "corpus", "--recipe", recipe)
    page = folder / "corpus" / "policies" / "returns-and-rma-policy.md"
    page.write_text(page.read_text() + "\nRevised: the gateway now ships with a wall mount.\n")
    cli.json("index", folder / "corpus", "--recipe", recipe)
    assert list(_gen(folder / "ws" / "r").glob("dead-*.npy"))
    return folder


def _copy(indexed: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A private copy of the indexed workspace: (corpus, recipe, workspace folder)."""
    shutil.copytree(indexed / "ws", tmp_path / "ws")
    recipe = write_recipe(tmp_path / "r.yaml", "r", tmp_path / "ws", **SECTIONS)
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


# --- security basics --------------------------------------------------------------------------------


def _indexed_texts(recipe: Path) -> str:
    """Every live chunk's source and text in a workspace's index, joined."""
    from trtrag_cli.index.generation import load_index_manifest, open_store
    from trtrag_cli.recipe.schema import load_recipe
    from trtrag_cli.util.workspace import Workspace

    gen = Workspace(load_recipe(recipe).workspace_dir()).current_index()
    store = open_store(gen, load_index_manifest(gen))
    try:
        return "\n".join(f"{r.file} {r.title} {r.text}" for r in store.records_of(store.live_rows()))
    finally:
        store.close()


def test_index_reads_nothing_outside_the_root_through_symlinks(cli, tmp_path, make_recipe):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("The vault code is quokkamandible.")
    root = tmp_path / "root"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("Sensors report every five minutes.")
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "out").symlink_to(outside, target_is_directory=True)
    (root / "docs" / "loop").symlink_to(root, target_is_directory=True)  # a folder loop through the root
    (root / "dotdot.txt").symlink_to(Path("..") / "outside" / "secret.txt")
    recipe = make_recipe()
    report = cli.json("index", root, "--recipe", recipe)
    assert report["skipped"].get("outside-root", 0) >= 3 and report["skipped"].get("symlink-loop", 0) >= 1
    texts = _indexed_texts(recipe)
    assert "quokkamandible" not in texts and "five minutes" in texts


def test_html_is_parsed_never_executed(cli, tmp_path, make_recipe):
    root = tmp_path / "web"
    root.mkdir()
    (root / "page.html").write_text(
        "<html><head><title>Pricing</title><style>.x{content:'stylecanary'}</style>"
        "<script>document.write('scriptcanary'); fetch('http://127.0.0.1:9/x')</script></head>"
        "<body><p>The Hub G4 costs 300 euros.</p><script src='http://127.0.0.1:9/y.js'></script></body></html>")
    recipe = make_recipe()
    cli.json("index", root, "--recipe", recipe)
    texts = _indexed_texts(recipe)
    assert "300 euros" in texts and "scriptcanary" not in texts and "stylecanary" not in texts


def test_no_workspace_file_is_unpickled():
    """Every np.load in the package leaves allow_pickle at its default (False) or sets it False, and nothing
    calls pickle or torch.load on a workspace file."""
    import re

    src = Path(__file__).resolve().parents[1] / "trtrag_cli"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "allow_pickle=True" not in text, path
        assert not re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_serve_binds_loopback_by_default_and_never_logs_the_key(indexed, tmp_path):
    import json
    import os
    import subprocess
    import sys
    import time

    import httpx
    from conftest import ROOT

    from trtrag_cli.recipe.sections import ServeConfig

    assert ServeConfig().host == "127.0.0.1"
    key = "sk-reliab-7f3a9c"
    recipe = write_recipe(tmp_path / "s.yaml", "r", indexed / "ws", serve={"access_log": "json"},
                          index={"compact_above": None})
    log = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRTRAG_API_KEY=key)
    proc = subprocess.Popen([sys.executable, "-m", "trtrag_cli", "serve", "--port", "0", "--recipe", str(recipe)],
                            stdout=subprocess.PIPE, stderr=log.open("w"), env=env, cwd=ROOT)
    try:
        url = None
        for _ in range(600):
            first = log.read_text().split("\n", 1)[0]
            if first.startswith("serving on "):
                url = first.split()[-1]
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert url and url.startswith("http://127.0.0.1:")
        body = {"question": QUESTION}
        assert httpx.post(f"{url}/ask", json=body, headers={"Authorization": f"Bearer {key}"},
                          timeout=60).status_code == 200
        assert httpx.post(f"{url}/ask", json=body, headers={"Authorization": f"Bearer {key}x"}).status_code == 401
        assert httpx.post(f"{url}/ask?api_key={key}", json=body).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key[:-1]}"}).status_code == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    logged = log.read_text()
    assert len([line for line in logged.splitlines() if line.startswith("{")]) >= 4, logged
    assert all(json.loads(line)["status"] for line in logged.splitlines() if line.startswith("{"))
    assert key not in logged and key[:-1] not in logged and key not in out.decode()


def test_a_damaged_encoder_export_cache_is_exported_again(cli, indexed, tmp_path, monkeypatch):
    """The session's ONNX export cache, copied: a manifest.json of the wrong shape made ask raise
    AttributeError; now the cache counts as stale and the encoder is exported again."""
    import os

    cache = tmp_path / "cache"
    shutil.copytree(os.environ["TRTRAG_CACHE"], cache)
    monkeypatch.setenv("TRTRAG_CACHE", str(cache))
    manifests = list((cache / "encoders").rglob("onnx/*/manifest.json"))
    assert manifests
    for path in manifests:
        path.write_text("[1,2,3]")
    _, recipe, _ = _copy(indexed, tmp_path)
    _answers(cli, recipe)


def _edit_manifest(ws: Path) -> None:
    import json

    path = _gen(ws) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["segments"][0]["name"] = "../../../outside"
    path.write_text(json.dumps(manifest))


EDITS = {  # valid files with wrong contents
    "order.npy of the wrong length": lambda ws: np.save(_seg(ws) / "order.npy", np.arange(3, dtype=np.int64)),
    "float64 vectors.npy": lambda ws: np.save(_seg(ws) / "vectors.npy",
                                              np.load(_seg(ws) / "vectors.npy").astype(np.float64)),
    "manifest naming a segment outside": _edit_manifest,
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_valid_files_with_wrong_contents_are_one_line_errors(cli, indexed, tmp_path, edit):
    corpus, recipe, ws = _copy(indexed, tmp_path)
    EDITS[edit](ws)
    line = _one_line_error(cli("ask", QUESTION, "--recipe", recipe, ok=None))
    assert "damaged" in line
    _follow_hint(cli, line, corpus, recipe)
    _answers(cli, recipe)
