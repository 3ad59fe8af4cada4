"""Text -> vectors behind one small interface; each backend is a module imported only when chosen."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.gpu import gpu_present

if TYPE_CHECKING:
    import numpy as np

# backend name -> module exposing open_encoder(model_id, cache_dir, threads,
# max_tokens). None: a known name whose module does not exist yet.
BACKENDS: dict[str, str | None] = {
    "onnxruntime": "trtrag_cli.encode.onnxruntime",
    "torch": "trtrag_cli.encode.torch",
    "tensorrt": "trtrag_cli.encode.tensorrt",
}
# "auto" tries these in order and takes the first that is available.
AUTO_ORDER = ("onnxruntime",)


@runtime_checkable
class Encoder(Protocol):
    """Embeds texts as float32 [n, dim] L2-normalised rows; a context manager that frees its session."""

    name: str
    dim: int
    max_tokens: int

    def encode(self, texts: list[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embeddings of texts, in input order."""
        ...

    def close(self) -> None:
        """Release the runtime session and its memory."""
        ...

    def __enter__(self) -> Encoder: ...

    def __exit__(self, *exc) -> None: ...


def resolve_backend(backend: str, precision: str = "fp32") -> str:
    """Concrete backend name for a requested one.

    "auto" takes the CUDA-graph torch encoder where a GPU is present and the precision is one it has
    (fp32, fp16, bf16), TensorRT for int8 on a GPU where it is installed, else the first available CPU
    backend (ONNX Runtime, whose int8 engine comes from `trtrag build-engine --int8`).
    """
    if backend == "auto":
        if gpu_present():
            if precision != "int8":
                return "torch"
            if importlib.util.find_spec("tensorrt") is not None:
                return "tensorrt"
        for name in AUTO_ORDER:
            if BACKENDS.get(name):
                return name
        raise TrtragError("no encoder backend is available", "run: pip install 'trtrag[cpu]'")
    if backend not in BACKENDS:
        raise TrtragError(f"unknown encoder backend {backend!r}",
                          f"use one of: auto, {', '.join(BACKENDS)}")
    if BACKENDS[backend] is None:
        raise TrtragError(f"backend {backend} is not available yet", "use --backend onnxruntime")
    return backend


def open_encoder(model_id: str, backend: str, cache_dir: Path, threads: int = 0,
                 max_tokens: int = 256, precision: str = "fp32") -> Encoder:
    """Open an Encoder for model_id on backend ("auto", "onnxruntime", ...), caching exports in cache_dir."""
    name = resolve_backend(backend, precision)
    module = importlib.import_module(BACKENDS[name])
    if precision not in module.PRECISIONS:
        raise TrtragError(f"the {name} encoder has no {precision} engine",
                          f"use encoder.precision: {' or '.join(module.PRECISIONS)} with this backend")
    return module.open_encoder(model_id, Path(cache_dir), threads=threads, max_tokens=max_tokens,
                               variant=module.PRECISIONS[precision])
