"""`trtrag doctor`: versions, GPU, and which backend each stage of the recipe resolves to, and why."""

from __future__ import annotations

import platform

from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.deps import available, version
from trtrag_cli.util.gpu import gpus

LIBRARIES = ("numpy", "onnxruntime", "onnx", "faiss-cpu", "faiss-gpu", "bm25s", "PyStemmer", "tokenizers",
             "torch", "transformers", "triton", "sentence-transformers", "tensorrt", "tensorrt-llm",
             "nvidia-modelopt", "typer", "rich", "pyyaml")


def resolve_stages(recipe: Recipe, gpu_list: list[dict]) -> dict[str, dict]:
    """Backend per stage with the reason it was chosen."""
    from trtrag_cli.encode.registry import resolve_backend

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
    return {
        "encoder": {"backend": enc_choice, "ok": encoder_ok, "why": why, "model": recipe.encoder.model,
                    "precision": recipe.encoder.precision, "engine": engine},
        "vector_index": vector_index_stage(recipe, gpu_list),
        "lexical": {"backend": "bm25s", "ok": available("bm25s"), "why": "the only BM25 backend"},
        "rerank": {"backend": recipe.retrieve.mode, "ok": True, "why": "retrieve.mode in the recipe"},
        "generator": generator_stage(recipe, gpu_list),
    }


def generator_stage(recipe: Recipe, gpu_list: list[dict]) -> dict:
    """The generator and, for transformers, which decode path a GPU would take (before loading the model)."""
    gen = recipe.answer.generator
    why = "answer.generator.backend in the recipe"
    if gen.backend == "transformers":
        from trtrag_cli.generate.hf import wants_fast_decoder

        on_gpu = gen.device.startswith("cuda") or (gen.device == "auto" and bool(gpu_list))
        if not wants_fast_decoder(gen.decode, on_gpu):
            why += "; on the GPU: transformers' generate with its static cache" if on_gpu else \
                "; on the CPU: transformers' generate"
        elif not on_gpu:
            why += "; on the CPU: our decode loop, eagerly"
        elif gen.kernels and available("triton"):
            why += ("; on the GPU, Llama-family models: our CUDA-graph loop, batch-1 steps through the Triton "
                    "decode kernels")
        else:
            reason = "answer.generator.kernels is false" if not gen.kernels else "triton is not installed"
            why += f"; on the GPU, Llama-family models: our CUDA-graph loop with torch layers ({reason})"
    return {"backend": gen.backend, "ok": True, "why": why}


def vector_index_stage(recipe: Recipe, gpu_list: list[dict]) -> dict:
    """Where searches will run for the recipe's index on this machine, and why (index.placement_for, the
    rules VectorIndex follows)."""
    from trtrag_cli.index.vectors import placement_for
    from trtrag_cli.util.gpu import gpu_count, torch_gpu_count

    cfg = recipe.index
    faiss_gpus = gpu_count() if available("faiss") else 0
    torch_gpus = torch_gpu_count() if gpu_list else 0
    plan = placement_for(cfg.kind, cfg.device, cfg.exact, faiss_gpus, torch_gpus, gpu_present=bool(gpu_list))
    names = {"torch": "torch", "faiss": "faiss-gpu"}
    if not plan.engines:
        backend = "none" if plan.problem else "faiss-cpu"
    elif cfg.kind == "flat":
        backend = "gpu exact: " + " or ".join(names[e] for e in plan.engines)
    else:
        backend = "faiss-gpu"
    return {"kind": cfg.kind, "device": cfg.device, "faiss_gpus": faiss_gpus, "torch_gpus": torch_gpus,
            "backend": backend, "ok": available("faiss") and plan.problem is None,
            "why": plan.why + (f"; {plan.problem[0]}" if plan.problem else "")}


def hardware_advice(recipe: Recipe, gpu_list: list[dict], index_vectors: int | None = None) -> list[str]:
    """The design's sizing rules as warnings where they apply: GPU memory about twice what the models and
    the index need, and tensor parallelism for generators past 32B parameters."""
    from trtrag_cli.encode.models import model_info
    from trtrag_cli.util.errors import TrtragError

    if not gpu_list:
        return []
    out = []
    try:
        info = model_info(recipe.encoder.model)
        weights = info.weights.stat().st_size if info.weights.is_file() else 0
        dim = info.dim
    except TrtragError:
        weights, dim = 0, 0
    bytes_per = 2 if recipe.index.fp16 else 4
    need = weights + (index_vectors or 0) * dim * bytes_per
    smallest = min(g["memory_mib"] for g in gpu_list) * 2**20
    if need and smallest < 2 * need:
        out.append(f"GPU memory {smallest / 2**30:.1f} GiB is under twice what the encoder and index need "
                   f"({need / 2**30:.1f} GiB): the design advises about 2x; use ivfpq, fp16 or more GPUs")
    params = generator_params(recipe)
    if params and params > 32e9 and len(gpu_list) < 2:
        out.append(f"the generator has about {params / 1e9:.0f}B parameters: past 32B the design advises tensor "
                   "parallelism over several GPUs")
    return out


def generator_params(recipe: Recipe) -> float | None:
    """Approximate parameter count of the recipe's generator from its config.json, when it names a model."""
    import json
    from pathlib import Path

    model = getattr(recipe.answer.generator, "model", None)
    config = Path(model) / "config.json" if model else None
    if config is None or not config.is_file():
        return None
    c = json.loads(config.read_text(encoding="utf-8"))
    h, layers = c.get("hidden_size", 0), c.get("num_hidden_layers", 0)
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads", heads) * (h // max(1, heads))
    ffn = c.get("intermediate_size", 4 * h)
    return float(layers * (2 * h * h + 2 * h * kv + 3 * h * ffn) + 2 * c.get("vocab_size", 0) * h)


def _engine_status(recipe: Recipe, backend: str) -> dict | None:
    """Whether the engine the recipe needs (int8 or TensorRT) is built and still loadable here."""
    from trtrag_cli.util.errors import TrtragError

    if recipe.encoder.precision != "int8" and backend != "tensorrt":
        return None
    from trtrag_cli.encode.artifacts import check_ort_engine, load_manifest

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
    from trtrag_cli.index.build import follow_index
    from trtrag_cli.util.errors import TrtragError

    gpu_list = gpus()
    try:  # the encoder an existing index needs, as ask would follow it
        followed, conflict = follow_index(recipe), None
    except TrtragError as exc:
        followed, conflict = None, f"{exc.message} ({exc.hint})"
    stages = resolve_stages(recipe, gpu_list)
    for note in (followed, conflict):
        if note:
            stages["encoder"]["why"] += f"; {note}"
    if conflict:
        stages["encoder"]["ok"] = False
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: version(name) for name in LIBRARIES},
        "gpus": gpu_list,
        "recipe": recipe.source,
        "workspace": str(recipe.workspace_dir()),
        "stages": stages,
        "advice": hardware_advice(recipe, gpu_list, _indexed_vectors(recipe)),
    }


def _indexed_vectors(recipe: Recipe) -> int | None:
    """How many vectors the workspace's current index holds (None when there is none)."""
    from trtrag_cli.util.files import read_json
    from trtrag_cli.util.workspace import Workspace

    gen = Workspace(recipe.workspace_dir()).current_index()
    if gen is None or not (gen / "manifest.json").is_file():
        return None
    counts = read_json(gen / "manifest.json").get("counts", {})
    return counts.get("chunks_total")
