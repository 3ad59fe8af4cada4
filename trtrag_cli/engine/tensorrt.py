"""TensorRT plans for the encoder: a strongly typed network from the Q/DQ (int8), mixed-precision (fp16) or
plain (fp32) ONNX, built by whichever TensorRT is installed (encode/trt_runtime.py).

What TensorRT-RTX 1.7 accepts: it is strongly typed only, so FP32 builds from the plain export, FP16
needs a mixed-precision ONNX (ModelOpt AutoCast; there is no FP16 flag to fall back on) and INT8 needs
explicit Q/DQ nodes, the model `trtrag calibrate` writes. Whatever the runtime refuses is reported in its
own words (the first error it logged), never papered over.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trtrag_cli.encode import trt_runtime
from trtrag_cli.encode.artifacts import FORMAT
from trtrag_cli.encode.tensorrt import INPUTS, PLAN, plan_key
from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import atomic_write_bytes, sha256_file


def profile_shapes(recipe) -> dict[str, tuple[tuple[int, int], ...]]:
    e, enc = recipe.engine, recipe.encoder
    if e.opt_tokens > enc.max_tokens or e.min_tokens > enc.max_tokens:
        raise TrtragError(f"engine.opt_tokens ({e.opt_tokens}) exceeds encoder.max_tokens ({enc.max_tokens})",
                          "lower engine.opt_tokens or raise encoder.max_tokens")
    shapes = ((e.min_batch, e.min_tokens), (e.opt_batch, e.opt_tokens), (e.max_batch, enc.max_tokens))
    return {name: shapes for name in INPUTS}


def _source(recipe, precision: str, out: Path, runtime) -> tuple[Path, str | None, bool]:
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
    if hasattr(runtime.module.BuilderFlag, "FP16"):  # TensorRT 10 only; gone in 11 and in TensorRT-RTX
        return plain, None, False
    raise TrtragError(f"FP16 on {runtime.label} needs a mixed-precision ONNX from ModelOpt AutoCast",
                      "pip install nvidia-modelopt[onnx]")


def _logger(trt):
    """A TensorRT logger that prints warnings to stderr and keeps the errors, so that a refusal is reported
    in the runtime's own words (ILogger must be subclassed against the imported module, hence inside)."""

    class Recorder(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
            if severity <= trt.ILogger.Severity.WARNING and "Int64 binding" not in msg:
                print(f"[{trt.__name__}] {msg}", file=sys.stderr)

    return Recorder()


def _local_gpu() -> str | None:
    """This machine's first GPU's compute capability (nvidia-smi), or None without one."""
    from trtrag_cli.util.gpu import gpus

    found = gpus()
    return found[0]["compute_capability"] if found else None


def build(recipe, precision: str, out: Path, progress: Callable | None = None) -> dict:
    """Build and save a plan for precision into out (a folder publish_dir swaps in); returns its manifest."""
    runtime = trt_runtime.require("building a TensorRT plan")
    trt = runtime.module
    local = _local_gpu()
    targets = trt_runtime.resolve_targets(runtime, recipe.engine.trt_targets, local)
    shapes = profile_shapes(recipe)
    source, calibration, strongly_typed = _source(recipe, precision, out, runtime)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(runtime.network_flags(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] + logger.errors
        raise TrtragError(f"{runtime.label} could not parse {source.name}: "
                          f"{_first_line(errors[0]) if errors else 'unknown error'}",
                          "check the ONNX with `trtrag doctor`; re-run trtrag calibrate if it is the Q/DQ model")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe.engine.workspace_mb << 20)
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if runtime.ahead_of_time:
        runtime.set_targets(config, targets)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precision for the inspector
    profile = builder.create_optimization_profile()
    present = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, (lo, opt, hi) in shapes.items():
        if name in present:
            profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = _attach_timing_cache(recipe, runtime, config, targets)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = round(time.perf_counter() - started, 1)
    if plan is None:
        raise TrtragError(f"{runtime.label} failed to build a {precision} plan from {source.name}: "
                          f"{_first_line(logger.errors[0]) if logger.errors else 'no error was logged'}",
                          "see the TensorRT log above; check engine.* profile sizes and GPU memory")
    data = memoryview(plan)
    atomic_write_bytes(out / PLAN, data)  # a temp file renamed into place, inside the folder publish_dir swaps in
    cache.update(_save_timing_cache(runtime, config, cache))
    key = plan_key(recipe, precision, runtime, targets, calibration)
    return {"format": FORMAT, "backend": "tensorrt", "model": recipe.encoder.model, "key": key,
            "runtime": {"name": runtime.name, "version": runtime.version}, "targets": targets,
            "file": PLAN, "plan_bytes": data.nbytes, "source": str(source), "source_sha256": sha256_file(source),
            "calibration": calibration, "strongly_typed": strongly_typed,
            "profile": {n: [list(s) for s in v] for n, v in shapes.items()},
            "plan_seconds": seconds, "timing_cache": cache,
            "inspector": _inspect(runtime, logger, plan, targets, local)}


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0]


def _timing_cache_path(recipe, runtime, targets: list[str]) -> Path:
    """One cache file per runtime version and target set: tactics timed on one GPU mislead on another."""
    folder = Path(recipe.engine.timing_cache or Path(recipe.workspace) / "_cache" / "tensorrt")
    return folder / f"{runtime.name}-{runtime.version}-sm{'+'.join(t.replace('.', '') for t in targets)}.timing"


def _attach_timing_cache(recipe, runtime, config, targets: list[str]) -> dict:
    """Give the builder the stored timing cache (or a fresh one); every return value checked."""
    if not runtime.uses_timing_cache:
        return {"used": False, "why": f"{runtime.name} ignores the builder timing cache (its calls are no-ops "
                                      "since TensorRT-RTX 1.2; kernels are compiled on the GPU at run time)"}
    path = _timing_cache_path(recipe, runtime, targets)
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    status = "loaded" if blob else "new"
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another device or version: start afresh rather than build on mismatched timings.
        cache = config.create_timing_cache(b"")
        status = "refused, started afresh"
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            return {"used": False, "file": str(path), "why": f"{runtime.label} refused a new timing cache"}
    return {"used": True, "file": str(path), "status": status}


def _save_timing_cache(runtime, config, cache: dict) -> dict:
    if not cache.get("used"):
        return {}
    held = config.get_timing_cache()
    if held is None:
        return {"saved": False, "why": "the builder returned no timing cache"}
    serialized = held.serialize()
    if serialized is None:
        return {"saved": False, "why": "the timing cache did not serialize"}
    atomic_write_bytes(Path(cache["file"]), memoryview(serialized))
    return {"saved": True, "bytes": memoryview(serialized).nbytes}


def _inspect(runtime, logger, plan, targets: list[str], local: str | None) -> dict:
    """The engine inspector's per-layer list (name, type, output precision), where the plan can be opened.

    The inspector works on a deserialised engine, and deserialising needs a GPU of a target compute
    capability: an ahead-of-time build on a CPU cannot list its layers, and the report says so.
    """
    trt = runtime.module
    if local is None or local not in targets:
        where = "no GPU is visible" if local is None else f"this GPU is {local}, not a target"
        return {"available": False, "why": f"the engine inspector needs the plan deserialised on a GPU of a "
                                            f"target compute capability, and {where}"}
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        return {"available": False, "why": f"{runtime.label} could not deserialise the plan: "
                                           f"{_first_line(logger.errors[-1]) if logger.errors else 'no error logged'}"}
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity: names without precision
            layers.append({"name": layer, "precision": None})
            continue
        outputs = layer.get("Outputs") or [{}]
        layers.append({"name": layer.get("Name"), "type": layer.get("LayerType"),
                       "precision": outputs[0].get("Format/Datatype")})
    return {"available": True, "layers": layers}
