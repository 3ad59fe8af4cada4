"""`trtrag index` killed with SIGKILL (while embedding, while publishing), and index generations written by
another trtrag: the live index keeps answering, and the next run resumes, cleans up or rebuilds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trtrag_cli.util.workspace import Workspace
from test_index_robust import TEXTS, _ws, small  # noqa: F401  (small is a fixture)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "corpus"
QUESTION = "restocking fee for an opened sensor"
REBUILD = "trtrag index <corpus> --rebuild"


def _start_index(recipe: Path, corpus: Path, log: Path, *args: str) -> subprocess.Popen:
    """`python -m trtrag_cli index` in a process of its own (the session's encoder cache is inherited)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "trtrag_cli", "index", str(corpus), "--recipe", str(recipe),
                                 *args], stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)


def _kill_when(proc: subprocess.Popen, ready, log: Path, poll_s: float) -> bool:
    """SIGKILL proc as soon as ready() holds; False when proc ended first. The deadline only stops a hung run
    from hanging the suite."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(poll_s)
    else:
        proc.kill()
        proc.wait()
        assert proc.returncode == 0, log.read_text()
        return False
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def _answer(cli, recipe: Path) -> tuple[str, list[str]]:
    res = cli.json("ask", QUESTION, "--recipe", recipe)
    return res["answer"], [p["source"] for p in res["passages"]]


def _leftovers(ws: Workspace) -> list[str]:
    """What a killed writer may leave in index/: unpublished or half-pruned folders, a half-written CURRENT."""
    return sorted(p.name for p in ws.index_root.iterdir() if p.name.startswith((".tmp-", ".trash-", ".CURRENT.")))


def test_kill_9_while_embedding_keeps_the_live_index_and_the_next_run_resumes(cli, small, tmp_path):
    corpus, recipe = small
    ws = _ws(recipe)
    cli.json("index", corpus, "--recipe", recipe)
    live, before = ws.current_index(), _answer(cli, recipe)
    shutil.copytree(EXAMPLES, corpus / "examples")  # about 150 chunks to embed: seconds on a CPU
    sets = ("--set", "encoder.batch_size=2")  # a checkpoint part every 32 chunks
    log = tmp_path / "index.log"
    parts = ws.root / "_cache" / "embed-checkpoint"
    proc = _start_index(recipe, corpus, log, *sets)
    assert _kill_when(proc, lambda: any(parts.rglob("part-*.npz")), log, 0.05), log.read_text()
    assert "embed:" in log.read_text()
    assert (ws.root / "lock").read_text().split()[0] == str(proc.pid)  # the file stays; the flock died with it

    assert ws.current_index() == live
    assert _answer(cli, recipe) == before
    cli("doctor", "--recipe", recipe)
    report = cli.json("index", corpus, "--recipe", recipe, *sets)  # no lock to remove, nothing to clean first
    c = report["counts"]
    assert c["chunks_resumed"] > 0 and c["chunks_resumed"] + c["chunks_embedded"] == c["chunks_new"]
    assert ws.current_index() != live and _leftovers(ws) == []
    assert not any(parts.rglob("part-*.npz"))
    assert _answer(cli, recipe)[1][0] == "returns.txt"


def test_kill_9_while_publishing_leaves_one_readable_generation(cli, small, tmp_path):
    """Killed once the new generation's temporary folder appears (while its files are written, or renamed
    into place, or CURRENT is swapped): ask answers from the old or the new generation, and the next run
    publishes and removes what the killed one left."""
    corpus, recipe = small
    ws = _ws(recipe)
    cli.json("index", corpus, "--recipe", recipe)
    before = _answer(cli, recipe)
    log = tmp_path / "index.log"
    killed = 0
    for attempt in range(3):
        old = ws.current_index()
        (corpus / "office.txt").write_text(TEXTS["office.txt"] + f" Revision {attempt}.")
        proc = _start_index(recipe, corpus, log)
        landed = _kill_when(proc, lambda: any(p.name.startswith(".tmp-gen-") for p in ws.index_root.iterdir()),
                            log, 0.001)
        killed += landed
        gen = ws.current_index()
        assert gen is not None and (gen / "manifest.json").is_file()
        assert _answer(cli, recipe) == before  # office.txt's edit does not change this answer
        cli("doctor", "--recipe", recipe)
        report = cli.json("index", corpus, "--recipe", recipe)
        if gen == old:  # killed before CURRENT moved: the edited chunk comes from the checkpoint
            assert report["counts"]["chunks_new"] == 1 and report["counts"]["chunks_embedded"] == 0
        assert _leftovers(ws) == []
        if landed:
            break
    assert killed, "every run published before the kill landed"


# --- index generations written by another trtrag -------------------------------------------------------


def _strip_backend(manifest: dict) -> None:
    for key in ("backend", "precision"):
        manifest["encoder"].pop(key)


def _first_release(manifest: dict) -> None:
    """The manifest of trtrag's first release: no encoder backend or precision, no index backend or nlist_built."""
    _strip_backend(manifest)
    for key in ("backend", "nlist_built"):
        manifest["index"].pop(key)


def _layout(value):
    def alter(manifest: dict) -> None:
        if value is None:
            manifest.pop("layout")
        else:
            manifest["layout"] = value
    return alter


def _drop_dim(manifest: dict) -> None:
    manifest["encoder"].pop("dim")


OLD = {  # name: (what the older trtrag wrote differently, does this version read it as it is)
    "no encoder backend and precision": (_strip_backend, True),
    "first release": (_first_release, True),
    "no layout": (_layout(None), False),
    "layout 0": (_layout(0), False),
    "layout 1 (before segments)": (_layout(1), False),
    "layout 3": (_layout(3), False),
    "no encoder dim": (_drop_dim, False),
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_a_generation_from_another_trtrag_is_used_or_rebuilt_with_one_line(cli, small, name):
    corpus, recipe = small
    ws = _ws(recipe)
    first = cli.json("index", corpus, "--recipe", recipe)["counts"]
    before = _answer(cli, recipe)
    gen = ws.current_index()
    manifest = json.loads((gen / "manifest.json").read_text())
    alter, readable = OLD[name]
    alter(manifest)
    (gen / "manifest.json").write_text(json.dumps(manifest))

    asked = cli("ask", QUESTION, "--recipe", recipe, "--json", ok=readable)
    doctor = cli("doctor", "--recipe", recipe, "--json", ok=readable)
    for res in (asked, doctor):
        assert "Traceback" not in res.output
    if readable:
        assert (json.loads(asked.stdout)["answer"], [p["source"] for p in json.loads(asked.stdout)["passages"]]) \
            == before
    else:
        assert asked.exit_code == 1
        err = asked.stderr.strip()
        assert len(err.splitlines()) == 1 and "another trtrag version" in err and REBUILD in err
        problems = json.loads(doctor.stdout)["problems"]
        assert problems and all(REBUILD in p for p in problems), problems

    report = cli.json("index", corpus, "--recipe", recipe)
    if readable:
        assert report["notes"] == [] and report["counts"]["chunks_embedded"] == 0
    else:
        assert [n for n in report["notes"] if "another trtrag version" in n]
        assert report["counts"]["chunks_embedded"] == first["chunks_total"]
    assert _answer(cli, recipe) == before
    cli("doctor", "--recipe", recipe)


def test_an_old_flat_index_folder_is_reindexed_into_a_generation(cli, small):
    """A workspace whose index files lie in index/ itself (no generations, no CURRENT): ask names the
    command, and index builds a generation beside them."""
    corpus, recipe = small
    ws = _ws(recipe)
    cli.json("index", corpus, "--recipe", recipe)
    gen = ws.current_index()
    (ws.index_root / "CURRENT").unlink()
    for f in gen.iterdir():
        shutil.move(str(f), str(ws.index_root / f.name))
    gen.rmdir()
    asked = cli("ask", QUESTION, "--recipe", recipe, ok=False)
    assert asked.exit_code == 1 and "run: trtrag index <corpus folder>" in asked.stderr
    assert "Traceback" not in asked.output
    cli.json("index", corpus, "--recipe", recipe)
    assert _answer(cli, recipe)[1][0] == "returns.txt"


def test_publishing_a_folder_swaps_it_whole_and_repairs_a_killed_swap(tmp_path):
    """Engines and calibration are published with Workspace.publish_dir: the new folder replaces the old in
    one step, and a run killed after moving the old one aside (simulated) is repaired by the next publish."""
    ws = Workspace(tmp_path / "ws")
    for text in ("first", "second"):
        with ws.publish_dir("engines/onnxruntime-int8") as tmp:
            (tmp / "manifest.json").write_text(text)
    final = ws.root / "engines" / "onnxruntime-int8"
    assert (final / "manifest.json").read_text() == "second"
    assert sorted(p.name for p in final.parent.iterdir()) == ["onnxruntime-int8"]
    aside = final.parent / ".old-onnxruntime-int8-1-abcdef"
    os.rename(final, aside)  # the state a kill between the two renames of the fallback path leaves
    with pytest.raises(RuntimeError):
        with ws.publish_dir("engines/onnxruntime-int8"):
            assert (final / "manifest.json").read_text() == "second"  # put back before the new build starts
            raise RuntimeError("the build fails")
    assert (final / "manifest.json").read_text() == "second" and not aside.exists()
