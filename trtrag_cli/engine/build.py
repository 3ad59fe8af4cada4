"""`trtrag build-engine`: turn the exported (and calibrated) encoder into what a backend runs.

  onnxruntime  fp32: ORT's optimised fused graph, saved. int8: the calibrated Q/DQ model and a static
               form of the fused graph with the same ranges and weights (quantize/cpu.py) are both gated
               against FP32 and timed; the faster that passes is saved.
  tensorrt     a strongly typed plan from the Q/DQ ONNX (int8) or a mixed-precision ONNX (fp16), with an
               optimisation profile from the recipe and a reused timing cache (encoders/tensorrt.py).
  torch        fp16/bf16 on a GPU: CUDA graphs captured per shape bucket as a warm-up and timing check.

Engines live in <workspace>/<name>/engines/<backend>-<precision>/ with a manifest whose key (versions,
model, ONNX and calibration hashes, GPU) must match at load time, else loading refuses with the command
that rebuilds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from trtrag_cli.encode.artifacts import (
    ENGINES,
    FORMAT,
    MANIFEST,
    engine_dir,
    resolve_recipe_backend,
)
from trtrag_cli.encode.registry import PRECISIONS
from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import library_versions, sha256_file, write_json
from trtrag_cli.util.timing import cycled
from trtrag_cli.util.workspace import Workspace

ORT_MODEL = "model.onnx"
TIMING_QUERIES = 64


def _ort_key(recipe: Recipe, source_sha: str, calibration_id: str | None) -> dict:
    return {"format": FORMAT, "backend": "onnxruntime", "model": recipe.encoder.model,
            "source_sha256": source_sha, "calibration": calibration_id,
            "versions": library_versions(("onnxruntime", "onnx"))}


# ---------------------------------------------------------------------------------------------- build

def run_build_engine(recipe: Recipe, precision: str, backend: str = "auto", progress=None) -> dict:
    """Build the engine for precision on backend; returns its manifest (plus `path`)."""
    from trtrag_cli.engine.tensorrt import profile_shapes

    # The resolver that index, ask and serve load with: auto builds the engine they will then pick.
    choice = resolve_recipe_backend(recipe, backend, precision, building=True)
    name = choice.backend
    builders = {"onnxruntime": _build_ort, "tensorrt": _build_tensorrt, "torch": _build_torch}
    profile_shapes(recipe)  # impossible shapes fail here, on every backend, before any work
    ws = Workspace(recipe.workspace_dir())
    started = time.perf_counter()
    with ws.lock(), ws.publish_dir(f"{ENGINES}/{name}-{precision}") as out:
        manifest = builders[name](recipe, precision, out, progress)
        manifest.update({"precision": precision, "recipe": recipe.to_dict(),
                         "build_seconds": round(time.perf_counter() - started, 1)})
        if backend == "auto":
            manifest.update(picked_by_auto=name, why=choice.why)
        write_json(out / MANIFEST, manifest)
    manifest["path"] = str(engine_dir(recipe, name, precision))
    return manifest


def _build_ort(recipe: Recipe, precision: str, out: Path, progress) -> dict:
    from trtrag_cli.encode.artifacts import encoder_cache
    from trtrag_cli.encode.onnxruntime import cache_folder, ensure_onnx

    if precision == "int8":
        return _build_ort_int8(recipe, out, progress)
    cache = cache_folder(encoder_cache(recipe), recipe.encoder.model)
    source = ensure_onnx(recipe.encoder.model, cache, PRECISIONS["onnxruntime"][precision])
    _save_optimised(source, out / ORT_MODEL)
    return {**_ort_key(recipe, sha256_file(source), None), "form": "fp32-fused", "file": ORT_MODEL}


def _build_ort_int8(recipe: Recipe, out: Path, progress) -> dict:
    """Gate and time the Q/DQ model and the static fused form; keep the faster that passes."""
    import onnx

    from trtrag_cli.calibrate import gate, qdq, smooth
    from trtrag_cli.encode.artifacts import (
        HOLDOUT,
        QDQ_MODEL,
        SMOOTHING,
        load_calibration,
    )
    from trtrag_cli.encode.models import model_info
    from trtrag_cli.engine import ort_static as cpu

    folder, calibration = load_calibration(recipe)
    fp32 = Path(calibration["fp32_onnx"])
    if not fp32.is_file() or sha256_file(fp32) != calibration["fp32_onnx_sha256"]:
        raise TrtragError("the FP32 export changed since calibration", "run: trtrag calibrate")
    try:
        onnx.checker.check_model(str(folder / QDQ_MODEL))
    except Exception as exc:  # onnx raises ValidationError or a protobuf DecodeError for a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrtragError(f"the calibrated model {folder / QDQ_MODEL} is damaged: {first}",
                          "run: trtrag calibrate") from None
    info = model_info(recipe.encoder.model)
    holdout = (folder / HOLDOUT).read_text(encoding="utf-8").splitlines()
    cfg = recipe.calibrate
    probe = gate.Probe.build(recipe, info, fp32, holdout, Path(cfg.eval) if cfg.eval else None)
    kept = frozenset(calibration["gate"]["kept_float"])
    model = onnx.load(str(fp32))
    forms = {}
    scratch = out / "candidates"
    scratch.mkdir()

    fused = fp32.with_name("model.fused.onnx")  # the same export after ORT's attention/LayerNorm fusions
    sites = qdq.find_sites(model)
    acts = [s.activation for s in sites]
    qkv = [a for a in dict.fromkeys(acts) if acts.count(a) >= 3]  # the input Q, K and V share, per layer

    smoothings = smooth.load(folder / SMOOTHING)

    def static(keep: frozenset[str]) -> Path:
        path = scratch / "static.onnx"
        cpu.build_static(fused, path, keep | kept, calibration["ranges"], qkv, smoothings)
        return path

    # Same ranges and weights as the Q/DQ model, but another graph and kernels: gate it on its own,
    # starting from the layers calibration kept in float.
    verdict = gate.run(probe, static, [s for s in sites if s.node not in kept], cfg, progress=progress)
    forms["static"] = {"file": static(frozenset(verdict["kept_float"])), "gate": verdict}
    forms["qdq"] = {"file": folder / QDQ_MODEL, "gate": calibration["gate"]}
    for form in forms.values():
        with gate.open_candidate(probe, form["file"]) as enc:
            form["speed"] = _time(enc, holdout)
    passing = {k: v for k, v in forms.items() if v["gate"]["passed"]} or forms
    # Both batch sizes count: the product favours a form that is not slower at either.
    best = min(passing, key=lambda k: passing[k]["speed"]["batch1_ms"] * passing[k]["speed"]["batch64_ms_per_text"])
    _save_optimised(forms[best]["file"], out / ORT_MODEL)
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    run_tokens = _best_run_tokens(probe, out / ORT_MODEL, probe.texts[probe.n_queries:] or holdout)
    key = _ort_key(recipe, calibration["fp32_onnx_sha256"], calibration["id"])
    return {**key, "form": best, "file": ORT_MODEL, "run_tokens": run_tokens,
            "kept_float": sorted(kept | set(forms[best]["gate"]["kept_float"] if best == "static" else ())),
            "gate": forms[best]["gate"]["final"], "gate_passed": forms[best]["gate"]["passed"],
            "candidates": {k: {"speed": v["speed"], "gate": v["gate"]["final"], "passed": v["gate"]["passed"]}
                           for k, v in forms.items()}}


RUN_TOKEN_CHOICES = (1024, 2048, 4096)


def _best_run_tokens(probe, path: Path, passages: list[str]) -> dict:
    """Tokens per ORT run for batched encoding, chosen by timing passages at batch 64.

    A batch is split into runs of about this many padded tokens (encoders/onnxruntime.py RUN_TOKENS).
    FP32 does best at 1024 on this CPU; the INT8 engine's activations are the same size but its GEMMs
    are cheaper, and on the Debian passages 2048 gave it 88 docs/s against 85 at 1024.
    """
    from trtrag_cli.calibrate import gate

    texts = cycled(passages, 256)
    times = {}
    for tokens in RUN_TOKEN_CHOICES:
        with gate.open_candidate(probe, path) as enc:
            enc.run_tokens = tokens
            enc.encode(texts[:64], batch_size=64)
            runs = []
            for _ in range(2):
                t = time.perf_counter()
                enc.encode(texts, batch_size=64)
                runs.append(time.perf_counter() - t)
            times[tokens] = min(runs) / len(texts) * 1e3
    best = min(times, key=times.get)
    return {"chosen": best, "ms_per_text": {str(k): round(v, 3) for k, v in times.items()}}


def _time(encoder, texts: list[str]) -> dict:
    """ms per text at batch 1 and batch 64 (medians of 3), for choosing a form by measurement."""
    texts = cycled(texts, TIMING_QUERIES)
    encoder.encode(texts[:8], batch_size=8)
    one, many = [], []
    for _ in range(3):
        t = time.perf_counter()
        for text in texts[:16]:
            encoder.encode([text], batch_size=1)
        one.append((time.perf_counter() - t) / 16 * 1e3)
        t = time.perf_counter()
        encoder.encode(texts, batch_size=64)
        many.append((time.perf_counter() - t) / len(texts) * 1e3)
    return {"batch1_ms": round(float(np.median(one)), 3), "batch64_ms_per_text": round(float(np.median(many)), 3)}


def _save_optimised(src: Path, dst: Path) -> None:
    """Let ORT apply its graph optimisations once and save the result, so sessions load it ready-made.

    Extended (not all) optimisations: the saved graph then holds no layout specific to this CPU.
    """
    ort = deps.require("onnxruntime", "building the CPU engine")
    from trtrag_cli.encode.onnxruntime import new_session, session_options

    options = session_options(1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    new_session(src, options)
    if not dst.is_file():
        raise TrtragError(f"ONNX Runtime did not save an optimised model from {src}", "check the ORT version")


def _build_tensorrt(recipe: Recipe, precision: str, out: Path, progress) -> dict:
    from trtrag_cli.engine import tensorrt as trt_plan

    return trt_plan.build(recipe, precision, out, progress)


def _build_torch(recipe: Recipe, precision: str, out: Path, progress) -> dict:
    from trtrag_cli.encode.artifacts import encoder_cache
    from trtrag_cli.encode.torch import open_encoder
    from trtrag_cli.util.gpu import gpu_present

    if not gpu_present():
        raise TrtragError("the torch engine needs a CUDA GPU and none is visible",
                          "use --backend onnxruntime on this machine")
    enc = recipe.encoder
    with open_encoder(enc.model, encoder_cache(recipe), max_tokens=enc.max_tokens,
                      variant=PRECISIONS["torch"][precision]) as encoder:
        warm = encoder.warmup()
    import torch

    return {"format": FORMAT, "backend": "torch", "model": enc.model, "warmup": warm,
            "gpu": torch.cuda.get_device_name(), "versions": library_versions(("torch", "transformers"))}
