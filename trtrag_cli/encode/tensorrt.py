"""TensorRT encoder: build a strongly typed plan from ONNX and run it with execute_async_v3.

Written against TensorRT 10.x, 11.x and TensorRT-RTX 1.7 (trt_runtime.py holds where they differ):
  - precision lives in the ONNX, never in builder flags: INT8 is the calibrated Q/DQ model
    (`trtrag calibrate`), FP16 a mixed-precision ONNX from ModelOpt AutoCast. TensorRT 11 and TensorRT-RTX
    have no BuilderFlag.FP16/INT8 and no calibrator API; the one remaining legacy path, TensorRT 10's FP16
    flag on a weakly typed network, is taken only when AutoCast is not installed and is probed with
    hasattr, never with a version number;
  - I/O by tensor name (num_io_tensors, get_tensor_name/mode, set_input_shape, set_tensor_address),
    buffers and stream owned by the encoder (torch CUDA tensors), execution by execute_async_v3.
A plan only runs on the runtime version and the compute capabilities it was built for, and only for the
profile and calibration it was built from, so the manifest keys it on all of them (`plan_key`) and
loading refuses a mismatch with the command that rebuilds.

Where it has run: TensorRT-RTX builds plans ahead of time on this project's CPU-only CI (tests/
test_tensorrt_rtx.py). Running a plan needs a GPU and has never happened here; those tests are marked
`gpu` and skip with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from trtrag_cli.encode import trt_runtime
from trtrag_cli.util.errors import TrtragError

PLAN = "model.plan"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "embeddings"
PLAN_FORMAT = 2  # 2: the key below (runtime, targets, recipe fields); 1 keyed on the TensorRT version and GPU


def tensorrt_module():
    """The installed TensorRT flavour's module (tensorrt or tensorrt_rtx_bindings)."""
    return trt_runtime.require().module


def rebuild_hint(precision: str) -> str:
    """The command that rebuilds a TensorRT plan of this precision."""
    return f"run: trtrag build-engine --{precision} --backend tensorrt"


def plan_key(recipe, precision: str, runtime: trt_runtime.TrtRuntime, targets: list[str],
             calibration: str | None) -> dict:
    """What a plan depends on: runtime and version, target compute capabilities, the calibration (INT8),
    and the recipe fields that shape it (model, precision, profile, builder memory)."""
    e, enc = recipe.engine, recipe.encoder
    return {"plan_format": PLAN_FORMAT, "runtime": runtime.name, "runtime_version": runtime.version,
            "targets": list(targets), "calibration": calibration,
            "recipe": {"model": enc.model, "precision": precision, "max_tokens": enc.max_tokens,
                       "min_batch": e.min_batch, "opt_batch": e.opt_batch, "max_batch": e.max_batch,
                       "min_tokens": e.min_tokens, "opt_tokens": e.opt_tokens, "workspace_mb": e.workspace_mb}}


def check_plan(recipe, folder: Path, manifest: dict, calibration: str | None) -> dict:
    """Refuse a plan whose key differs from what this recipe, runtime and calibration would build now.

    calibration: the workspace's calibration id for an INT8 plan (the caller reads it: encode/artifacts.py).
    Checked without a GPU (the targets against this machine's GPU are checked when the plan is opened).
    Returns the plan's key.
    """
    precision = manifest.get("precision", recipe.encoder.precision)
    hint = rebuild_hint(precision)
    have = manifest.get("key") or {}
    if have.get("plan_format") != PLAN_FORMAT:
        raise TrtragError(f"the plan in {folder} has an older manifest (format {have.get('plan_format')})", hint)
    runtime = trt_runtime.require("loading a TensorRT plan")
    targets = recipe.engine.trt_targets or have.get("targets", [])
    want = plan_key(recipe, precision, runtime, targets, calibration)
    for field in ("runtime", "runtime_version", "targets", "calibration"):
        if have.get(field) != want[field]:
            raise TrtragError(f"the plan in {folder} was built for {field} {have.get(field)}, this is "
                              f"{want[field]}", hint)
    for field, value in want["recipe"].items():
        built = (have.get("recipe") or {}).get(field)
        if built != value:
            where = "encoder" if field in ("model", "max_tokens") else "engine"
            raise TrtragError(f"the plan in {folder} was built with {where}.{field} {built}, the recipe has {value}",
                              hint)
    return have


def gpu_facts() -> dict:
    """Name and compute capability of the CUDA GPU torch will run the plan on."""
    from trtrag_cli.util import deps

    torch = deps.require("torch", "the TensorRT encoder (CUDA buffers)")
    if not torch.cuda.is_available():
        raise TrtragError("TensorRT needs a CUDA GPU to run a plan and none is visible",
                          "use --backend onnxruntime here")
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def open_engine(recipe, folder: Path, manifest: dict, calibration: str | None = None):
    """TrtEncoder over a built plan, after checking its key against the recipe and this machine."""
    from trtrag_cli.encode.models import model_info

    key = check_plan(recipe, folder, manifest, calibration)
    gpu = gpu_facts()
    if gpu["compute_capability"] not in key["targets"]:
        raise TrtragError(f"the plan in {folder} was built for compute capability {', '.join(key['targets'])}, "
                          f"this GPU ({gpu['name']}) is {gpu['compute_capability']}",
                          f"set engine.trt_targets: [{gpu['compute_capability']}] and "
                          + rebuild_hint(recipe.encoder.precision).removeprefix("run: "))
    return TrtEncoder(folder / manifest["file"], model_info(recipe.encoder.model), recipe.encoder.max_tokens,
                      f"tensorrt-{recipe.encoder.precision}-{manifest['source_sha256'][:8]}")


class TrtEncoder:
    """Texts -> embeddings through one TensorRT execution context; owns its stream and buffers."""

    def __init__(self, plan: Path, info, max_tokens: int, label: str):
        trt = tensorrt_module()
        import torch

        from trtrag_cli.encode.models import load_tokenizer

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
        from trtrag_cli.encode.batching import encode_sorted, pad

        if self._context is None:
            raise RuntimeError(f"{self.name} is closed")

        def embed(ids: list) -> np.ndarray:
            input_ids, mask = pad(ids, len(ids[0]))
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
