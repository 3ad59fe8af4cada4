"""Text -> vectors behind one small interface; each backend is a module imported only when chosen.

One rule decides which backend `encoder.backend: auto` means (`resolve_backend`), for every command
that builds or loads an encoder: build-engine, index, ask, serve and doctor. It takes the machine's
facts as a value (`Facts`), so the rule is tested over every combination without the hardware;
`machine_facts` is the one place that asks the machine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from trtrag_cli.util.errors import TrtragError

if TYPE_CHECKING:
    import numpy as np

# backend name -> module exposing open_encoder(model_id, cache_dir, threads, max_tokens, variant).
BACKENDS: dict[str, str] = {
    "onnxruntime": "trtrag_cli.encode.onnxruntime",
    "torch": "trtrag_cli.encode.torch",
    "tensorrt": "trtrag_cli.encode.tensorrt",
    "openai": "trtrag_cli.encode.remote",  # remote /v1/embeddings nodes; opens from a recipe (artifacts.py)
}
# Which precisions each backend serves, the one table that says so: precision -> the variant its
# open_encoder opens from the model, or None where only an engine from `trtrag build-engine` serves it.
PRECISIONS: dict[str, dict[str, str | None]] = {
    "onnxruntime": {"fp32": "fused", "int8": None},
    "torch": {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"},
    "tensorrt": {"fp32": None, "fp16": None, "int8": None},
    "openai": {"fp32": "remote"},  # the vectors arrive as floats; what the node computes in is its affair
}
ALL_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


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


@dataclass(frozen=True)
class Facts:
    """What `auto` looks at: a CUDA GPU torch can use, TensorRT importable, precisions with a built plan."""

    gpu: bool
    tensorrt: bool
    plans: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Choice:
    """A resolved backend, why it was chosen, and whether it serves the precision from a built engine."""

    backend: str
    why: str
    engine: bool


def machine_facts(plans: frozenset[str] = frozenset()) -> Facts:
    """This machine's facts; plans: the precisions whose TensorRT plan the workspace holds (artifacts.py)."""
    from trtrag_cli.util.deps import available
    from trtrag_cli.util.gpu import gpu_present

    return Facts(gpu=gpu_present(), tensorrt=available("tensorrt"), plans=frozenset(plans))


def resolve_backend(backend: str, precision: str, facts: Facts | None = None, building: bool = False) -> Choice:
    """The backend that serves `precision`, and why; `auto` follows one rule, for building and loading.

    auto: on a CUDA GPU with TensorRT installed, TensorRT where its plan for the precision is built (or is
    being built: build-engine builds what loading will pick) and always for int8; otherwise on a GPU, torch
    for the float precisions; else ONNX Runtime (fp32 from the export, int8 from its built engine).
    facts: asked of this machine (machine_facts) when None and needed.
    """
    if precision not in ALL_PRECISIONS:
        raise TrtragError(f"unknown precision {precision!r}", f"use one of: {', '.join(ALL_PRECISIONS)}")
    if backend != "auto":
        if backend not in BACKENDS:
            raise TrtragError(f"unknown encoder backend {backend!r}", f"use one of: auto, {', '.join(BACKENDS)}")
        offered = PRECISIONS[backend]
        if precision not in offered:
            raise TrtragError(f"the {backend} encoder has no {precision}",
                              f"use {' or '.join(offered)} with {backend}, or another encoder.backend")
        return Choice(backend, "named in the recipe", offered[precision] is None)
    facts = facts or machine_facts()
    if facts.gpu and facts.tensorrt and precision in PRECISIONS["tensorrt"]:
        if building or precision in facts.plans:
            return Choice("tensorrt", f"auto: a CUDA GPU with TensorRT, and a {precision} plan "
                          + ("being built" if building and precision not in facts.plans else "built"), True)
        if precision == "int8":
            return Choice("tensorrt", "auto: int8 on a CUDA GPU with TensorRT: the calibrated Q/DQ plan", True)
    if facts.gpu and precision in PRECISIONS["torch"]:
        if not facts.tensorrt:
            why = "no TensorRT"
        elif precision in PRECISIONS["tensorrt"]:
            why = f"no TensorRT {precision} plan built"
        else:
            why = f"TensorRT has no {precision}"
        return Choice("torch", f"auto: a CUDA GPU, {why}: torch with a CUDA graph per shape bucket", False)
    if precision in PRECISIONS["onnxruntime"]:
        where = "a CUDA GPU without TensorRT" if facts.gpu else "no CUDA GPU"
        how = "its int8 engine from build-engine" if precision == "int8" else "the exported model"
        return Choice("onnxruntime", f"auto: {where}: ONNX Runtime on the CPU, {how}",
                      PRECISIONS["onnxruntime"][precision] is None)
    raise TrtragError(f"no encoder backend on this machine serves {precision} (it needs a CUDA GPU)",
                      "use encoder.precision: fp32, or int8 after trtrag calibrate && trtrag build-engine --int8")


def open_encoder(model_id: str, backend: str, cache_dir: Path, threads: int = 0,
                 max_tokens: int = 256, precision: str = "fp32", facts: Facts | None = None) -> Encoder:
    """Open an Encoder for model_id on backend ("auto", "onnxruntime", ...), caching exports in cache_dir.

    Only what opens from the model itself; engines built by build-engine and remote nodes (openai) open
    through artifacts.open_recipe_encoder, which knows the workspace and the recipe.
    """
    choice = resolve_backend(backend, precision, facts)
    if choice.engine:
        raise TrtragError(f"the {choice.backend} encoder serves {precision} from a built engine only",
                          f"run trtrag build-engine --{precision} --backend {choice.backend}; index and ask then load it")
    module = importlib.import_module(BACKENDS[choice.backend])
    return module.open_encoder(model_id, Path(cache_dir), threads=threads, max_tokens=max_tokens,
                               variant=PRECISIONS[choice.backend][precision])
