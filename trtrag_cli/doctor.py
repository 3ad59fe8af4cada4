"""`trtrag doctor`: versions, GPU, which backend each stage of the recipe resolves to and why, and whether
`ask` would work: the encoder (engine included) and the index are opened the way `ask` opens them."""

from __future__ import annotations

import platform

from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.deps import available, version
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.gpu import gpus

LIBRARIES = ("numpy", "onnxruntime", "onnx", "faiss-cpu", "faiss-gpu", "bm25s", "PyStemmer", "tokenizers",
             "torch", "transformers", "triton", "sentence-transformers", "tensorrt", "tensorrt-rtx-cu13-bindings",
             "tensorrt-llm",
             "nvidia-modelopt", "pymilvus", "milvus-lite", "typer", "rich", "pyyaml")


def resolve_stages(recipe: Recipe, gpu_list: list[dict]) -> dict[str, dict]:
    """Backend per stage with the reason it was chosen; the encoder and the index are opened as `ask` opens
    them, and a stage that would fail carries `problem` (one line) and ok False."""
    from trtrag_cli.index.build import follow_index

    try:  # the encoder an existing index needs, as ask follows it
        followed, conflict = follow_index(recipe), None
    except TrtragError as exc:
        followed, conflict = None, exc
    encoder_st, encoder = encoder_stage(recipe)
    if followed:
        encoder_st["why"] = f"{followed} (encoder.backend auto or encoder.precision unset)"
    if encoder_st.get("answering"):  # a remote encoder: opening it asked this node for its dimension
        encoder_st["why"] += f"; embedding node {encoder_st['answering']} answers"
    if conflict:  # ask stops here, before opening anything; the index stage need not say it again
        encoder_st.update(ok=False, problem=_line(conflict))
        if encoder is not None:
            encoder.close()
        encoder = None
    try:
        index_st = index_stage(recipe, encoder)
    finally:
        if encoder is not None:
            encoder.close()
    return {
        "encoder": encoder_st,
        "index": index_st,
        "vector_index": vector_index_stage(recipe, gpu_list),
        "lexical": lexical_stage(recipe),
        "rerank": {"backend": recipe.retrieve.mode, "ok": True, "why": "retrieve.mode in the recipe"},
        "generator": generator_stage(recipe, gpu_list),
    }


def _line(exc: TrtragError) -> str:
    return exc.message + (f" — {exc.hint}" if exc.hint else "")


def encoder_stage(recipe: Recipe):
    """(stage, open encoder or None): the backend the one resolver picks and why, opened as `ask` opens it."""
    from trtrag_cli.encode.artifacts import open_recipe_encoder, resolve_recipe_backend

    enc = recipe.encoder
    stage = {"backend": enc.backend, "ok": False, "why": "", "model": enc.model, "precision": enc.precision,
             "engine": None}
    try:
        choice = resolve_recipe_backend(recipe)
    except TrtragError as exc:
        return {**stage, "why": "no backend serves the recipe here", "problem": _line(exc)}, None
    stage.update(backend=choice.backend, why=choice.why)
    if choice.engine:
        stage["engine"] = _engine_facts(recipe, choice.backend)
    try:
        encoder = open_recipe_encoder(recipe, choice=choice)
    except TrtragError as exc:
        stage["problem"] = _line(exc)
        if stage["engine"] is not None:
            stage["engine"].update(ok=False, status=f"engine not usable: {_line(exc)}")
        return stage, None
    stage.update(ok=True, name=encoder.name, dim=encoder.dim)
    if choice.backend == "openai":  # opening asked a node for its dimension: it answers
        stage.update(nodes=enc.base_urls(), answering=encoder.answering)
    return stage, encoder


def _engine_facts(recipe: Recipe, backend: str) -> dict:
    """The built engine the encoder will load: where, which form, its accuracy gate (not yet opened)."""
    from trtrag_cli.encode.artifacts import load_engine_manifest

    try:
        folder, manifest = load_engine_manifest(recipe, backend, recipe.encoder.precision)
    except TrtragError as exc:
        return {"ok": False, "status": f"engine not usable: {_line(exc)}"}
    return {"ok": True, "status": f"engine {folder} ({manifest.get('form', backend)})", "gate": manifest.get("gate")}


def index_stage(recipe: Recipe, encoder) -> dict:
    """The workspace's live index, opened as `ask` opens it, and checked against the encoder that will
    encode the questions (skipped when that encoder did not open: its stage says why)."""
    from trtrag_cli.index.build import load_index_manifest
    from trtrag_cli.retrieve.retriever import check_built_with, open_stores
    from trtrag_cli.util.workspace import Workspace

    vindex = store = None
    try:
        gen = Workspace(recipe.workspace_dir()).require_index()
        manifest = load_index_manifest(gen)
        if encoder is not None:
            check_built_with(manifest, encoder.name, recipe)
        store, vindex, _ = open_stores(recipe, gen, manifest)
        for seg in store.segments:
            seg.check()
        placement = vindex.placement
        rows = vindex.milvus.count() if recipe.index.backend == "milvus" else None
    except TrtragError as exc:
        return {"backend": "none", "ok": False, "why": "the index `ask` would search", "problem": _line(exc)}
    finally:
        if vindex is not None:
            vindex.close()  # a Milvus connection
        if store is not None:
            store.close()
    built_with = manifest.get("encoder", {}).get("name")
    out = {"backend": gen.name, "ok": True, "chunks": len(store),
           "why": f"{len(store)} chunks, built with {built_with}"}
    if recipe.index.backend == "milvus":
        out["milvus"] = {"placement": placement, "rows": rows}
        out["why"] += f"; Milvus collection opens ({placement}, {rows} rows)"
    return out


def lexical_stage(recipe: Recipe) -> dict:
    """Who scores BM25: bm25s in this process, or Milvus full-text search (bm25s still gives the analyser)."""
    if recipe.index.backend == "milvus":
        return {"backend": "milvus BM25", "ok": available("pymilvus") and available("bm25s"),
                "why": "index.backend: milvus: full-text search in the collection over our analysed terms"}
    return {"backend": "bm25 postings", "ok": available("bm25s"),
            "why": "index.backend: faiss: BM25 over the segments' postings (bm25s gives the stop words)"}


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
    if cfg.backend == "milvus":
        from trtrag_cli.index.milvus import dense_index, resolve_uri
        from trtrag_cli.recipe.sections import milvus_is_remote

        lite = not milvus_is_remote(cfg.uri)
        where = "Milvus Lite file " + resolve_uri(cfg, recipe.workspace_dir()) if lite else f"Milvus server {cfg.uri}"
        try:
            kind = dense_index(cfg, lite)[0]
        except TrtragError as exc:
            return {"backend": "milvus", "ok": False, "why": where, "problem": _line(exc)}
        deps = available("pymilvus") and (available("milvus_lite") or not lite)
        return {"backend": "milvus lite" if lite else "milvus server", "kind": kind, "ok": deps,
                "why": f"index.backend: milvus, {kind} in the {where}"
                       + ("" if deps else "; pip install 'trtrag[milvus]'")}
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


def tensorrt_runtime() -> dict:
    """Which TensorRT build-engine --backend tensorrt would build with (10/11 or RTX), its version and targets."""
    from trtrag_cli.encode.trt_runtime import describe

    return describe()


def run_doctor(recipe: Recipe) -> dict:
    """Everything `trtrag doctor` reports, as plain data; `problems` holds one line for each stage that would
    make `ask` fail (the command exits non-zero when there is any)."""
    gpu_list = gpus()
    stages = resolve_stages(recipe, gpu_list)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: version(name) for name in LIBRARIES},
        "gpus": gpu_list,
        "recipe": recipe.source,
        "workspace": str(recipe.workspace_dir()),
        "stages": stages,
        "tensorrt": tensorrt_runtime(),
        "problems": [f"{name}: {st.get('problem') or st['why']}" for name, st in stages.items() if not st["ok"]],
        "advice": hardware_advice(recipe, gpu_list, stages["index"].get("chunks")),
    }
