"""calibrate -> build-engine -> index -> ask on the CPU, and every way the chain refuses bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trtrag_cli.util import deps

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "calibration" / "corvane.txt"
EXAMPLES = ROOT / "examples" / "corpus"  # `index --set encoder.precision=int8` opens the engine before all else
QUESTION = "Can I get an advance replacement for a faulty TH-50 sensor?"


def _one_line_error(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), res.output
    return " ".join(lines[lines.index(next(ln for ln in lines if ln.startswith("error:"))):])


def _recipe(folder: Path, workspace: Path, **sections) -> Path:
    from conftest import write_recipe

    calibrate = {"queries": str(CALIBRATION), "eval": str(ROOT / "examples" / "queries.jsonl"), "min_iterations": 1,
                 **sections.pop("calibrate", {})}
    return write_recipe(folder / "recipe.yaml", "t", workspace, calibrate=calibrate, **sections)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A workspace with an FP32 index, a calibration and an ONNX Runtime INT8 engine (built once)."""
    from conftest import Cli

    root = tmp_path_factory.mktemp("chain")
    corpus = root / "corpus"
    shutil.copytree(ROOT / "examples" / "corpus", corpus)
    recipe = _recipe(root, root / "ws")
    cli = Cli()
    cli.json("index", corpus, "--recipe", recipe)
    calibration = cli.json("calibrate", "--recipe", recipe)
    engine = cli.json("build-engine", "--int8", "--backend", "onnxruntime", "--recipe", recipe)
    return {"root": root, "corpus": corpus, "recipe": recipe, "calibration": calibration, "engine": engine}


@pytest.fixture
def chain(built, tmp_path):
    """A private copy of the built workspace, for tests that damage it."""
    shutil.copytree(built["root"] / "ws", tmp_path / "ws")
    return {**built, "recipe": _recipe(tmp_path, tmp_path / "ws"), "ws": tmp_path / "ws" / "t"}


def test_calibration_report_and_artifacts(built):
    rep = built["calibration"]
    folder = Path(rep["path"])
    assert rep["queries"]["batch_size"] == 1024 and rep["iterations"] == 1
    assert rep["history"][0]["queries"] >= 1024 and rep["peak_rss_mib"] > 0
    # 6 layers x (QKV, attn out, FFN in, FFN out) inputs, and the smoothed copies of the 18 unshared ones
    assert rep["sites"] == 36 and len(rep["ranges"]) == 24 + 18 and rep["smoothing"]["sites"] == 18
    assert all(0 < v <= rep["tensor_max"][k] + 1e-6 for k, v in rep["ranges"].items())
    gate = rep["gate"]
    assert gate["passed"] and gate["final"]["mean_cosine"] >= 0.99
    assert gate["final"]["recall@10_drop"] <= 0.005 and "top10_overlap" in gate["final"]
    for name in ("model.qdq.onnx", "calibration.json", "holdout.txt", "smoothing.json"):
        assert (folder / name).is_file()
    # TensorRT's legacy cache only for a real TensorRT version: here, the installed one or none at all.
    trt = rep["trt_cache"]
    if trt["file"]:
        cache = (folder / trt["file"]).read_text().splitlines()
        assert trt["source"] == "installed" and cache[0].endswith("-EntropyCalibration2") and len(cache) == 25
    else:
        assert "TensorRT is not installed here" in trt["skipped"] and not (folder / "calibration.cache").exists()
    assert not rep["stable"] and any("only one batch ran" in w for w in rep["warnings"])


def test_qdq_model_runs_in_onnxruntime_with_int8_weights(built):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from trtrag_cli.encode.models import model_info
    from trtrag_cli.encode.onnxruntime import OrtEncoder

    path = Path(built["calibration"]["path"]) / "model.qdq.onnx"
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    quantized = 36 - len(built["calibration"]["gate"]["kept_float"])
    assert 1 <= ops.count("QuantizeLinear") <= 24
    assert ops.count("DequantizeLinear") == ops.count("QuantizeLinear") + quantized  # + one per int8 weight
    zero_points = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric
    with OrtEncoder(path, model_info("all-MiniLM-L6-v2")) as enc:
        vec = enc.encode([QUESTION])
    assert vec.shape == (1, 384) and abs(float((vec ** 2).sum()) - 1.0) < 1e-3


def test_engine_is_chosen_by_measurement_and_passes_the_gate(built):
    eng = built["engine"]
    assert eng["backend"] == "onnxruntime" and eng["precision"] == "int8" and eng["gate_passed"]
    assert set(eng["candidates"]) == {"static", "qdq"} and eng["form"] in eng["candidates"]
    speeds = {k: v["speed"]["batch1_ms"] * v["speed"]["batch64_ms_per_text"] for k, v in eng["candidates"].items()
              if v["passed"]}
    assert eng["form"] == min(speeds, key=speeds.get)
    assert Path(eng["path"], "model.onnx").is_file()


def test_int8_index_then_ask(chain, cli):
    rep = cli.json("index", chain["corpus"], "--recipe", chain["recipe"], "--set", "encoder.precision=int8")
    assert rep["encoder"].startswith("onnxruntime-int8-")
    res = cli.json("ask", QUESTION, "--recipe", chain["recipe"], "--set", "encoder.precision=int8")
    assert res["passages"][0]["source"] == "policies/warranty-th-pg-series.md"
    # A plain ask (the recipe leaves encoder.precision out) follows the index's INT8 encoder, and so do
    # eval and doctor.
    plain = cli.json("ask", QUESTION, "--recipe", chain["recipe"])
    assert plain["passages"] == res["passages"]
    rep = cli.json("eval", "--queries", ROOT / "examples" / "queries.jsonl", "--recipe", chain["recipe"])
    assert rep["encoder"].startswith("onnxruntime-int8-")
    enc = cli.json("doctor", "--recipe", chain["recipe"])["stages"]["encoder"]
    assert enc["precision"] == "int8" and enc["ok"] and "follows the index: backend onnxruntime, precision int8" \
        in enc["why"]
    # Asking for FP32 explicitly is a real mismatch: one line, and the re-index it suggests works.
    err = _one_line_error(cli("ask", QUESTION, "--recipe", chain["recipe"], "--set", "encoder.precision=fp32",
                              ok=False))
    assert "built with the onnxruntime int8 encoder, but the recipe asks for encoder.precision fp32" in err
    command = err.split("re-index: ")[1].split()
    assert command[:2] == ["trtrag", "index"] and command[3:] == ["--recipe", str(chain["recipe"]), "--set",
                                                                  "encoder.precision=fp32"]
    cli.json("index", chain["corpus"], *command[3:])
    assert cli.json("ask", QUESTION, "--recipe", chain["recipe"], "--set", "encoder.precision=fp32")["passages"]


def test_int8_without_an_engine_says_how_to_build_one(cli, make_recipe, corpus_copy):
    err = _one_line_error(cli("index", corpus_copy, "--recipe", make_recipe(), "--set", "encoder.precision=int8",
                              ok=False))
    assert "no onnxruntime int8 engine" in err and "trtrag calibrate && trtrag build-engine --int8" in err


def test_engine_from_another_onnxruntime_version_is_refused(chain, cli):
    manifest = chain["ws"] / "engines" / "onnxruntime-int8" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["versions"]["onnxruntime"] = "1.0.0"
    manifest.write_text(json.dumps(data))
    err = _one_line_error(cli("index", EXAMPLES, "--recipe", chain["recipe"], "--set", "encoder.precision=int8",
                              ok=False))
    assert "1.0.0" in err and "trtrag build-engine --int8 --backend onnxruntime" in err


def test_engine_for_another_model_or_calibration_is_refused(chain, cli):
    folder = chain["ws"] / "engines" / "onnxruntime-int8"
    data = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**data, "calibration": "0123456789ab"}))
    err = _one_line_error(cli("index", EXAMPLES, "--recipe", chain["recipe"], "--set", "encoder.precision=int8",
                              ok=False))
    assert "calibration 0123456789ab" in err and "build-engine --int8" in err
    (folder / "manifest.json").write_text(json.dumps({**data, "model": "another-model"}))
    err = _one_line_error(cli("index", EXAMPLES, "--recipe", chain["recipe"], "--set", "encoder.precision=int8",
                              ok=False))
    assert "another-model" in err and "build-engine --int8" in err


def test_corrupt_onnx_is_a_clear_error_and_the_old_engine_survives(chain, cli):
    (chain["ws"] / "calibration" / "model.qdq.onnx").write_bytes(b"\x00garbage")
    before = (chain["ws"] / "engines" / "onnxruntime-int8" / "model.onnx").read_bytes()
    err = _one_line_error(cli("build-engine", "--int8", "--backend", "onnxruntime", "--recipe", chain["recipe"],
                              ok=False))
    assert "model.qdq.onnx is damaged" in err and "trtrag calibrate" in err
    assert (chain["ws"] / "engines" / "onnxruntime-int8" / "model.onnx").read_bytes() == before


def test_too_few_queries_and_small_batches_are_refused(cli, make_recipe, tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("".join(f"query number {i}\n" for i in range(300)))
    err = _one_line_error(cli("calibrate", "--queries", few, "--recipe", make_recipe(), ok=False))
    assert "300 distinct calibration queries, but one batch needs 1024" in err and "add at least 724" in err
    err = _one_line_error(cli("calibrate", "--batch-size", "256", "--recipe", make_recipe(), ok=False))
    assert "at least 1024" in err


def test_impossible_engine_shapes_are_refused(cli, make_recipe):
    err = _one_line_error(cli("build-engine", "--fp32", "--backend", "onnxruntime", "--recipe",
                              make_recipe(engine={"min_batch": 64, "opt_batch": 8}), ok=False))
    assert "min <= opt <= max" in err
    err = _one_line_error(cli("build-engine", "--fp32", "--backend", "onnxruntime", "--recipe",
                              make_recipe(engine={"opt_tokens": 512}), ok=False))
    assert "engine.opt_tokens (512) exceeds encoder.max_tokens (256)" in err


def test_gpu_backends_on_a_cpu_machine_say_what_is_missing(cli, make_recipe):
    from trtrag_cli.util.gpu import gpu_present

    if gpu_present():
        pytest.skip("this machine has a GPU")
    err = _one_line_error(cli("build-engine", "--fp16", "--backend", "torch", "--recipe", make_recipe(), ok=False))
    assert "needs a CUDA GPU" in err
    err = _one_line_error(cli("build-engine", "--int8", "--backend", "tensorrt", "--recipe", make_recipe(),
                              ok=False))
    if deps.available("tensorrt") or deps.available("tensorrt_rtx_bindings"):
        assert "trtrag calibrate" in err  # TensorRT-RTX builds without a GPU; INT8 needs the calibration first
    else:
        assert "no TensorRT is installed" in err and "trtrag[rtx]" in err


def test_fp32_engine_is_an_optimised_ort_model(cli, make_recipe):
    rep = cli.json("build-engine", "--fp32", "--backend", "onnxruntime", "--recipe", make_recipe())
    assert rep["form"] == "fp32-fused" and Path(rep["path"], "model.onnx").stat().st_size > 1_000_000


needs_trt = pytest.mark.skipif(not deps.available("tensorrt"),
                               reason="TensorRT is not installed (it cannot be installed in this workplace)")


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_int8_plan_matches_fp32(chain, cli):
    from trtrag_cli.util.gpu import gpu_present

    if not gpu_present():
        pytest.skip("TensorRT needs a CUDA GPU")
    rep = cli.json("build-engine", "--int8", "--backend", "tensorrt", "--recipe", chain["recipe"])
    assert rep["backend"] == "tensorrt" and rep["strongly_typed"] and Path(rep["path"], "model.plan").is_file()
    import numpy as np

    from trtrag_cli.encode.artifacts import open_recipe_encoder
    from trtrag_cli.recipe.schema import load_recipe

    texts = (ROOT / "calibration" / "corvane.txt").read_text().splitlines()[:64]
    fp32 = load_recipe(chain["recipe"], ["encoder.backend=onnxruntime"])
    trt = load_recipe(chain["recipe"], ["encoder.backend=tensorrt", "encoder.precision=int8"])
    with open_recipe_encoder(fp32, None) as a, open_recipe_encoder(trt, None) as b:
        cos = (a.encode(texts) * b.encode(texts)).sum(1)
    assert float(np.mean(cos)) >= 0.99
    # A plan keyed on another TensorRT version is refused with the rebuild command.
    manifest = Path(rep["path"], "manifest.json")
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "key": {**data["key"], "runtime_version": "0.0.0"}}))
    err = _one_line_error(cli("ask", QUESTION, "--recipe", chain["recipe"], "--set", "encoder.backend=tensorrt",
                              "--set", "encoder.precision=int8", ok=False))
    assert "build-engine --int8 --backend tensorrt" in err


def test_doctor_reports_whether_the_int8_engine_is_usable(built, cli, make_recipe):
    res = cli("doctor", "--recipe", make_recipe(), "--set", "encoder.precision=int8", "--json", ok=False)
    rep = json.loads(res.stdout)
    enc = rep["stages"]["encoder"]
    assert not enc["ok"] and "trtrag build-engine --int8" in enc["engine"]["status"]
    assert any(p.startswith("encoder: no onnxruntime int8 engine") for p in rep["problems"])
    rep = cli.json("doctor", "--recipe", built["recipe"], "--set", "encoder.precision=int8", ok=False)
    enc = rep["stages"]["encoder"]
    assert enc["engine"]["ok"] and enc["engine"]["gate"]["mean_cosine"] >= 0.99
    # The engine is usable, but this workspace's index is FP32: asking for INT8 explicitly is a mismatch.
    assert not enc["ok"] and "asks for encoder.precision int8" in enc["problem"]


def test_recall_gate_skips_eval_queries_of_another_corpus(chain, tmp_path):
    from trtrag_cli.calibrate import gate
    from trtrag_cli.encode.artifacts import load_calibration
    from trtrag_cli.encode.models import model_info
    from trtrag_cli.recipe.schema import load_recipe

    recipe = load_recipe(chain["recipe"])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"query": "ferry times", "relevant": ["not/in/this/index.md"]}) + "\n"
                     + json.dumps({"query": "warranty", "relevant": ["policies/warranty-th-pg-series.md"]}) + "\n")
    fp32 = Path(load_calibration(recipe)[1]["fp32_onnx"])
    probe = gate.Probe.build(recipe, model_info(recipe.encoder.model), fp32, ["warranty terms"], other)
    assert probe.recall is not None and len(probe.recall.queries) == 1
    assert any("1 of 2 queries" in w for w in probe.warnings)
    other.write_text(json.dumps({"query": "ferry times", "relevant": ["not/in/this/index.md"]}) + "\n")
    probe = gate.Probe.build(recipe, model_info(recipe.encoder.model), fp32, ["warranty terms"], other)
    assert probe.recall is None and any("recall gate skipped" in w for w in probe.warnings)


def test_without_a_query_set_calibration_samples_the_corpus_and_warns(chain, cli):
    rep = cli.json("calibrate", "--recipe", chain["recipe"], "--set", "calibrate.queries=no/such/folder",
                   "--set", "calibrate.eval=")
    assert rep["queries"]["source"] == "<indexed corpus>" and rep["queries"]["count"] >= 1024
    assert any("sampled" in w and "real user queries" in w for w in rep["warnings"])
    assert "recall@10" not in rep["gate"]["final"]
    err = _one_line_error(cli("calibrate", "--queries", "no/such/file.txt", "--recipe", chain["recipe"], ok=False))
    assert "calibration queries not found: no/such/file.txt" in err
