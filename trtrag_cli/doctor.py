"""`trtrag doctor`: versions, GPU, and which backend each stage of the recipe resolves to, and why."""

from __future__ import annotations

import platform
import shutil
import subprocess

from .deps import available, version
from .recipe import Recipe

LIBRARIES = ("numpy", "onnxruntime", "onnx", "faiss-cpu", "faiss-gpu", "bm25s", "PyStemmer", "tokenizers",
             "torch", "transformers", "sentence-transformers", "tensorrt", "tensorrt-llm", "nvidia-modelopt",
             "typer", "rich", "pyyaml")


def gpus() -> list[dict]:
    """GPUs seen by nvidia-smi (empty when there is none or no driver)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            rows.append({"name": parts[0], "memory_mib": int(float(parts[1])), "driver": parts[2],
                         "compute_capability": parts[3]})
    return rows


def resolve_stages(recipe: Recipe, gpu_list: list[dict]) -> dict[str, dict]:
    """Backend per stage with the reason it was chosen."""
    from .encoders import resolve_backend

    enc = recipe.encoder.backend
    enc_choice = resolve_backend(enc, recipe.encoder.precision) if enc == "auto" else enc
    if enc != "auto":
        why = "named in the recipe"
    elif enc_choice == "torch":
        why = "auto: a CUDA GPU is present: torch with a CUDA graph per shape bucket"
    elif enc_choice == "tensorrt":
        why = "auto: int8 on a CUDA GPU with TensorRT installed: the calibrated Q/DQ plan"
    else:
        why = "auto: no CUDA GPU (or int8 without TensorRT): ONNX Runtime on the CPU"
    encoder_ok = available(enc_choice)
    engine = _engine_status(recipe, enc_choice)
    if engine:
        why += f"; {engine['status']}"
        encoder_ok = encoder_ok and engine["ok"]
    faiss_gpu = bool(gpu_list) and version("faiss-gpu") is not None
    return {
        "encoder": {"backend": enc_choice, "ok": encoder_ok, "why": why, "model": recipe.encoder.model,
                    "precision": recipe.encoder.precision, "engine": engine},
        "vector_index": {"backend": "faiss-gpu" if faiss_gpu else "faiss-cpu", "ok": available("faiss"),
                         "kind": recipe.index.kind,
                         "why": "GPU and faiss-gpu present" if faiss_gpu else "no GPU with faiss-gpu: CPU faiss"},
        "lexical": {"backend": "bm25s", "ok": available("bm25s"), "why": "the only BM25 backend"},
        "rerank": {"backend": recipe.retrieve.mode, "ok": True, "why": "retrieve.mode in the recipe"},
        "generator": {"backend": recipe.answer.generator, "ok": True, "why": "answer.generator in the recipe"},
    }


def _engine_status(recipe: Recipe, backend: str) -> dict | None:
    """Whether the engine the recipe needs (int8 or TensorRT) is built and still loadable here."""
    from .errors import TrtragError

    if recipe.encoder.precision != "int8" and backend != "tensorrt":
        return None
    from .engine import check_ort_engine, load_manifest

    try:
        folder, manifest = load_manifest(recipe, backend, recipe.encoder.precision)
        if backend == "onnxruntime":
            check_ort_engine(recipe, manifest, folder)
    except TrtragError as exc:
        return {"ok": False, "status": f"engine not usable: {exc.message} ({exc.hint})"}
    return {"ok": True, "status": f"engine {folder} ({manifest.get('form', backend)})",
            "gate": manifest.get("gate")}


def run_doctor(recipe: Recipe) -> dict:
    """Everything `trtrag doctor` reports, as plain data."""
    gpu_list = gpus()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: version(name) for name in LIBRARIES},
        "gpus": gpu_list,
        "recipe": recipe.source,
        "workspace": str(recipe.workspace_dir()),
        "stages": resolve_stages(recipe, gpu_list),
    }
