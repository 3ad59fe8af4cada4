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

from collections.abc import Callable
from pathlib import Path

import numpy as np

from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError

PLAN = "model.plan"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "embeddings"
FORMAT = 1


def tensorrt_module():
    return deps.require("tensorrt", "the TensorRT encoder")


def gpu_facts() -> dict:
    torch = deps.require("torch", "the TensorRT encoder (CUDA buffers)")
    if not torch.cuda.is_available():
        raise TrtragError("TensorRT needs a CUDA GPU and none is visible", "use --backend onnxruntime here")
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def open_engine(recipe, folder: Path, manifest: dict):
    """TrtEncoder over a built plan, after checking its key against this machine."""
    from trtrag_cli.encode.models import model_info

    hint = f"run: trtrag build-engine --{recipe.encoder.precision} --backend tensorrt"
    now = {"tensorrt": tensorrt_module().__version__, "gpu": gpu_facts()}
    for field in ("tensorrt", "gpu"):
        if manifest.get(field) != now[field]:
            raise TrtragError(f"the plan in {folder} was built for {field} {manifest.get(field)}, this machine "
                              f"has {now[field]}", hint)
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
