"""The fast decoder on a CUDA GPU: CUDA graphs and compilation change speed, not tokens.

Marked `gpu`; skips with the reason without torch and a CUDA GPU. A random 4-layer Llama in float32
(TF32 off) so that transformers and our loop can be compared token for token.
"""

from __future__ import annotations

import pytest

from trtrag_cli.generate.base import SamplingParams
from trtrag_cli.generate.prompt import Prompt
from trtrag_cli.util.gpu import torch_gpu_count

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch_gpu_count() == 0, reason="needs torch with a CUDA GPU")]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         eos_token_id=None, pad_token_id=0)
    vocab = {f"t{i}": i for i in range(512)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                  pad_token="t0", unk_token="t1")
    return LlamaForCausalLM(config).cuda().eval(), tok


def _prompts(n_rows, lengths=(37, 300, 5, 129)):
    import random

    rng = random.Random(1)
    return [Prompt("", [rng.randrange(2, 512) for _ in range(lengths[i % len(lengths)])], []) for i in range(n_rows)]


@pytest.mark.parametrize("compile,kernels,deterministic",
                         [(False, False, False), (True, False, False), (True, True, False), (True, True, True)],
                         ids=["torch-layers", "compiled-layers", "triton-kernels", "triton-kernels-ordered"])
def test_graph_decoder_gives_transformers_tokens(model_and_tokenizer, compile, kernels, deterministic):
    from trtrag_cli.generate.hf import TransformersBackend

    model, tok = model_and_tokenizer
    reference = TransformersBackend.from_model(model, tok, decode="transformers", static_cache=False)
    prompts = _prompts(4)
    greedy = SamplingParams(max_new_tokens=300)   # crosses a 256-position attention span
    expected = [reference.generate([p], greedy)[0].text for p in prompts]
    fast = TransformersBackend.from_model(model, tok, decode="graph", compile=compile, kernels=kernels,
                                          deterministic=deterministic)
    assert fast.decoder.graphs
    assert (fast.decoder.kernels is not None) == kernels   # torch on a GPU brings triton
    got = fast.generate(prompts, greedy)          # four ragged rows in one batch
    assert [g.text for g in got] == expected
    fast.decoder.graphs = False                   # the same loop without graphs: the very same tokens
    assert [g.text for g in fast.generate(prompts, greedy)] == expected
    fast.decoder.graphs = True
    sampled = SamplingParams(max_new_tokens=64, temperature=0.8, top_k=40, top_p=0.9, seed=5)
    assert fast.generate(prompts[:2], sampled)[0].text == fast.generate(prompts[:2], sampled)[0].text
    assert "".join(fast.stream(prompts[0], greedy)) == expected[0]


def test_packed_matrices_decode_the_same_tokens(model_and_tokenizer):
    """answer.generator.pack_weights (from_model packs by default): a bf16 model's one-row steps read 12-bit packed copies of its
    matrices, and greedy decoding gives the tokens it gives from the matrices themselves (both ordered, so
    that each run repeats bit for bit)."""
    import copy

    import torch

    from trtrag_cli.generate.decode.kernels import Packed
    from trtrag_cli.generate.hf import TransformersBackend

    model, tok = model_and_tokenizer
    half = copy.deepcopy(model).to(torch.bfloat16)
    prompts, greedy = _prompts(2), SamplingParams(max_new_tokens=48)
    plain = TransformersBackend.from_model(half, tok, decode="graph", compile=True, deterministic=True,
                                           pack_weights=False)
    expected = [plain.generate([p], greedy)[0].text for p in prompts]
    packed = TransformersBackend.from_model(half, tok, decode="graph", compile=True, deterministic=True)
    assert packed.decoder.packed_note == ""
    assert all(isinstance(m, Packed) for m in packed.decoder.step_matrix_list())
    assert [packed.generate([p], greedy)[0].text for p in prompts] == expected


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-layers", "triton-kernels"])
def test_concurrent_streams_on_the_gpu_match_their_text_alone(model_and_tokenizer, kernels):
    """Continuous batching with CUDA graphs: eight streams of ragged prompts and budgets, started together,
    join and leave the running batch (padded graph buckets, rows moved as others finish); each one's
    greedy text equals its text decoded alone (float32, so a batch width cannot flip a near tie)."""
    import threading

    from trtrag_cli.generate.hf import TransformersBackend

    model, tok = model_and_tokenizer
    fast = TransformersBackend.from_model(model, tok, decode="graph", compile=False, kernels=kernels,
                                          deterministic=True, pack_weights=False)
    prompts = _prompts(8, lengths=(37, 300, 5, 129, 64, 211, 17, 90))
    budgets = [SamplingParams(max_new_tokens=n) for n in (40, 300, 12, 96, 150, 33, 270, 8)]
    alone = ["".join(fast.stream(p, s)) for p, s in zip(prompts, budgets)]
    got: list = [None] * len(prompts)

    def run(i: int) -> None:
        got[i] = "".join(fast.stream(prompts[i], budgets[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
