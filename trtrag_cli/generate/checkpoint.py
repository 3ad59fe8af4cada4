"""Checks a local Hugging Face model folder before a generator backend loads it."""

from __future__ import annotations

from pathlib import Path

from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError


def check_causal_lm(path: str):
    """The model folder's config, or a TrtragError saying why it is not a usable causal LM."""
    transformers = deps.require("transformers", "the transformers generator")
    folder = Path(path).expanduser()
    if not str(path) or not folder.is_dir():
        raise TrtragError(f"generator model folder '{path}' does not exist",
                          "set answer.generator.model to a local Hugging Face model folder (config.json, weights, tokenizer)")
    if not (folder / "config.json").is_file():
        raise TrtragError(f"'{folder}' has no config.json: not a Hugging Face model folder",
                          "point answer.generator.model at the folder written by save_pretrained()")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    # BERT has a causal-LM head class too; what the checkpoint was saved as tells an encoder apart.
    heads = [a for a in (config.architectures or []) if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.model_type not in causal or (config.architectures and not heads):
        raise TrtragError(f"'{folder}' holds a {config.model_type} model, which is not a causal language model",
                          "use a decoder model (Llama, Mistral, Qwen, ...) for answer.generator.backend transformers")
    return config
