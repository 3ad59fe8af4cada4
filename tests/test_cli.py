"""The staged workflow through the real CLI: index -> ask -> eval, incremental re-index, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, ROOT, Cli

HEAVY = ("torch", "onnxruntime", "faiss", "transformers", "sentence_transformers", "bm25s", "tensorrt", "pymilvus",
         "milvus_lite")


def test_help_and_version_of_every_command_import_no_heavy_library():
    """-h, --help and --version on the app and on every registered command, in a fresh interpreter."""
    code = (
        "import sys\n"
        "import typer\n"
        "from trtrag_cli.cli.app import app\n"
        "names = sorted(typer.main.get_command(app).commands)\n"
        "for cmd in [[]] + [[n] for n in names]:\n"
        "    for flag in ('-h', '--help', '--version'):\n"
        "        try:\n"
        "            app(cmd + [flag], prog_name='trtrag')\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (cmd, flag, e.code)\n"
        "print(names)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    names, heavy = out.stdout.strip().splitlines()[-2:]
    assert heavy == "[]"
    assert {"index", "calibrate", "build-engine", "ask", "serve", "eval", "bench", "doctor"} <= set(eval(names))
    assert out.stdout.count("trtrag 0.1") >= 9 and "Usage: trtrag ask" in out.stdout


def test_usage_error_exits_2(cli):
    assert cli("index", ok=None).exit_code == 2
    assert cli("ask", "q", "--no-such-flag", ok=None).exit_code == 2


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """The example corpus indexed once for the read-only tests of this module."""
    tmp = tmp_path_factory.mktemp("indexed")
    data = yaml.safe_load((ROOT / "recipes" / "default.yaml").read_text())
    data.update(name="ex", workspace=str(tmp / "ws"))
    recipe = tmp / "ex.yaml"
    recipe.write_text(yaml.safe_dump(data))
    report = Cli().json("index", EXAMPLES, "--recipe", recipe)
    return recipe, report


def test_index_report(indexed):
    _, report = indexed
    c = report["counts"]
    assert c["files_added"] == len([p for p in EXAMPLES.rglob("*") if p.is_file()])
    assert c["chunks_total"] >= 50 and c["chunks_embedded"] == c["chunks_total"]
    assert report["documents_indexed"] == 50 and report["docs_per_s"] > 0  # 36 files + 14 jsonl lines
    assert report["encoder"].startswith("onnxruntime")


def test_ask_answers_with_citations(cli, indexed):
    recipe, _ = indexed
    res = cli.json("ask", "Can I get an advance replacement for a faulty TH-50 sensor?", "--recipe", recipe)
    assert res["passages"] and res["passages"][0]["source"] == "policies/warranty-th-pg-series.md"
    assert res["citations"], res["answer"]
    for cite in res["citations"]:
        assert f"[{cite['n']}]" in res["answer"]
        assert cite["source"] == res["passages"][cite["n"] - 1]["source"]
    assert set(res["timings_ms"]) >= {"encode", "search", "rerank", "answer", "total"}
    text = cli("ask", "What was Corvane's revenue in Europe in fiscal 2024?", "--recipe", recipe).stdout
    assert "[1]" in text and "finance/annual-report-2024.md" in text


@pytest.mark.parametrize("mode", ["dense", "bm25", "rrf", "hybrid"])
def test_each_mode_ranks_the_right_document_first(cli, indexed, mode):
    recipe, _ = indexed
    res = cli.json("ask", "restocking fee for returning an opened sensor", "--mode", mode, "--recipe", recipe)
    assert res["mode"] == mode
    assert res["passages"][0]["source"] == "policies/returns-and-rma-policy.md"


def test_eval_on_example_queries(cli, indexed):
    recipe, _ = indexed
    report = cli.json("eval", "--queries", ROOT / "examples" / "queries.jsonl", "--modes", "bm25,dense,rrf,hybrid",
                      "--recipe", recipe)
    assert report["queries"] == 40 and report["unknown_relevant_count"] == 0
    for res in report["modes"].values():
        m = res["metrics"]
        assert 0 <= m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= m["recall@100"] <= 1
        assert m["mrr@1"] <= m["mrr@10"]
        assert set(res["latency_ms"]) >= {"encode", "search", "rerank", "total"}
    assert report["modes"]["hybrid"]["metrics"]["recall@10"] >= 0.9


def test_doctor_reports_stages(cli, indexed):
    recipe, report = indexed
    rep = cli.json("doctor", "--recipe", recipe)
    assert rep["stages"]["encoder"]["backend"] == "onnxruntime" and rep["stages"]["encoder"]["ok"]
    assert rep["stages"]["encoder"]["why"].startswith("encoder follows the index: backend onnxruntime")
    assert rep["stages"]["index"]["ok"] and rep["stages"]["index"]["chunks"] == report["counts"]["chunks_total"]
    assert rep["stages"]["vector_index"]["backend"] in ("faiss-cpu", "faiss-gpu")
    assert rep["libraries"]["numpy"] and rep["problems"] == []


@pytest.fixture
def indexed_copy(indexed, tmp_path):
    """A private copy of the indexed workspace (recipe, live generation folder), for tests that damage it."""
    recipe, _ = indexed
    data = yaml.safe_load(recipe.read_text())
    shutil.copytree(data["workspace"], tmp_path / "ws")
    data["workspace"] = str(tmp_path / "ws")
    copy = tmp_path / "ex.yaml"
    copy.write_text(yaml.safe_dump(data))
    return copy, tmp_path / "ws" / data["name"] / "index" / _current(copy).strip()


def _doctor_fails_as_ask_does(cli, *args) -> list[str]:
    """doctor's problems, after checking it exits 1 and `ask` fails with the line doctor gave."""
    res = cli("doctor", *args, "--json", ok=False)
    assert res.exit_code == 1
    problems = json.loads(res.stdout)["problems"]
    asked = cli("ask", "restocking fee for an opened sensor", *args, ok=False)
    assert asked.exit_code == 1
    said = " ".join(asked.output.split())
    assert any(" ".join(p.split(": ", 1)[1].split()) in said for p in problems), (problems, said)
    return problems


@pytest.mark.parametrize("damaged", ["chunks.sqlite", "vectors.npy", "ids.npy", "bm25/docs.npy"])
def test_doctor_fails_on_a_truncated_index_file(cli, indexed_copy, damaged):
    recipe, gen = indexed_copy
    path = gen.parent / "segments" / (gen / "SEGMENTS").read_text().split()[0] / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    problems = _doctor_fails_as_ask_does(cli, "--recipe", recipe)
    assert len(problems) == 1 and problems[0].startswith("index: ") and "trtrag index <corpus> --rebuild" in problems[0]


def test_doctor_fails_when_the_index_was_built_by_another_encoder(cli, indexed_copy):
    """The index holds onnxruntime-fp32 vectors; a recipe resolving to the torch encoder cannot search it."""
    recipe, _ = indexed_copy
    problems = _doctor_fails_as_ask_does(cli, "--recipe", recipe, "--set", "encoder.backend=torch")
    assert problems == [problems[0]] and problems[0].startswith("encoder: ")
    assert "built with the onnxruntime fp32 encoder, but the recipe asks for encoder.backend torch" in problems[0]


def test_doctor_fails_without_an_index(cli, make_recipe):
    res = cli("doctor", "--recipe", make_recipe(), ok=False)
    assert "error: index: no index in workspace" in res.output and "trtrag index" in res.output


def test_later_commands_follow_the_encoder_the_index_records(cli, indexed):
    """The index's manifest records its encoder's backend and precision. A recipe that leaves them open
    (backend auto, no precision) queries with them; one that names another gets one line saying how to
    query this index or rebuild it. (tests/test_engine.py follows an INT8 index the same way.)"""
    from trtrag_cli.recipe.schema import load_recipe
    from trtrag_cli.util.workspace import Workspace

    recipe, _ = indexed
    gen = Workspace(load_recipe(recipe).workspace_dir()).current_index()
    built = json.loads((gen / "manifest.json").read_text())["encoder"]
    assert (built["backend"], built["precision"]) == ("onnxruntime", "fp32")
    doctor = cli.json("doctor", "--recipe", recipe)["stages"]["encoder"]
    assert "encoder follows the index: backend onnxruntime, precision fp32" in doctor["why"] and doctor["ok"]
    err = _one_line_error(cli("ask", "TH-50 warranty?", "--recipe", recipe, "--set", "encoder.precision=int8",
                              ok=False))
    assert "was built with the onnxruntime fp32 encoder, but the recipe asks for encoder.precision int8" in err
    assert "remove encoder.precision from the recipe" in err
    assert f"trtrag index <corpus> --recipe {recipe} --set encoder.precision=int8" in err
    err = _one_line_error(cli("eval", "--queries", ROOT / "examples" / "queries.jsonl", "--recipe", recipe,
                              "--set", "encoder.backend=torch", ok=False))
    assert "asks for encoder.backend torch" in err
    doctor = cli.json("doctor", "--recipe", recipe, "--set", "encoder.precision=int8", ok=False)["stages"]["encoder"]
    assert not doctor["ok"] and "asks for encoder.precision int8" in doctor["problem"]


def _current(recipe: Path) -> str:
    ws = Path(yaml.safe_load(recipe.read_text())["workspace"]) / yaml.safe_load(recipe.read_text())["name"]
    return (ws / "index" / "CURRENT").read_text()


def test_incremental_reindex(cli, make_recipe, corpus_copy):
    recipe = make_recipe()
    first = cli.json("index", corpus_copy, "--recipe", recipe)["counts"]
    again = cli.json("index", corpus_copy, "--recipe", recipe)["counts"]
    assert again["chunks_embedded"] == 0 and again["files_unchanged"] == first["files_added"]

    (corpus_copy / "news.md").write_text("# Lunar office\nCorvane opened a research office on the Moon in 2031, "
                                         "led by Dr. Ilse Vantongeren.\n")
    changed = corpus_copy / "products" / "th50-environment-sensor.md"
    changed.write_text(changed.read_text() + "\n\nThe TH-50 ships in a teal recyclable box since May 2025.\n")
    (corpus_copy / "internal" / "memo-2025-04-hq-relocation.txt").unlink()
    c = cli.json("index", corpus_copy, "--recipe", recipe)["counts"]
    assert (c["files_added"], c["files_changed"], c["files_removed"]) == (1, 1, 1)
    assert c["files_unchanged"] == first["files_added"] - 2
    # only the new file's chunk and the changed file's last chunk(s) are embedded again
    assert 1 <= c["chunks_embedded"] <= 4

    res = cli.json("ask", "Who leads the research office on the Moon?", "--recipe", recipe)
    assert res["passages"][0]["source"] == "news.md" and "Vantongeren" in res["answer"]
    res = cli.json("ask", "What colour is the TH-50 box?", "--recipe", recipe)
    assert res["passages"][0]["source"] == "products/th50-environment-sensor.md"
    res = cli.json("ask", "When does the headquarters move to Fife?", "--top-k", "50", "--recipe", recipe)
    assert "internal/memo-2025-04-hq-relocation.txt" not in {p["source"] for p in res["passages"]}


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_incremental_with_other_index_kinds(cli, make_recipe, corpus_copy, kind):
    recipe = make_recipe(index={"kind": kind, "nlist": 4, "nprobe": 4})
    cli.json("index", corpus_copy, "--recipe", recipe)
    (corpus_copy / "web" / "careers.html").unlink()
    c = cli.json("index", corpus_copy, "--recipe", recipe)["counts"]
    assert c["files_removed"] == 1 and c["chunks_embedded"] == 0
    res = cli.json("ask", "job openings and benefits at Corvane", "--top-k", "40", "--recipe", recipe)
    assert "web/careers.html" not in {p["source"] for p in res["passages"]}


def _one_line_error(result) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in result.output and err.startswith("error:") and "\n" not in err, result.output
    return err


def test_bad_corpus_input_keeps_index(cli, make_recipe, corpus_copy, tmp_path):
    recipe = make_recipe()
    cli.json("index", corpus_copy, "--recipe", recipe)
    before = _current(recipe)
    missing = cli("index", tmp_path / "nope", "--recipe", recipe, ok=False)
    assert missing.exit_code == 1 and "does not exist" in _one_line_error(missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    res = cli("index", empty, "--recipe", recipe, ok=False)
    assert res.exit_code == 1 and "empty" in _one_line_error(res)
    assert _current(recipe) == before


def test_awkward_files_are_skipped_and_counted(cli, make_recipe, tmp_path):
    root = tmp_path / "c"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "a.txt").write_text("Sensors report vibration every ten seconds.")
    (root / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    with open(root / "huge.txt", "wb") as fh:
        fh.truncate(50 * 1024 * 1024)
    (root / "ok" / "loop").symlink_to(root, target_is_directory=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret outside the corpus")
    (root / "escape.txt").symlink_to(outside)
    rep = cli.json("index", root, "--recipe", make_recipe())
    assert rep["counts"]["files_added"] == 1
    for reason in ("binary", "not-utf8", "too-large", "outside-root"):
        assert rep["skipped"].get(reason, 0) >= 1, (reason, rep["skipped"])
    assert rep["warnings"]


def test_recipe_errors_through_cli(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrieve:\n  top_k: [1\n")
    res = cli("ask", "q", "--recipe", bad, ok=False)
    assert res.exit_code == 1 and "malformed YAML" in _one_line_error(res)
    bad.write_text("retrieve:\n  topk: 3\n")
    res = cli("ask", "q", "--recipe", bad, ok=False)
    assert "did you mean 'top_k'" in _one_line_error(res) and f"{bad}:2" in res.stderr
    res = cli("index", EXAMPLES, "--recipe", bad, "--json", ok=False)
    assert json.loads(res.stdout)["error"].startswith(str(bad))


def test_question_errors(cli, indexed, make_recipe):
    recipe, _ = indexed
    res = cli("ask", "   ", "--recipe", recipe, ok=False)
    assert res.exit_code == 1 and "question is empty" in _one_line_error(res)
    long_q = "What is the warranty on the VX-200 sensor? " * 80
    out = cli.json("ask", long_q, "--recipe", recipe)
    assert out["warnings"] and "tokens" in out["warnings"][0] and out["passages"]
    res = cli("ask", "anything", "--recipe", make_recipe("never-indexed"), ok=False)
    assert "no index" in _one_line_error(res)


def test_failed_index_run_leaves_previous_generation(cli, make_recipe, corpus_copy, monkeypatch):
    recipe = make_recipe()
    cli.json("index", corpus_copy, "--recipe", recipe)
    before = _current(recipe)
    (corpus_copy / "new.txt").write_text("A brand new document about gateways.")

    import trtrag_cli.index.bm25 as lexical

    def boom(term_lists):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lexical.Postings, "build", boom)
    with pytest.raises(RuntimeError):
        cli("index", corpus_copy, "--recipe", recipe, ok=None)
    assert _current(recipe) == before
    index_dir = Path(yaml.safe_load(recipe.read_text())["workspace"]) / "t" / "index"
    assert not [p for p in index_dir.iterdir() if p.name.startswith(".tmp")]
    assert not [p for p in (index_dir / "segments").iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    assert cli.json("ask", "gateways", "--recipe", recipe)["passages"]


def test_workspace_lock_blocks_a_second_writer(cli, make_recipe, corpus_copy):
    from trtrag_cli.recipe.schema import load_recipe
    from trtrag_cli.util.workspace import Workspace

    recipe = make_recipe()
    with Workspace(load_recipe(recipe).workspace_dir()).lock():
        res = cli("index", corpus_copy, "--recipe", recipe, ok=False)
    assert f"locked by another trtrag run (pid {os.getpid()}, since " in _one_line_error(res)


def test_a_precision_the_backend_lacks_is_refused(cli, make_recipe, corpus_copy):
    res = cli("index", corpus_copy, "--recipe", make_recipe(), "--set", "encoder.precision=fp16",
              "--set", "encoder.backend=onnxruntime", ok=False)
    assert "no fp16 engine" in _one_line_error(res)


def test_titles_are_indexed_with_their_text(cli, make_recipe, tmp_path):
    root = tmp_path / "titled"
    root.mkdir()
    (root / "docs.jsonl").write_text(
        json.dumps({"id": "ferry", "title": "Zanzibar ferry timetable", "text": "Boats leave at nine and at noon."})
        + "\n" + json.dumps({"id": "bus", "title": "Airport shuttle", "text": "Buses leave every twenty minutes."})
        + "\n")
    recipe = make_recipe()
    cli.json("index", root, "--recipe", recipe)
    for mode in ("bm25", "dense"):
        res = cli.json("ask", "Zanzibar timetable", "--mode", mode, "--recipe", recipe)
        assert res["passages"][0]["source"] == "ferry"
        assert res["passages"][0]["text"] == "Boats leave at nine and at noon."


def test_doctor_advice_follows_the_designs_sizing_rules(tmp_path):
    import json as _json
    from types import SimpleNamespace

    from trtrag_cli.doctor import generator_params, hardware_advice, vector_index_stage
    from trtrag_cli.recipe.schema import load_recipe

    recipe = load_recipe(None, [])
    small = [{"name": "T4", "memory_mib": 1024, "driver": "x", "compute_capability": "7.5"}]
    big = [{"name": "H200", "memory_mib": 143771, "driver": "x", "compute_capability": "9.0"}]
    warned = hardware_advice(recipe, small, index_vectors=1_000_000)  # 1M x 384 fp16 = 0.7 GiB, twice is > 1 GiB
    assert len(warned) == 1 and "twice" in warned[0]
    assert hardware_advice(recipe, big, index_vectors=1_000_000) == []
    assert hardware_advice(recipe, [], index_vectors=10**9) == []  # no GPU: nothing to size
    # A 70B-shaped generator config: about 69B parameters, past the 32B line.
    model = tmp_path / "llama70b"
    model.mkdir()
    (model / "config.json").write_text(_json.dumps({"hidden_size": 8192, "num_hidden_layers": 80,
                                                    "num_attention_heads": 64, "num_key_value_heads": 8,
                                                    "intermediate_size": 28672, "vocab_size": 128256}))
    fake = SimpleNamespace(answer=SimpleNamespace(generator=SimpleNamespace(model=str(model))), encoder=recipe.encoder,
                           index=recipe.index)
    assert 65e9 < generator_params(fake) < 72e9
    assert any("tensor parallelism" in w for w in hardware_advice(fake, big))
    hnsw = load_recipe(None, ["index.kind=hnsw", "index.device=auto"])
    assert vector_index_stage(hnsw, big)["backend"] == "faiss-cpu"


def test_doctor_names_the_decode_path_a_gpu_would_take():
    from trtrag_cli.doctor import generator_stage
    from trtrag_cli.recipe.schema import load_recipe
    from trtrag_cli.util.deps import available

    h200 = [{"name": "H200", "memory_mib": 143771, "driver": "x", "compute_capability": "9.0"}]
    lm = ["answer.generator.backend=transformers", "answer.generator.model=m"]
    recipe = load_recipe(None, lm)
    assert "transformers' generate" in generator_stage(recipe, [])["why"]          # no GPU
    on_gpu = generator_stage(recipe, h200)["why"]
    assert ("Triton decode kernels" if available("triton") else "triton is not installed") in on_gpu
    off = load_recipe(None, lm + ["answer.generator.kernels=false"])
    assert "answer.generator.kernels is false" in generator_stage(off, h200)["why"]
    plain = load_recipe(None, lm + ["answer.generator.decode=transformers"])
    assert "static cache" in generator_stage(plain, h200)["why"]
    assert generator_stage(load_recipe(None, []), h200)["why"] == "answer.generator.backend in the recipe"   # extractive


def test_gpu_watch_summarises_the_busiest_card_from_nvidia_smi(tmp_path, monkeypatch):
    """doctor.GpuWatch reads `nvidia-smi -lms` while a block runs. No GPU here, so a stand-in nvidia-smi on
    PATH prints what the real one does for a two-GPU host whose second card sits at its power limit with
    its clock pulled down (as H200 cards did in the decode benchmarks), plus an [N/A] field to skip."""
    from trtrag_cli.util.gpu import GpuWatch

    stand_in = tmp_path / "nvidia-smi"
    stand_in.write_text(
        "#!/bin/sh\n"
        "case \"$*\" in *index,clocks.sm,power.draw,power.limit*--loop-ms=50*) ;; *) exit 2 ;; esac\n"
        "for clock in 1980 1515 1695; do\n"
        "  echo \"0, 1980, 118.5, 700.00\"\n"
        "  echo \"1, $clock, 699.80, 700.00\"\n"
        "  echo \"1, [N/A], [N/A], 700.00\"\n"
        "  sleep 0.05\n"
        "done\n"
        "exec sleep 30\n")
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with GpuWatch(every_ms=50) as watch:
        import time

        time.sleep(0.5)
    got = watch.summary()
    assert got["gpu"] == 1 and got["samples"] == 3
    assert got["sm_clock_mhz"] == {"min": 1515.0, "median": 1695.0, "max": 1980.0}
    assert got["power_w"] == {"median": 699.8, "max": 699.8} and got["power_limit_w"] == 700.0
    assert got["at_power_limit"] is True

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no nvidia-smi: nothing, and no error
    with GpuWatch() as watch:
        pass
    assert watch.summary() == {}


def test_eval_table_on_stdout_progress_on_stderr(cli, indexed):
    recipe, _ = indexed
    res = cli("eval", "--queries", ROOT / "examples" / "queries.jsonl", "--modes", "bm25,dense", "--recipe", recipe)
    assert "R@10" in res.stdout and "MRR@10" in res.stdout and "bm25" in res.stdout
    assert "R@10" not in res.stderr and "eval: 40/40 queries (100%)" in res.stderr
