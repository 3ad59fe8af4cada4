"""`encoder.backend: auto`: one rule for build-engine, index, ask, serve and doctor, over the machine's facts."""

from __future__ import annotations

import itertools
import json

import pytest

from trtrag_cli.encode import artifacts
from trtrag_cli.encode.registry import ALL_PRECISIONS, PRECISIONS, Facts, resolve_backend
from trtrag_cli.recipe.schema import load_recipe
from trtrag_cli.util.errors import TrtragError

NONE = frozenset()


@pytest.mark.parametrize("gpu,tensorrt,plans,precision,backend", [
    (False, False, NONE, "fp32", "onnxruntime"),
    (False, False, NONE, "int8", "onnxruntime"),
    (False, True, {"fp32", "int8"}, "fp32", "onnxruntime"),   # TensorRT without a GPU runs nothing
    (True, False, NONE, "fp32", "torch"),
    (True, False, NONE, "fp16", "torch"),
    (True, False, NONE, "bf16", "torch"),
    (True, False, NONE, "int8", "onnxruntime"),                # no TensorRT: the CPU int8 engine
    (True, True, NONE, "fp32", "torch"),                       # no plan built: torch serves floats
    (True, True, NONE, "fp16", "torch"),
    (True, True, {"int8"}, "fp16", "torch"),                   # a plan of another precision does not count
    (True, True, {"fp16"}, "fp16", "tensorrt"),
    (True, True, {"fp32"}, "fp32", "tensorrt"),
    (True, True, NONE, "bf16", "torch"),                       # TensorRT has no bf16
    (True, True, NONE, "int8", "tensorrt"),                    # int8 on a GPU is TensorRT's, built or not
    (True, True, {"int8"}, "int8", "tensorrt"),
])
def test_auto_rule(gpu, tensorrt, plans, precision, backend):
    choice = resolve_backend("auto", precision, Facts(gpu, tensorrt, frozenset(plans)))
    assert choice.backend == backend and choice.why.startswith("auto: ")
    assert choice.engine == (PRECISIONS[backend][precision] is None)


def test_float16_without_a_gpu_is_refused_with_the_fix():
    with pytest.raises(TrtragError, match="no encoder backend on this machine serves fp16") as err:
        resolve_backend("auto", "fp16", Facts(gpu=False, tensorrt=True))
    assert "encoder.precision: fp32" in err.value.hint


def test_build_engine_auto_builds_what_loading_then_picks():
    """Over every machine, built plans and precision: the backend auto builds for is the one auto loads once
    that engine exists (a TensorRT build adds its plan; torch and ONNX Runtime builds add none)."""
    for gpu, tensorrt, precision in itertools.product((False, True), (False, True), ALL_PRECISIONS):
        for n in range(len(PRECISIONS["tensorrt"]) + 1):
            for plans in map(frozenset, itertools.combinations(PRECISIONS["tensorrt"], n)):
                facts = Facts(gpu, tensorrt, plans)
                try:
                    built = resolve_backend("auto", precision, facts, building=True).backend
                except TrtragError:
                    with pytest.raises(TrtragError):
                        resolve_backend("auto", precision, facts)
                    continue
                after = Facts(gpu, tensorrt, plans | {precision} if built == "tensorrt" else plans)
                assert resolve_backend("auto", precision, after).backend == built, (facts, precision)


def test_a_named_backend_asks_the_machine_nothing(monkeypatch):
    def no_probe(*_):
        raise AssertionError("machine_facts called for a named backend")

    monkeypatch.setattr("trtrag_cli.encode.registry.machine_facts", no_probe)
    assert resolve_backend("tensorrt", "fp16").engine
    assert not resolve_backend("onnxruntime", "fp32").engine
    assert resolve_backend("onnxruntime", "int8").engine
    with pytest.raises(TrtragError, match="the torch encoder has no int8") as err:
        resolve_backend("torch", "int8")
    assert "fp32 or fp16 or bf16" in err.value.hint
    with pytest.raises(TrtragError, match="unknown encoder backend"):
        resolve_backend("openvino", "fp32")
    with pytest.raises(TrtragError, match="unknown precision"):
        resolve_backend("auto", "fp8")


def test_the_workspace_plans_are_facts(tmp_path, monkeypatch):
    """recipe_facts reads which TensorRT plans the recipe's workspace holds, so fp16 on a GPU with TensorRT
    goes to TensorRT once build-engine has written its plan, and to torch before."""
    monkeypatch.setattr(artifacts, "machine_facts", lambda: Facts(gpu=True, tensorrt=True))
    recipe = load_recipe(None, [f"workspace={tmp_path}", "encoder.precision=fp16"])
    assert artifacts.resolve_recipe_backend(recipe).backend == "torch"
    plan = artifacts.engine_dir(recipe, "tensorrt", "fp16")
    plan.mkdir(parents=True)
    (plan / artifacts.MANIFEST).write_text(json.dumps({"format": artifacts.FORMAT}))
    assert artifacts.recipe_facts(recipe).plans == {"fp16"}
    choice = artifacts.resolve_recipe_backend(recipe)
    assert choice.backend == "tensorrt" and choice.engine and "fp16 plan built" in choice.why
