"""TensorRT-RTX builds real encoder plans ahead of time on the CPU; loading refuses a plan of another key.

Building needs no GPU (TensorRT-RTX compiles for named compute capabilities); running a plan does, so that
test is marked `gpu` and skips here. Everything skips when TensorRT-RTX is not installed (`make test`
installs it through the `rtx` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtrag_cli.util import deps

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "corpus"

pytestmark = pytest.mark.skipif(not deps.available("tensorrt_rtx_bindings"),
                                reason="TensorRT-RTX is not installed: pip install 'trtrag[rtx]'")


def _error(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


def _rtx_is_the_runtime():
    from trtrag_cli.encode import trt_runtime

    runtime = trt_runtime.installed()
    if runtime is None or runtime.name != "tensorrt-rtx":
        pytest.skip("full TensorRT is installed too and is preferred; these tests are about TensorRT-RTX")
    return runtime


@pytest.fixture(scope="module")
def fp32_plan(tmp_path_factory):
    """An FP32 plan of the default encoder for 8.6 and 8.9, built once."""
    from conftest import Cli, write_recipe

    _rtx_is_the_runtime()
    root = tmp_path_factory.mktemp("rtx")
    recipe = write_recipe(root / "recipe.yaml", "t", root / "ws", engine={"trt_targets": ["8.6", "8.9"]})
    rep = Cli().json("build-engine", "--fp32", "--backend", "tensorrt", "--recipe", recipe)
    return {"recipe": recipe, "report": rep, "ws": root / "ws" / "t"}


def test_doctor_names_the_runtime_and_its_targets(cli, make_recipe):
    runtime = _rtx_is_the_runtime()
    rep = cli.json("doctor", "--recipe", make_recipe(), ok=None)["tensorrt"]
    assert rep["runtime"] == "tensorrt-rtx" and rep["version"] == runtime.version
    assert {"7.5", "8.6", "8.9", "12.0"} <= set(rep["ahead_of_time_targets"]) and "9.0" not in rep["ahead_of_time_targets"]


def test_aot_build_of_the_default_encoder(fp32_plan):
    rep = fp32_plan["report"]
    plan = Path(rep["path"], "model.plan")
    assert rep["backend"] == "tensorrt" and rep["runtime"]["name"] == "tensorrt-rtx" and rep["strongly_typed"]
    assert rep["targets"] == ["8.6", "8.9"] and plan.stat().st_size == rep["plan_bytes"] > 10_000_000
    assert not [p for p in plan.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind
    # The plan cannot be opened without a GPU, so the inspector's layer list is absent and says why.
    from trtrag_cli.util.gpu import gpus

    if not gpus():
        assert rep["inspector"]["available"] is False and "no GPU is visible" in rep["inspector"]["why"]
    assert rep["timing_cache"]["used"] is False and "no-ops" in rep["timing_cache"]["why"]


def test_plan_key_holds_runtime_targets_and_recipe_fields(fp32_plan):
    from trtrag_cli.encode import trt_runtime
    from trtrag_cli.encode.tensorrt import plan_key
    from trtrag_cli.recipe.schema import load_recipe

    key = fp32_plan["report"]["key"]
    runtime = trt_runtime.installed()
    assert key["runtime"] == "tensorrt-rtx" and key["runtime_version"] == runtime.version
    assert key["targets"] == ["8.6", "8.9"] and key["calibration"] is None
    recipe = load_recipe(fp32_plan["recipe"])
    assert plan_key(recipe, "fp32", runtime, ["8.6", "8.9"], None) == key
    other = load_recipe(fp32_plan["recipe"], ["engine.opt_tokens=128"])
    assert plan_key(other, "fp32", runtime, ["8.6", "8.9"], None)["recipe"]["opt_tokens"] == 128


def test_a_stale_plan_is_refused_with_the_rebuild_command(fp32_plan, cli, tmp_path):
    import shutil

    from conftest import write_recipe

    ws = tmp_path / "ws"
    shutil.copytree(fp32_plan["ws"].parent, ws)
    recipe = write_recipe(tmp_path / "r.yaml", "t", ws, engine={"trt_targets": ["8.6", "8.9"]},
                          encoder={"backend": "tensorrt", "precision": "fp32"})
    manifest = ws / "t" / "engines" / "tensorrt-fp32" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "key": {**data["key"], "runtime_version": "1.0.0"}}))
    err = _error(cli("index", EXAMPLES, "--recipe", recipe, ok=False))
    assert "runtime_version 1.0.0" in err and "trtrag build-engine --fp32 --backend tensorrt" in err
    manifest.write_text(json.dumps(data))
    err = _error(cli("index", EXAMPLES, "--recipe", recipe, "--set", "engine.max_batch=128", ok=False))
    assert "engine.max_batch 256, the recipe has 128" in err and "build-engine --fp32 --backend tensorrt" in err
    err = _error(cli("index", EXAMPLES, "--recipe", recipe, "--set", "engine.trt_targets=[12.0]", ok=False))
    assert "targets ['8.6', '8.9']" in err and "build-engine --fp32 --backend tensorrt" in err


def test_an_unsupported_target_names_the_supported_ones(cli, make_recipe):
    _rtx_is_the_runtime()
    err = _error(cli("build-engine", "--fp32", "--backend", "tensorrt", "--recipe",
                     make_recipe(engine={"trt_targets": ["9.0"]}), ok=False))
    assert "cannot build for compute capability 9.0" in err and "8.9" in err and "12.0" in err
    err = _error(cli("build-engine", "--fp32", "--backend", "tensorrt", "--recipe",
                     make_recipe(engine={"trt_targets": ["sm89"]}), ok=False))
    assert "not a compute capability like 8.9" in err


def test_int8_plan_from_the_calibrated_qdq_model(cli, tmp_path):
    """TensorRT-RTX takes the explicit Q/DQ model `trtrag calibrate` writes (checked only up to the build:
    whether its kernels run INT8 is for the inspector on a GPU to say)."""
    from conftest import write_recipe

    _rtx_is_the_runtime()
    calibrate = {"queries": str(ROOT / "calibration" / "corvane.txt"), "eval": None, "min_iterations": 1,
                 "tune": False}
    recipe = write_recipe(tmp_path / "r.yaml", "t", tmp_path / "ws", calibrate=calibrate)
    calibration = cli.json("calibrate", "--recipe", recipe)
    rep = cli.json("build-engine", "--int8", "--backend", "tensorrt", "--recipe", recipe)
    assert rep["key"]["calibration"] == calibration["id"] and rep["source"].endswith("model.qdq.onnx")
    assert rep["targets"] == ["8.9"] and Path(rep["path"], "model.plan").stat().st_size == rep["plan_bytes"]
    err = _error(cli("build-engine", "--fp16", "--backend", "tensorrt", "--recipe", recipe, ok=False))
    if not deps.available("modelopt"):
        assert "FP16 on tensorrt-rtx" in err and "mixed-precision ONNX" in err


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_rtx_plan_runs_and_matches_onnxruntime(cli, make_recipe):
    import numpy as np

    from trtrag_cli.encode import trt_runtime
    from trtrag_cli.util.gpu import gpus

    runtime = _rtx_is_the_runtime()
    found = gpus()
    if not found or found[0]["compute_capability"] not in runtime.aot_targets():
        pytest.skip("running a TensorRT-RTX plan needs a GPU of a compute capability it supports "
                    f"({', '.join(runtime.aot_targets())})")
    recipe = make_recipe()
    rep = cli.json("build-engine", "--fp32", "--backend", "tensorrt", "--recipe", recipe)
    assert rep["inspector"]["available"] and rep["inspector"]["layers"]
    from trtrag_cli.encode.artifacts import open_recipe_encoder
    from trtrag_cli.recipe.schema import load_recipe

    texts = (ROOT / "calibration" / "corvane.txt").read_text().splitlines()[:64]
    with open_recipe_encoder(load_recipe(recipe, ["encoder.backend=onnxruntime"])) as a, \
            open_recipe_encoder(load_recipe(recipe, ["encoder.backend=tensorrt"])) as b:
        cos = (a.encode(texts) * b.encode(texts)).sum(1)
    assert float(np.mean(cos)) >= 0.999
    assert trt_runtime.installed() is not None
