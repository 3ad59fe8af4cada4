"""The TensorRT-LLM generator.

The `trtllm-serve` command line and the one-line errors are checked anywhere. Tests marked `tensorrt_llm`
need TensorRT-LLM (and generation a CUDA GPU); they run a 2-layer Llama with random weights and a byte-level
BPE tokenizer trained here on examples/corpus, so nothing comes from the hub and the text is gibberish, but
seeding, greedy streaming, batching and stop sequences are real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trtrag_cli.generate.base import SamplingParams
from trtrag_cli.generate.prompt import build_prompt
from trtrag_cli.generate.trtllm import TensorRTLLMBackend, sampling_params, serve_command
from trtrag_cli.util import deps
from trtrag_cli.util.errors import MissingDependency, TrtragError

ROOT = Path(__file__).resolve().parents[1]


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(zip(argv[2::2], argv[3::2]))


def test_serve_command_is_the_documented_trtllm_serve_line():
    argv = serve_command("/models/llama-fp8", host="0.0.0.0", port=9000, tensor_parallel=2,
                         gpu_memory_fraction=0.8, max_batch_size=16)
    assert argv[:2] == ["trtllm-serve", "/models/llama-fp8"]
    assert len(argv) % 2 == 0  # every flag takes a value
    assert _flags(argv) == {"--host": "0.0.0.0", "--port": "9000", "--backend": "pytorch", "--tp_size": "2",
                            "--max_batch_size": "16", "--kv_cache_free_gpu_memory_fraction": "0.8"}
    defaults = _flags(serve_command("m"))
    assert (defaults["--host"], defaults["--port"], defaults["--tp_size"]) == ("127.0.0.1", "8000", "1")
    assert (defaults["--kv_cache_free_gpu_memory_fraction"], defaults["--max_batch_size"]) == ("0.9", "8")


def test_a_missing_model_folder_is_a_one_line_error():
    with pytest.raises(TrtragError) as err:
        TensorRTLLMBackend("/nonexistent")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("generator model folder '/nonexistent' does not exist (set answer.model")


@pytest.mark.skipif(deps.available("tensorrt_llm"), reason="tensorrt_llm is installed here")
def test_without_tensorrt_llm_the_error_names_the_install(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MissingDependency) as err:
        TensorRTLLMBackend(str(tmp_path))
    assert "\n" not in str(err.value)
    assert err.value.message.startswith("tensorrt-llm is not installed for the tensorrt-llm generator")
    assert "tensorrt-llm" in err.value.hint


def test_import_is_light():
    code = ("import sys, trtrag_cli.generate.trtllm;"
            "print(sorted({'tensorrt_llm', 'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- needs TensorRT-LLM

@pytest.fixture(scope="module")
def trtllm():
    return pytest.importorskip("tensorrt_llm", reason="needs TensorRT-LLM (pip install tensorrt-llm)")


@pytest.mark.tensorrt_llm
def test_sampling_params_follow_the_documented_conventions(trtllm):
    greedy = sampling_params(SamplingParams(max_new_tokens=12, stop=("\n\n",), seed=3), trtllm)
    assert isinstance(greedy, trtllm.SamplingParams)
    assert (greedy.max_tokens, greedy.temperature, greedy.stop, greedy.seed) == (12, 0.0, ["\n\n"], 3)
    assert greedy.top_k is None and greedy.top_p is None
    sampled = sampling_params(SamplingParams(temperature=0.7, top_k=0, top_p=0.9, seed=None), trtllm)
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.stop) == (0.7, 0, 0.9, None)
    assert isinstance(sampled.seed, int)  # unseeded draws a fresh seed instead of the runtime's fixed 0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, trtllm) -> Path:
    """2 layers, head size 64 (a size the attention kernels take), bf16 weights, tokenizer trained locally."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda is unavailable)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama-trtllm")
    corpus = [p.read_text(encoding="utf-8", errors="ignore")
              for p in sorted((ROOT / "examples" / "corpus").rglob("*")) if p.is_file()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", model_max_length=512)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backend(tiny_llama):
    with TensorRTLLMBackend(str(tiny_llama), gpu_memory_fraction=0.2, max_batch_size=4, max_seq_len=512) as b:
        yield b


def _prompt(backend, question: str = "How long is the warranty?"):
    passages = [{"text": "The warranty lasts three years for VX sensors.", "source": "policies/warranty.md"},
                {"text": "Orders ship from Tacoma within two days.", "source": "faq/shipping.md"}]
    return build_prompt(backend.tokenizer, question, passages, backend.context, 32)


@pytest.mark.tensorrt_llm
def test_seeded_sampling_repeats(backend):
    prompt = _prompt(backend)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    first, second = (backend.generate([prompt], params)[0] for _ in range(2))
    assert first.text == second.text
    assert first.prompt_tokens == len(prompt.ids)


@pytest.mark.tensorrt_llm
def test_greedy_streaming_joins_to_the_generated_text(backend):
    prompt = _prompt(backend)
    params = SamplingParams(max_new_tokens=24)
    generated = backend.generate([prompt], params)[0]
    assert "".join(backend.stream(prompt, params)) == generated.text
    assert generated.total_ms > 0 and generated.finish in ("stop", "length")


@pytest.mark.tensorrt_llm
def test_a_batch_comes_back_in_prompt_order(backend):
    prompts = [_prompt(backend, q) for q in ("Where do orders ship from?", "Warranty?", "What about VX sensors?")]
    batch = backend.generate(prompts, SamplingParams(max_new_tokens=8))
    assert [g.prompt_tokens for g in batch] == [len(p.ids) for p in prompts]
    assert len({len(p.ids) for p in prompts}) == 3


@pytest.mark.tensorrt_llm
def test_stop_sequences_end_the_text_in_both_modes(backend):
    prompt = _prompt(backend)
    free = backend.generate([prompt], SamplingParams(max_new_tokens=32))[0].text
    if len(free) < 12:
        pytest.skip("the random model ended too early to take a stop sequence from its text")
    stop = free[6:9]
    expected = free[:free.find(stop)]
    params = SamplingParams(max_new_tokens=32, stop=(stop,))
    stopped = backend.generate([prompt], params)[0]
    assert (stopped.text, stopped.finish) == (expected, "stop")
    assert "".join(backend.stream(prompt, params)) == expected
