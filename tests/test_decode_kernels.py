"""decode_kernels against torch: the Triton matrix-vector kernel (RMSNorm, SwiGLU, bias, K splits added
into the residual) and the fused RoPE / cache-write / attention kernel (equal runs of positions, tensor-core dots).

On a CUDA GPU the kernels run compiled (bf16 and float32); without one they run in Triton's interpreter
on the CPU (float32 and float16: the interpreter does not handle bf16), so the arithmetic is checked on
every machine that has triton. Skips with the reason where triton is not installed.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
if not CUDA:   # triton reads this when it is first imported; nothing else here runs triton on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (torch's CUDA wheels bring it)")
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def dk():
    from trtrag_cli.generate.decode import kernels as decode_kernels

    return decode_kernels


def _close(got, want, dtype):
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), want, atol=tolerance, rtol=tolerance), (got.float() - want).abs().max()


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [(32, 64, 4, 1, 1), (16, 32, 2, 3, 1), (16, 64, 4, 2, 2)],
                         ids=["whole-rows", "three-k-splits", "halves-paired"])
@pytest.mark.parametrize("shape", [(96, 160), (64, 128)], ids=["ragged", "whole-tiles"])
def test_matvec_prologues_and_epilogues(dk, dtype, tile, shape):
    torch.manual_seed(0)
    n, k = shape     # ragged: not a multiple of the tiles, so the masks are exercised; whole tiles load unmasked
    x, w = _rand(k, dtype=dtype), _rand(n, k, dtype=dtype, scale=0.1)
    bias, gain = _rand(n, dtype=dtype), _rand(k, dtype=dtype)
    xf, wf = x.float(), w.float()
    _close(dk.matvec(x, w, bias=bias, tile=tile), wf @ xf + bias.float(), dtype)
    normed = xf * torch.rsqrt(xf.pow(2).mean() + 1e-5) * gain.float()
    _close(dk.matvec(x, w, gain=gain, eps=1e-5, tile=tile), wf @ normed, dtype)

    residual = _rand(n, dtype=torch.float32)          # the float32 residual stream, added into in place
    expected = residual + wf @ xf
    assert dk.matvec(x, w, out=residual, tile=tile) is residual
    _close(residual, expected, dtype)
    expected = residual + wf @ xf
    dk.matvec(x, w, out=residual, tile=tile)
    _close(residual, expected, dtype)               # twice: added to what is there, not stored


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [(32, 64, 4, 1, 2), (8, 32, 2, 1, 2)], ids=["wide", "narrow"])
def test_matvec_swiglu_pairs_gate_and_up_rows(dk, dtype, tile):
    torch.manual_seed(3)
    n, k = 72, 160
    x, gate_up, gain = _rand(k, dtype=dtype), _rand(2 * n, k, dtype=dtype, scale=0.1), _rand(k, dtype=dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean() + 1e-5) * gain.float()
    gate, up = gate_up.float()[:n] @ normed, gate_up.float()[n:] @ normed
    got = dk.matvec(x, gate_up, gain=gain, eps=1e-5, swiglu=True, tile=tile)
    assert got.shape == (n,)
    _close(got, torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [(8, 32, 2, 1, 1), (16, 64, 4, 1, 2)], ids=["rows", "halves-asked"])
def test_matvec_embeds_the_token_and_writes_the_greedy_one(dk, dtype, tile):
    """The ends of a step: the first matrix reads the embedding row its token names (and starts the residual
    stream with it); the head writes the argmax (ties to the first column) and moves the position on."""
    torch.manual_seed(5)
    vocab, k = 90, 160
    table, w, gain = _rand(vocab, k, dtype=dtype), _rand(vocab, k, dtype=dtype, scale=0.1), _rand(k, dtype=dtype)
    w[17] += 0.5 * w[17].sign()
    w[61] = w[17]                          # rows 17 and 61 tie whatever the input: 17 must win where they lead
    tokens = torch.tensor([33], device=DEVICE)
    positions = torch.tensor([7], device=DEVICE)
    scratch = torch.zeros(1, dtype=torch.long, device=DEVICE)
    residual = torch.full((k,), float("nan"), device=DEVICE)
    logits = dk.matvec(table, w, gain=gain, eps=1e-5, tile=tile, token=tokens, copy_into=residual)
    xf = table[33].float()
    normed = xf * torch.rsqrt(xf.pow(2).mean() + 1e-5) * gain.float()
    _close(logits, w.float() @ normed, dtype)
    assert torch.equal(residual, xf)
    for step in range(3):                  # the scratch value must be left at zero for the next call
        x = table[int(tokens[0])]
        logits = dk.matvec(x, w, gain=gain, eps=1e-5, tile=tile, greedy=(tokens, positions, scratch))
        assert int(tokens[0]) == int(logits.argmax()), step
        assert int(positions[0]) == 8 + step and not scratch.any()
    x = torch.where(w[17] > 0, 1.0, -1.0).to(DEVICE, dtype)          # rows 17 and 61 lead, tied
    logits = dk.matvec(x, w, tile=tile, greedy=(tokens, positions, scratch))
    assert logits[17] == logits[61] == logits.max() and int(tokens[0]) == 17
    w[40] = float("nan")                   # a NaN logit wins, as in torch.argmax: never a token past the vocabulary
    dk.matvec(x, w, tile=tile, greedy=(tokens, positions, scratch))
    assert int(tokens[0]) == 40


def test_ordered_tiles_never_split_k(dk):
    """answer.generator.deterministic: the narrow matrices' K is split over programs that add atomically, unless ordered."""
    assert dk._tile(5120, 13824, True, False)[3] > 1                    # down in the Llama-2-13B step
    assert dk._tile(5120, 13824, True, False, ordered=True)[3] == 1
    assert dk._tile(4096, 14336, True, False, ordered=True)[3] == 1     # a shape TILES does not list


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the interpreter runs programs one by one, in order")
def test_ordered_matvec_repeats_bit_for_bit(dk):
    """With K splits the residual's atomic adds land in whatever order the programs finish; ordered, every run
    gives the same bits (down's shape in the Llama-2-13B step)."""
    torch.manual_seed(6)
    x, w = _rand(13824, dtype=torch.bfloat16), _rand(5120, 13824, dtype=torch.bfloat16, scale=0.02)
    start = _rand(5120, dtype=torch.float32)
    runs = []
    for _ in range(20):
        residual = start.clone()
        dk.matvec(x, w, out=residual, ordered=True)
        runs.append(residual)
    assert all(torch.equal(runs[0], run) for run in runs)
    _close(runs[0], start + w.float() @ x.float(), torch.bfloat16)


def _bits(t):
    return t.view(torch.int16)


def test_packed_matrix_gives_back_every_bf16_bit(dk):
    """decode_kernels.Packed stores a bf16 matrix in 12 bits a weight and loses nothing: normal weights, and
    those outside the codes' 16 binades (zeros of either sign, subnormals, huge values, infinities, NaN) that
    go to the fix list."""
    torch.manual_seed(7)
    w = (torch.randn(48, 512) * 0.02).to(torch.bfloat16)
    odd = [0.0, -0.0, 1e-40, -3e-39, 1e-12, 7.5, -300.0, float("inf"), float("-inf"), float("nan"), 2.0 ** -20]
    w[5, :len(odd)] = torch.tensor(odd).to(torch.bfloat16)
    packed = dk.Packed(w.to(DEVICE), block_k=256)
    assert packed.fix_count >= 10
    assert torch.equal(_bits(packed.unpacked().cpu()), _bits(w))
    assert packed.low.numel() + packed.codes.numel() == w.numel() * 3 // 2
    with pytest.raises(ValueError, match="whole tiles"):
        dk.Packed(w[:, :300].contiguous().to(DEVICE), block_k=256)
    as_float = w.float().to(DEVICE)
    assert dk.pack(as_float) is as_float                        # only bf16 packs
    assert isinstance(dk.pack(w.to(DEVICE)), dk.Packed)


@pytest.mark.parametrize("tile", [(16, 128, 4, 1, 1), (8, 256, 2, 3, 1), (16, 128, 4, 2, 2)],
                         ids=["whole-rows", "three-k-splits", "halves-paired"])
def test_packed_matvec_matches_torch(dk, tile):
    """matvec over a Packed matrix as over the bf16 one: bias, RMSNorm, the residual added into (with K splits),
    pairs of halves; rows 3 and 40 carry more fixes than one chunk of the kernel's, some in each K split.
    x in float32 (the residual stream) and in the model's dtype (bf16 on a GPU; the interpreter reads it as
    float32 there, with the weights still packed bf16)."""
    torch.manual_seed(8)
    n, k = 64, 768
    w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
    w[3, ::7] = 1e-30                       # 110 fixes in one row, across all three K splits
    w[40, 100:150] = -4.0
    packed = dk.Packed(w.to(DEVICE), block_k=tile[1])
    assert packed.fix_count > 2 * 32
    wf = w.float().to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16) if CUDA else (torch.float32,):
        x, bias, gain = _rand(k, dtype=dtype), _rand(n, dtype=dtype), _rand(k, dtype=dtype)
        xf = x.float()
        _close(dk.matvec(x, packed, bias=bias, tile=tile), wf @ xf + bias.float(), torch.bfloat16)
        normed = xf * torch.rsqrt(xf.pow(2).mean() + 1e-5) * gain.float()
        _close(dk.matvec(x, packed, gain=gain, eps=1e-5, tile=tile), wf @ normed, torch.bfloat16)
        residual = _rand(n, dtype=torch.float32)
        expected = residual + wf @ xf
        dk.matvec(x, packed, out=residual, tile=tile)
        assert torch.allclose(residual, expected, atol=1e-4, rtol=1e-4), (residual - expected).abs().max()


def test_packed_matvec_swiglu_embedding_and_greedy(dk):
    """The other ends of a step over Packed matrices: gate and up paired with SwiGLU, the first layer reading
    its token's embedding row, and the head writing the greedy token."""
    torch.manual_seed(9)
    n, k = 32, 512
    gate_up = (torch.randn(2 * n, k) * 0.05).to(torch.bfloat16)
    gate_up[n + 3, 17] = 5.0                                   # a fix in the up half
    x, gain = _rand(k, dtype=torch.float32), _rand(k, dtype=torch.float32)
    normed = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * gain
    both = gate_up.float().to(DEVICE) @ normed
    got = dk.matvec(x, dk.Packed(gate_up.to(DEVICE), 256), gain=gain, eps=1e-5, swiglu=True, tile=(8, 256, 4, 1, 2))
    _close(got, torch.nn.functional.silu(both[:n]) * both[n:], torch.bfloat16)

    vocab = 96
    table = _rand(vocab, k, dtype=torch.bfloat16 if CUDA else torch.float32)
    w = (torch.randn(vocab, k) * 0.05).to(torch.bfloat16)
    w[50] = w[12]                                              # tied rows: the first wins
    head = dk.Packed(w.to(DEVICE), 512)
    tokens, positions = torch.tensor([9], device=DEVICE), torch.tensor([3], device=DEVICE)
    scratch = torch.zeros(1, dtype=torch.long, device=DEVICE)
    residual = torch.full((k,), float("nan"), device=DEVICE)
    logits = dk.matvec(table, head, gain=gain, eps=1e-5, tile=(16, 512, 4, 1, 1), token=tokens, copy_into=residual)
    row = table[9].float()
    _close(logits, w.float().to(DEVICE) @ (row * torch.rsqrt(row.pow(2).mean() + 1e-5) * gain), torch.bfloat16)
    assert torch.equal(residual, row)
    probe = torch.where(w[12] > 0, 1.0, -1.0).to(DEVICE)
    logits = dk.matvec(probe, head, tile=(16, 512, 4, 1, 1), greedy=(tokens, positions, scratch))
    assert int(tokens[0]) == 12 == int(logits.float().argmax()) and int(positions[0]) == 4 and not scratch.any()


def test_decoder_gives_the_same_tokens_from_packed_matrices(dk):
    """GraphDecoder.pack_weights: a random bf16 Llama decodes the same greedy tokens through the kernels with its
    matrices packed as with them as they are (every matrix of this shape packs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trtrag_cli.generate.decode.graph import GraphDecoder

    torch.manual_seed(10)
    config = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16).eval()
    decoder = GraphDecoder(model, graphs=False)
    decoder.kernels = dk
    prompt = [int(t) for t in torch.randint(1, 96, (9,))]
    try:
        with torch.inference_mode():
            plain = decoder.generate([prompt], 5)[0]
            assert decoder.pack_weights() == 5 and decoder.packed_note == ""
            assert decoder.generate([prompt], 5)[0] == plain
    finally:
        decoder.close()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["one-query-head-each", "groups-of-two", "one-kv-head"])
@pytest.mark.parametrize("splits", [1, 3, 7], ids=lambda n: f"{n}-runs")
def test_fused_attention_matches_torch(dk, dtype, kv_heads, splits):
    torch.manual_seed(2)
    heads, dim, length, scale = 4, 16, 80, 0.25
    # Rows at the first position, the last, and either side of a 16-position block edge; with 7 runs some
    # programs have no positions at all.
    positions = torch.tensor([5, 66, 0, 63, 64], device=DEVICE)
    qkv = _rand(5, (heads + 2 * kv_heads) * dim, dtype=dtype)
    cos, sin = _rand(100, dim, dtype=dtype), _rand(100, dim, dtype=dtype)
    k_cache, v_cache = _rand(6, kv_heads, length, dim, dtype=dtype), _rand(6, kv_heads, length, dim, dtype=dtype)
    k_want, v_want = k_cache.float(), v_cache.float()
    qs, ks, vs = qkv.float().split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    expected = []
    for row, at in enumerate(positions.tolist()):
        c, s = cos[at].float(), sin[at].float()
        k_want[row, :, at] = _rotate(ks[row].view(kv_heads, dim), c, s)
        v_want[row, :, at] = vs[row].view(kv_heads, dim)
        keys = k_want[row, :, :at + 1].repeat_interleave(heads // kv_heads, 0)
        values = v_want[row, :, :at + 1].repeat_interleave(heads // kv_heads, 0)
        q = _rotate(qs[row].view(heads, dim), c, s) * scale
        expected.append(torch.einsum("hl,hld->hd", torch.softmax(torch.einsum("hd,hld->hl", q, keys), -1),
                                     values).reshape(-1))
    counts = torch.zeros(5 * heads, dtype=torch.int32, device=DEVICE)
    for _ in range(2):   # twice: the run counters must be left at zero for the next call
        got = dk.fused_attention(qkv, cos, sin, positions, k_cache, v_cache, counts, scale, heads, splits=splits,
                                 block=16)
        _close(got, torch.stack(expected), dtype)
        _close(k_cache, k_want, dtype)                # the new k and v at each row's position, nothing else
        _close(v_cache, v_want, dtype)
        assert not counts.any()


def test_decoder_through_the_kernels_gives_transformers_tokens(dk):
    """The whole one-row step (graph_decode.GraphDecoder._kernel_step) against transformers' greedy
    generate: a random Qwen2 (Llama's layers with Q/K/V biases) with grouped K/V heads, float32, prompts
    either side of a 64-position attention block edge."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trtrag_cli.generate.decode.graph import GraphDecoder

    torch.manual_seed(4)
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=None, pad_token_id=0)
    model = Qwen2ForCausalLM(config).to(DEVICE).eval()
    for layer in model.model.layers:   # random biases, so that adding them is checked
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(projection.bias, std=0.5)
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [[int(t) for t in torch.randint(1, 96, (n,))] for n in (5, 126)]
    new = 12
    with torch.inference_mode():
        expected = [model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False)[0, len(p):].tolist() for p in prompts]
    decoder = GraphDecoder(model, graphs=False)
    decoder.kernels = dk          # on a GPU it is already; on the CPU this runs them in the interpreter
    try:
        assert [decoder.generate([p], new)[0] for p in prompts] == expected
    finally:
        decoder.close()


def test_kernels_compile_for_hopper_without_spills(dk):
    """The configurations a Llama-2-13B step launches compile for sm_90 here, GPU or not (triton's own ptxas),
    with nothing spilled to local memory, and the attention program fits ATTENTION's count per SM in the
    register file (its run count assumes they all start at once)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton carries no NVIDIA backend tools (ptxas, cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_compile.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"matvec qkv", "matvec o", "matvec gate_up", "matvec down", "matvec head", "matvec qkv, first layer",
            "matvec head, greedy", "packed qkv", "packed o", "packed gate_up", "packed down", "packed head, greedy",
            "packed qkv, first layer", "attention 40 heads", "attention groups of 8"} <= set(report)
    assert all(usage["stack_bytes"] == 0 for usage in report.values()), report
    threads = 32 * dk.ATTENTION["warps"] * dk.ATTENTION["programs_per_sm"]
    assert all(report[name]["registers"] * threads <= 65536 for name in report if name.startswith("attention"))
