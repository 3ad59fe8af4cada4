"""Shared fixtures: every test works in a temporary workspace; the encoder is exported once a session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "corpus"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tiny_llama(out: Path, layers: int = 2, hidden: int = 64) -> Path:
    """A Llama with random weights (seed 0) and a byte-level BPE tokenizer trained on examples/corpus, saved in
    `out` (the benchmarks build theirs with it too)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(EXAMPLES.rglob("*")) if p.is_file()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a byte-level BPE tokenizer trained on examples/corpus."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", autouse=True)
def _encoder_cache(tmp_path_factory):
    """One ONNX export per test session, shared by every workspace."""
    os.environ.setdefault("TRTRAG_CACHE", str(tmp_path_factory.mktemp("trtrag-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def make_recipe(tmp_path):
    """Write a recipe into tmp_path with its workspace there too; keyword sections override defaults."""

    def make(name: str = "t", **sections) -> Path:
        return write_recipe(tmp_path / f"{name}.yaml", name, tmp_path / "ws", **sections)

    return make


def write_recipe(path: Path, name: str, workspace: Path, **sections) -> Path:
    """The default recipe with this name and workspace, sections merged over it (a dict) or replaced, at path."""
    data = yaml.safe_load((ROOT / "recipes" / "default.yaml").read_text())
    data["name"] = name
    data["workspace"] = str(workspace)
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def corpus_copy(tmp_path) -> Path:
    """A writable copy of the example corpus."""
    dst = tmp_path / "corpus"
    shutil.copytree(EXAMPLES, dst)
    return dst


class Cli:
    """Runs `trtrag` in-process and parses --json output."""

    def __init__(self):
        from trtrag_cli.cli.app import app

        self.app = app
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool | None = True):
        result = self.runner.invoke(self.app, [str(a) for a in args], catch_exceptions=False)
        if ok is True:
            assert result.exit_code == 0, result.output
        elif ok is False:
            assert result.exit_code != 0, result.output
        return result

    def json(self, *args: str, ok: bool | None = True):
        result = self(*args, "--json", ok=ok)
        return json.loads(result.stdout)


@pytest.fixture
def cli() -> Cli:
    return Cli()


GPU_WORDS = ("GPU", "CUDA", "cuda")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that skips for want of a GPU must carry the `gpu` marker, so `make test-gpu` runs it."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or item.get_closest_marker("gpu"):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(word in reason for word in GPU_WORDS) and "has a GPU" not in reason:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} skips for want of a GPU ({reason}) but has no `gpu` marker"
