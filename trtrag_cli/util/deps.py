"""Optional dependencies, imported lazily, with one-line install hints; feeds `trtrag doctor`."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from types import ModuleType

from trtrag_cli.util.errors import MissingDependency

# import name -> (distribution name, extra that installs it)
KNOWN = {
    "onnxruntime": ("onnxruntime", "cpu"),
    "faiss": ("faiss-cpu", "cpu"),
    "bm25s": ("bm25s", "cpu"),
    "Stemmer": ("PyStemmer", "cpu"),
    "tokenizers": ("tokenizers", "cpu"),
    "onnx": ("onnx", "cpu"),
    "bs4": ("beautifulsoup4", "cpu"),
    "torch": ("torch", "cpu"),
    "transformers": ("transformers", "cpu"),
    "sentence_transformers": ("sentence-transformers", "dev"),
    "openai": ("openai", "serve"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "tensorrt_rtx_bindings": ("tensorrt-rtx-cu13-bindings", "rtx"),
    "tensorrt_llm": ("tensorrt-llm", None),  # pins its own torch: its own environment, see HINTS
    "modelopt": ("nvidia-modelopt", "tensorrt"),
    "pymilvus": ("pymilvus", "milvus"),
    "milvus_lite": ("milvus-lite", "milvus"),
}


# Where `pip install <extra>` is the wrong advice.
HINTS = {
    "tensorrt_llm": ("install tensorrt-llm in an environment of its own (its wheels pin torch and transformers) "
                     "and run trtrag there, or serve the model with trtllm-serve and use answer.generator.backend: openai"),
}


def require(name: str, purpose: str = "") -> ModuleType:
    """Import an optional module or raise a one-line MissingDependency naming the fix."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise missing(name, purpose, str(exc)) from exc


def missing(name: str, purpose: str = "", detail: str = "") -> MissingDependency:
    """The one-line error for an optional module that is not installed, naming what to install."""
    dist, extra = KNOWN.get(name, (name, None))
    why = f" for {purpose}" if purpose else ""
    fix = f"run: pip install 'trtrag[{extra}]'" if extra else f"run: pip install {dist}"
    return MissingDependency(f"{dist} is not installed{why}" + (f": {detail}" if detail else ""), HINTS.get(name, fix))


def version(dist: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def available(name: str) -> bool:
    """Whether a module can be imported, without importing it."""
    return importlib.util.find_spec(name) is not None


def torch_dtype_kwarg() -> str:
    """from_pretrained's dtype keyword: `dtype` from transformers 4.56, `torch_dtype` before."""
    parts = [int(p) for p in re.findall(r"\d+", version("transformers") or "0")[:2]]
    return "dtype" if tuple(parts) >= (4, 56) else "torch_dtype"
