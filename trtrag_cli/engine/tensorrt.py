"""TensorRT plans for the encoder: a strongly typed network from the Q/DQ (int8) or mixed-precision (fp16) ONNX."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from trtrag_cli.encode.tensorrt import FORMAT, INPUTS, PLAN, gpu_facts, tensorrt_module
from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import sha256_file


def key(onnx_sha: str, calibration: str | None) -> dict:
    """What a plan depends on: TensorRT version, GPU, source ONNX and calibration."""
    return {"format": FORMAT, "tensorrt": tensorrt_module().__version__, "gpu": gpu_facts(), "source_sha256": onnx_sha,
            "calibration": calibration}


def profile_shapes(recipe) -> dict[str, tuple[tuple[int, int], ...]]:
    e, enc = recipe.engine, recipe.encoder
    if e.opt_tokens > enc.max_tokens or e.min_tokens > enc.max_tokens:
        raise TrtragError(f"engine.opt_tokens ({e.opt_tokens}) exceeds encoder.max_tokens ({enc.max_tokens})",
                          "lower engine.opt_tokens or raise encoder.max_tokens")
    shapes = ((e.min_batch, e.min_tokens), (e.opt_batch, e.opt_tokens), (e.max_batch, enc.max_tokens))
    return {name: shapes for name in INPUTS}


def _source(recipe, precision: str, out: Path) -> tuple[Path, str | None, bool]:
    """(ONNX to build from, calibration id, strongly typed) for a precision."""
    from trtrag_cli.encode.artifacts import QDQ_MODEL, encoder_cache, load_calibration
    from trtrag_cli.encode.onnxruntime import cache_folder, ensure_onnx

    if precision == "int8":
        folder, report = load_calibration(recipe)
        return folder / QDQ_MODEL, report["id"], True
    plain = ensure_onnx(recipe.encoder.model, cache_folder(encoder_cache(recipe), recipe.encoder.model), "plain")
    if precision == "fp32":
        return plain, None, True
    if deps.available("modelopt"):
        from modelopt.onnx.autocast import convert_to_mixed_precision

        mixed = convert_to_mixed_precision(onnx_path=str(plain), low_precision_type="fp16", keep_io_types=True)
        import onnx

        path = out / "model.fp16.onnx"
        onnx.save(mixed, str(path))
        return path, None, True
    if hasattr(tensorrt_module().BuilderFlag, "FP16"):  # TensorRT 10 only; removed in 11
        return plain, None, False
    raise TrtragError("FP16 on TensorRT 11 needs a mixed-precision ONNX from ModelOpt AutoCast",
                      "pip install nvidia-modelopt[onnx]")


def build(recipe, precision: str, out: Path, progress: Callable | None = None) -> dict:
    """Build and save a plan for precision into out; returns the engine manifest."""
    trt = tensorrt_module()
    gpu_facts()  # fail before any work when there is no GPU
    shapes = profile_shapes(recipe)
    source, calibration, strongly_typed = _source(recipe, precision, out)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TrtragError(f"TensorRT could not parse {source.name}: {errors[0] if errors else 'unknown error'}",
                          "check the ONNX with `trtrag doctor`; re-run trtrag calibrate if it is the Q/DQ model")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe.engine.workspace_mb << 20)
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    present = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, (lo, opt, hi) in shapes.items():
        if name in present:
            profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(recipe.engine.timing_cache or Path(recipe.workspace) / "_cache" / "tensorrt.timing")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TrtragError(f"TensorRT failed to build an engine from {source.name}",
                          "see the TensorRT log above; check engine.* profile sizes and GPU memory")
    (out / PLAN).write_bytes(memoryview(plan))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    manifest = {**key(sha256_file(source), calibration), "backend": "tensorrt", "model": recipe.encoder.model,
                "file": PLAN, "source": str(source), "strongly_typed": strongly_typed,
                "profile": {n: [list(s) for s in v] for n, v in shapes.items()},
                "plan_seconds": round(time.perf_counter() - started, 1), "timing_cache": str(cache_path)}
    return manifest
