"""What the encoders load from a workspace: built engines, the calibration, the export cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from trtrag_cli.encode.registry import (
    PRECISIONS,
    Choice,
    Facts,
    machine_facts,
    open_encoder,
    resolve_backend,
)
from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import library_versions, read_json
from trtrag_cli.util.workspace import Workspace

ENGINES = "engines"
MANIFEST = "manifest.json"
INDEX_MANIFEST = "manifest.json"  # of an index generation (index/generation.py MANIFEST)
FORMAT = 1
# The calibration folder that `trtrag calibrate` publishes (calibrate/run.py writes it, engines read it).
CALIBRATION_DIR = "calibration"
QDQ_MODEL = "model.qdq.onnx"
REPORT = "calibration.json"
TRT_CACHE = "calibration.cache"
HOLDOUT = "holdout.txt"
SMOOTHING = "smoothing.json"


def recipe_facts(recipe: Recipe) -> Facts:
    """This machine's facts for `auto`, with the TensorRT plans the recipe's workspace holds."""
    facts = machine_facts()
    if not (facts.gpu and facts.tensorrt):
        return facts
    built = {p for p in PRECISIONS["tensorrt"] if (engine_dir(recipe, "tensorrt", p) / MANIFEST).is_file()}
    return dataclasses.replace(facts, plans=frozenset(built))


def resolve_recipe_backend(recipe: Recipe, backend: str | None = None, precision: str | None = None,
                           building: bool = False) -> Choice:
    """The encoder backend for this recipe on this machine (the recipe's backend and precision by default)."""
    backend, precision = backend or recipe.encoder.backend, precision or recipe.encoder.precision
    facts = recipe_facts(recipe) if backend == "auto" else None  # a named backend asks the machine nothing
    return resolve_backend(backend, precision, facts, building)


def open_recipe_encoder(recipe: Recipe, ws: Workspace | None = None, choice: Choice | None = None):
    """The encoder the recipe names: a built engine, or the model with its export cached in the workspace."""
    enc = recipe.encoder
    choice = choice or resolve_recipe_backend(recipe)
    if choice.engine:
        return open_engine_encoder(recipe, choice.backend)
    if choice.backend == "openai":
        return open_remote_encoder(recipe, ws)
    return open_encoder(enc.model, choice.backend, encoder_cache(recipe), threads=enc.threads or 0,
                        max_tokens=enc.max_tokens, precision=enc.precision)


def open_remote_encoder(recipe: Recipe, ws: Workspace | None = None):
    """The remote (openai) encoder, its dimension checked against the live index built under its name."""
    from trtrag_cli.encode.remote import encoder_name, open_remote

    enc = recipe.encoder
    ws = ws or Workspace(recipe.workspace_dir())
    name = encoder_name(enc.model, enc.dimensions)
    gen = ws.current_index()
    dim = None
    try:  # index/generation.py writes this file (encode sits below index, so it reads it by name)
        built = read_json(gen / INDEX_MANIFEST).get("encoder", {}) if gen is not None else {}
        if built.get("name") == name:
            dim = int(built["dim"])
    except (TrtragError, OSError, KeyError, TypeError, ValueError, AttributeError):  # Attribute: not a dict
        dim = None  # no readable index: nothing to hold the node to; opening the index says what is wrong
    return open_remote(enc, dim, f"the index {gen.name} built under that name holds" if dim else "")


def encoder_cache(recipe: Recipe) -> Path:
    """Where exported encoders live: shared by the recipes of one workspace root ($TRTRAG_CACHE wins)."""
    root = os.environ.get("TRTRAG_CACHE")
    base = Path(root) if root else Path(recipe.workspace) / "_cache"
    return base / "encoders" / recipe.encoder.model.replace("/", "_")


def engine_dir(recipe: Recipe, backend: str, precision: str) -> Path:
    """Where the engine for (backend, precision) of this recipe lives."""
    return recipe.workspace_dir() / ENGINES / f"{backend}-{precision}"


def _rebuild_hint(precision: str, backend: str) -> str:
    return f"run: trtrag build-engine --{precision} --backend {backend}"


def load_engine_manifest(recipe: Recipe, backend: str, precision: str) -> tuple[Path, dict]:
    """An engine's folder and manifest.json, refusing a missing engine or one built under another key."""
    folder = engine_dir(recipe, backend, precision)
    if not (folder / MANIFEST).is_file():
        raise TrtragError(f"no {backend} {precision} engine in {folder}",
                          ("run: trtrag calibrate && " if precision == "int8" else "run: ")
                          + _rebuild_hint(precision, backend).removeprefix("run: "))
    manifest = read_json(folder / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("model") != recipe.encoder.model:
        raise TrtragError(f"the engine in {folder} was built for {manifest.get('model')} (format "
                          f"{manifest.get('format')})", _rebuild_hint(precision, backend))
    return folder, manifest


def check_ort_engine(recipe: Recipe, manifest: dict, folder: Path) -> None:
    """Refuse an ORT engine whose versions or calibration no longer match this machine and workspace."""
    now = library_versions(("onnxruntime", "onnx"))
    if manifest.get("versions") != now:
        raise TrtragError(f"the engine in {folder} was built with {manifest.get('versions')}, this is {now}",
                          _rebuild_hint(manifest["precision"], "onnxruntime"))
    if manifest.get("calibration"):
        _, calibration = load_calibration(recipe)
        if calibration["id"] != manifest["calibration"]:
            raise TrtragError(f"the engine in {folder} was built from calibration {manifest['calibration']}, "
                              f"the workspace now holds {calibration['id']}",
                              _rebuild_hint(manifest["precision"], "onnxruntime"))
    path = folder / manifest["file"]
    if not path.is_file():
        raise TrtragError(f"{path} is missing", _rebuild_hint(manifest["precision"], "onnxruntime"))


def open_engine_encoder(recipe: Recipe, backend: str):
    """The encoder served by a built engine (onnxruntime int8, tensorrt)."""
    from trtrag_cli.encode.models import model_info

    enc = recipe.encoder
    folder, manifest = load_engine_manifest(recipe, backend, enc.precision)
    if backend == "tensorrt":
        from trtrag_cli.encode import tensorrt as trt_encoder

        calibration = load_calibration(recipe)[1]["id"] if enc.precision == "int8" else None
        return trt_encoder.open_engine(recipe, folder, manifest, calibration)
    check_ort_engine(recipe, manifest, folder)
    from trtrag_cli.encode.onnxruntime import RUN_TOKENS, OrtEncoder

    tag = hashlib.sha256(json.dumps([manifest.get("calibration"), manifest.get("form"),
                                     manifest.get("kept_float")]).encode()).hexdigest()[:8]
    run_tokens = (manifest.get("run_tokens") or {}).get("chosen", RUN_TOKENS)
    return OrtEncoder(folder / manifest["file"], model_info(enc.model), threads=enc.threads or 0,
                      max_tokens=enc.max_tokens, label=f"onnxruntime-{enc.precision}-{tag}", run_tokens=run_tokens)


def load_calibration(recipe: Recipe) -> tuple[Path, dict]:
    """The published calibration folder and its report, or a user error saying how to make one."""
    folder = recipe.workspace_dir() / CALIBRATION_DIR
    if not (folder / REPORT).is_file():
        raise TrtragError(f"no calibration in {folder}", "run: trtrag calibrate")
    report = read_json(folder / REPORT)
    if report.get("model") != recipe.encoder.model:
        raise TrtragError(f"the calibration in {folder} is for {report.get('model')}, not {recipe.encoder.model}",
                          "run: trtrag calibrate")
    return folder, report
