"""TensorRT encoder: build a strongly typed plan from ONNX and run it with execute_async_v3.

Written against TensorRT 10.x and 11.x (NVIDIA's 10.x -> 11.x migration guide):
  - precision lives in the ONNX, never in builder flags: INT8 is the calibrated Q/DQ model
    (`trtrag calibrate`), FP16 a mixed-precision ONNX from ModelOpt AutoCast. TensorRT 11 removed
    BuilderFlag.FP16/INT8 and the calibrator API; the one remaining legacy path, TensorRT 10's FP16
    flag on a weakly typed network, is taken only when AutoCast is not installed and is probed with
    hasattr, never with a version number;
  - the network is created with 1 << STRONGLY_TYPED looked up by name: the flag's bit is 1 in 10.x and
    0 (deprecated, always on) in 11.x, and EXPLICIT_BATCH no longer exists in 11.x;
  - I/O by tensor name (num_io_tensors, get_tensor_name/mode, set_input_shape, set_tensor_address),
    buffers and stream owned by the encoder (torch CUDA tensors), execution by execute_async_v3.
A plan only runs on the TensorRT version and GPU it was built for, so the manifest keys it on both and
loading refuses a mismatch with the command that rebuilds.

None of this has run in this project's workplace: TensorRT cannot be installed here. The tests that
exercise it are marked `tensorrt` and skip with that reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import deps
from ..artifacts import sha256_file
from ..errors import TrtragError

PLAN = "model.plan"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "embeddings"
PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}
FORMAT = 1


def _trt():
    return deps.require("tensorrt", "the TensorRT encoder")


def _gpu() -> dict:
    torch = deps.require("torch", "the TensorRT encoder (CUDA buffers)")
    if not torch.cuda.is_available():
        raise TrtragError("TensorRT needs a CUDA GPU and none is visible", "use --backend onnxruntime here")
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def key(onnx_sha: str, calibration: str | None) -> dict:
    """What a plan depends on: TensorRT version, GPU, source ONNX and calibration."""
    return {"format": FORMAT, "tensorrt": _trt().__version__, "gpu": _gpu(), "source_sha256": onnx_sha,
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
    from ..indexing import encoder_cache
    from .onnxruntime import cache_folder, ensure_onnx

    if precision == "int8":
        from ..calibrate import QDQ_MODEL, load_calibration

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
    if hasattr(_trt().BuilderFlag, "FP16"):  # TensorRT 10 only; removed in 11
        return plain, None, False
    raise TrtragError("FP16 on TensorRT 11 needs a mixed-precision ONNX from ModelOpt AutoCast",
                      "pip install nvidia-modelopt[onnx]")


def build(recipe, precision: str, out: Path, progress: Callable | None = None) -> dict:
    """Build and save a plan for precision into out; returns the engine manifest."""
    trt = _trt()
    _gpu()  # fail before any work when there is no GPU
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


def open_engine(recipe, folder: Path, manifest: dict):
    """TrtEncoder over a built plan, after checking its key against this machine."""
    from .models import model_info

    hint = f"run: trtrag build-engine --{recipe.encoder.precision} --backend tensorrt"
    now = {"tensorrt": _trt().__version__, "gpu": _gpu()}
    for field in ("tensorrt", "gpu"):
        if manifest.get(field) != now[field]:
            raise TrtragError(f"the plan in {folder} was built for {field} {manifest.get(field)}, this machine "
                              f"has {now[field]}", hint)
    return TrtEncoder(folder / manifest["file"], model_info(recipe.encoder.model), recipe.encoder.max_tokens,
                      f"tensorrt-{recipe.encoder.precision}-{manifest['source_sha256'][:8]}")


class TrtEncoder:
    """Texts -> embeddings through one TensorRT execution context; owns its stream and buffers."""

    def __init__(self, plan: Path, info, max_tokens: int, label: str):
        trt = _trt()
        import torch

        from .models import load_tokenizer

        self.name = f"{label}/{Path(info.id).name}"
        self.dim = info.dim
        self.max_tokens = max_tokens
        self._tokenizer = load_tokenizer(info.dir, max_tokens)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self._engine is None:
            raise TrtragError(f"TensorRT could not load {plan}", "rebuild it: trtrag build-engine --backend tensorrt")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._max_batch = int(self._engine.get_tensor_profile_shape(self._inputs[0], 0)[2][0])
        self._torch = torch

    def encode(self, texts: list[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed texts in input order as float32 [len(texts), dim]."""
        from .batching import encode_sorted
        from .onnxruntime import _pad

        if self._context is None:
            raise RuntimeError(f"{self.name} is closed")

        def embed(ids: list) -> np.ndarray:
            input_ids, mask = _pad(ids, len(ids[0]))
            return self._run({"input_ids": input_ids, "attention_mask": mask,
                              "token_type_ids": np.zeros_like(input_ids)})

        return encode_sorted(self._tokenizer, texts, min(batch_size, self._max_batch), self.dim, embed, progress)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        ctx = self._context
        with torch.cuda.stream(self._stream):
            held = {}
            for name in self._inputs:
                held[name] = torch.from_numpy(feeds[name]).to("cuda", non_blocking=True)
                ctx.set_input_shape(name, tuple(held[name].shape))
                ctx.set_tensor_address(name, held[name].data_ptr())
            shape = tuple(ctx.get_tensor_shape(OUTPUT))
            result = torch.empty(shape, dtype=torch.float32, device="cuda")
            ctx.set_tensor_address(OUTPUT, result.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            host = result.cpu()  # synchronises the stream
        return host.numpy()

    def close(self) -> None:
        """Free the context, engine and runtime (in that order, as TensorRT requires)."""
        self._context = None
        self._engine = None
        self._runtime = None

    def __enter__(self) -> TrtEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_encoder(model_id: str, cache_dir: Path, **_) -> TrtEncoder:
    """TensorRT encoders come from built engines only."""
    raise TrtragError("the TensorRT encoder runs a plan built by build-engine",
                      "run: trtrag build-engine --int8 --backend tensorrt (or --fp16)")
