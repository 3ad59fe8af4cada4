"""Triton kernels for one decode step of a Llama-family model on a CUDA GPU, one row (batch 1).

Why: at batch 1 a decode step is reading the weights once. On an H200 with the Llama-2-13B shape the
compiled torch layers took 7.8 ms a step where reading 25.7 GB allows about 5.4: cuBLAS's
matrix-vector kernels read the narrow matrices (output and down projections) at 3.3-3.6 TB/s,
attention walked the whole 256-rounded span behind a mask, and RMSNorm, RoPE, SiLU and the cache writes
were kernels of their own. Here a layer is five kernels:
  - `matvec` for Q/K/V with the input RMSNorm folded in: W (x * gain) is summed along K together with
    sum(x^2), and 1/rms scales the result at the end (no normalised copy of x is written);
  - `fused_attention`: RoPE on q and on the new k, the new k and v stored in the cache, and attention
    over the positions so far (no mask, nothing read past them), cut into equal runs for as many
    programs as the GPU holds at once; each program walks its run in blocks with tensor-core dots (the
    query heads sharing a K/V head are the rows), and the last one to finish combines them all;
  - `matvec` for the output projection, added into the float32 residual stream;
  - `matvec` for gate and up together (RMSNorm folded in; each program sums a block of gate rows and
    the matching up rows) writing SiLU(gate) * up;
  - `matvec` for down, added into the residual stream; its K is split over programs (atomic adds).
The step's ends need no kernels of their own: the first Q/K/V `matvec` reads the token's embedding row
(and starts the residual stream with it), and for greedy decoding the head's `matvec` takes the argmax,
with a one-program kernel after it writing the token and moving the position on.
Each matrix program streams [BLOCK_N x BLOCK_K] weight tiles with the next tile's load in flight while
the current one is summed, in float32; weights are marked to leave L2 first (each is read once a step,
the activations many times). On Hopper the kernels use programmatic dependent launch: a kernel
starts loading its weights (or older cache positions) while the previous one finishes, then waits for
it before reading its output. bf16 matrices can be read from lossless 12-bit copies instead (`Packed`,
`_packed_kernel`): 1.5 bytes a weight where the step is bound by reading them. H200 and H100 figures are in
docs/benchmarks.md ("Generation: Llama-2-13B shape").

Imported only when a CUDA GPU and triton are present (graph_decode.GraphDecoder). Under
TRITON_INTERPRET=1 the same kernels run on the CPU, which is how the tests check them against torch
on machines without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, warps, K splits, halves) per weight shape [N, K] (for SwiGLU, N is the gate's rows):
# the fastest of benchmarks/gpu_kernels.py's sweep on an H200 for the Llama-2-13B shapes. halves = 2: each
# program sums BLOCK_N rows of the matrix's first half and the same rows of its second half (SwiGLU's
# gate and up always). Other shapes get _tile's rule, which follows the same results.
TILES: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (15360, 5120): (8, 256, 4, 1, 1), (5120, 5120): (8, 512, 4, 1, 1), (13824, 5120): (4, 256, 4, 1, 2),
    (5120, 13824): (8, 256, 4, 4, 2), (32000, 5120): (8, 256, 4, 1, 1)}


def _tile(n: int, k: int, accumulate: bool, swiglu: bool, ordered: bool = False) -> tuple[int, int, int, int, int]:
    if (n, k) in TILES and not (ordered and TILES[n, k][3] > 1):
        return TILES[n, k]
    if swiglu:
        return 4, 256, 4, 1, 2
    if accumulate:                # narrow matrices: long ones split K so that enough programs run, unless ordered
        # (whole rows: for down on the H200, 8 x 512 took 34.2 us against four splits' 33.5, run 20)
        return (8, 512, 4, 1, 1) if k <= 8192 or ordered else (16, 256, 4, -(-k // 4096), 1)
    return 8, 256, 4, 1, 1


# fused_attention's programs: cache positions per block, warps, and programs per multiprocessor (the
# positions so far are cut into that many runs per SM for one wave), the fastest of gpu_kernels.py's
# sweep on an H200 (Llama-2-13B shape, 1,088 positions): 10.0 us where the previous kernel, one
# program per 128-position chunk, took 12.0.
ATTENTION = {"block": 64, "warps": 4, "programs_per_sm": 2}

# Matrices whose rows and K fill whole tiles load them without per-element masks: fewer instructions a
# weight, since on a card at its power limit the step's time follows its energy. Measured on two H200s: at
# full clock the same 6.53 ms a step took 4.50 J against 4.53 (run 43); at the power limit, 6.530 against
# 6.533 ms (run 44). False: always masked (the probes' comparison).
EVEN = True


@triton.jit
def _await_previous(PDL: tl.constexpr):
    """With programmatic dependent launch (Hopper on): let the next kernel start launching, then wait until
    the previous one is done and its writes are visible. Everything before this may only read weights."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _weights(ptr, start, col_ok, last, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """A weight tile: rows at ptr, the BLOCK_K columns from start (those before last); marked to leave L2
    first. EVEN (every row valid, whole tiles): a tile is all before last or all past it (the one after the
    last), so one condition guards the load and nothing is zeroed."""
    ks = start + tl.arange(0, BLOCK_K)
    if EVEN:
        whole = tl.full((1, BLOCK_K), start, tl.int32) < last          # the same for every column
        return tl.load(ptr + ks[None, :], mask=whole, eviction_policy="evict_first")
    else:
        return tl.load(ptr + ks[None, :], mask=col_ok[:, None] & (ks < last)[None, :], other=0.0,
                       eviction_policy="evict_first")


@triton.jit
def _vector(ptr, ks, k_ok, EVEN: tl.constexpr):
    """ptr[ks] in float32, zero where not k_ok (EVEN: all are)."""
    if EVEN:
        return tl.load(ptr + ks).to(tl.float32)
    else:
        return tl.load(ptr + ks, mask=k_ok, other=0.0).to(tl.float32)


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, gain_ptr, token_ptr, copy_ptr, best_ptr, N, K, span, eps,
                   RMSNORM: tl.constexpr, PAIRED: tl.constexpr, SWIGLU: tl.constexpr, ACCUMULATE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, EMBED: tl.constexpr, GREEDY: tl.constexpr, PDL: tl.constexpr,
                   EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(1) * span
    last = tl.minimum(first + span, K)
    col_ok = cols < N
    rows = w_ptr + cols[:, None] * K
    pairs = rows + N * K                       # PAIRED: the same rows of the second half (SwiGLU: up)
    w = _weights(rows, first, col_ok, last, BLOCK_K, EVEN)       # only weights before the wait
    if PAIRED:
        u = _weights(pairs, first, col_ok, last, BLOCK_K, EVEN)
    _await_previous(PDL)
    if EMBED:     # x is the row of the table at x_ptr that the token names (written by the step before)
        x_ptr += tl.load(token_ptr) * K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if PAIRED:
        acc_pair = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    squares = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(first, last, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < last
        coming = start + BLOCK_K               # the next tiles are in flight while these are summed
        w_next = _weights(rows, coming, col_ok, last, BLOCK_K, EVEN)
        if PAIRED:
            u_next = _weights(pairs, coming, col_ok, last, BLOCK_K, EVEN)
        x = _vector(x_ptr, ks, k_ok, EVEN)
        if EMBED:                              # the first programs start the residual stream with it
            if tl.program_id(0) == 0:
                tl.store(copy_ptr + ks, x, mask=k_ok)
        if RMSNORM:   # the gain now, 1/rms at the end
            squares += x * x
            x = x * _vector(gain_ptr, ks, k_ok, EVEN)
        acc += w.to(tl.float32) * x[None, :]
        if PAIRED:
            acc_pair += u.to(tl.float32) * x[None, :]
        w = w_next
        if PAIRED:
            u = u_next
    y = tl.sum(acc, 1)
    y_pair = y
    if PAIRED:
        y_pair = tl.sum(acc_pair, 1)
    _finish(y, y_pair, tl.sum(squares, 0), K, eps, out_ptr, bias_ptr, best_ptr, cols, col_ok, N, RMSNORM, PAIRED,
            SWIGLU, ACCUMULATE, HAS_BIAS, GREEDY)


@triton.jit
def _finish(y, y_pair, squares, K, eps, out_ptr, bias_ptr, best_ptr, cols, col_ok, N, RMSNORM: tl.constexpr,
            PAIRED: tl.constexpr, SWIGLU: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
            GREEDY: tl.constexpr):
    """A matrix program's end: y (and y_pair, PAIRED) are its rows' sums of weights times x (times the gain, with
    RMSNORM: then scaled by 1/rms from the sum of x's squares), stored or added; SwiGLU; the greedy offer."""
    if RMSNORM:
        inverse_rms = 1.0 / tl.sqrt(squares / K + eps)
        y = y * inverse_rms
        y_pair = y_pair * inverse_rms
    if SWIGLU:
        y = y / (1.0 + tl.exp(-y)) * y_pair
    _matvec_store(out_ptr, bias_ptr, cols, col_ok, y, ACCUMULATE, HAS_BIAS)
    if PAIRED and not SWIGLU:
        _matvec_store(out_ptr, bias_ptr, cols + N, col_ok, y_pair, ACCUMULATE, HAS_BIAS)
    if GREEDY:
        _greedy(y.to(out_ptr.dtype.element_ty).to(tl.float32), cols, col_ok, best_ptr)



# ------------------------------------------------------------------------------------------------------------
# bf16 weights in 12 bits, losslessly. A bf16's low byte (the exponent's last bit and the mantissa) is stored as
# it is; its high byte (the sign and the exponent's other 7 bits) takes one of few values in a weight matrix,
# so a 4-bit code stands for it: the sign, and the exponent part minus a base, 0-7 (16 binades). A weight
# outside them (fewer than 1 in 10,000 for normally distributed weights) is stored with the nearest code and
# its difference from the true value in a list (`Packed.fixes`) that the kernel adds back. The step reads 1.5
# bytes a weight instead of 2. Within each tile row of BLOCK_K weights the codes are ordered for the kernel:
# byte j holds weight j's code (low nibble) and weight BLOCK_K / 2 + j's (high nibble).


@triton.jit
def _bf16_pairs(low, high, ASM: tl.constexpr):
    """From a word of four low bytes and a word of the four matching high bytes, two words of bf16 bits: the
    first two weights' and the last two's (a byte permutation, PRMT on the GPU)."""
    if ASM:
        first = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5140;", "=r,r,r", [low, high], dtype=tl.int32,
                                          is_pure=True, pack=1)
        last = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7362;", "=r,r,r", [low, high], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        first = (low & 0xFF) | ((high & 0xFF) << 8) | ((low & 0xFF00) << 8) | ((high & 0xFF00) << 16)
        last = ((low >> 16) & 0xFF) | ((high >> 8) & 0xFF00) | ((low >> 8) & 0xFF0000) | (high & -16777216)
    return first, last


@triton.jit
def _quarters(x):
    """x [words, 4] as four [words] vectors: each word's first inputs, its second, third and fourth."""
    WORDS: tl.constexpr = x.shape[0]
    evens, odds = tl.split(tl.reshape(x, (WORDS, 2, 2)))
    x0, x2 = tl.split(evens)
    x1, x3 = tl.split(odds)
    return x0, x1, x2, x3


@triton.jit
def _sum_words(acc, low, codes, base4, x, ASM: tl.constexpr):
    """acc plus weights times x for a half tile: low [rows, words] holds four weights' low bytes a word, codes
    their four codes (a byte each), x the matching inputs (_quarters)."""
    high = ((codes & 0x08080808) << 4) | ((codes & 0x07070707) + base4)      # the sign, base + the code's bits
    first, last = _bf16_pairs(low, high, ASM)
    x0, x1, x2, x3 = x
    acc += (first << 16).to(tl.float32, bitcast=True) * x0[None, :]
    acc += (first & -65536).to(tl.float32, bitcast=True) * x1[None, :]
    acc += (last << 16).to(tl.float32, bitcast=True) * x2[None, :]
    return acc + (last & -65536).to(tl.float32, bitcast=True) * x3[None, :]


@triton.jit
def _packed_tile(lows, codes, start, WORDS: tl.constexpr):
    """A tile's words at column start: the low bytes of its two halves and the codes (no masks: whole tiles)."""
    low_at = start // 4
    return (tl.load(lows + low_at, eviction_policy="evict_first"),
            tl.load(lows + low_at + WORDS, eviction_policy="evict_first"),
            tl.load(codes + start // 8, eviction_policy="evict_first"))


@triton.jit
def _sum_packed_tile(acc, acc_pair, squares, tile, pair, x_ptr, gain_ptr, copy_ptr, start, base4,
                     RMSNORM: tl.constexpr, PAIRED: tl.constexpr, EMBED: tl.constexpr, ASM: tl.constexpr,
                     WORDS: tl.constexpr, HALF: tl.constexpr):
    """The tile (and its pair's, PAIRED) at column start times x, added into acc (and acc_pair); with RMSNORM
    x's squares are added into squares and x is scaled by the gain (1/rms comes at the end)."""
    ks = start + tl.arange(0, WORDS)[:, None] * 4 + tl.arange(0, 4)[None, :]
    xa = tl.load(x_ptr + ks).to(tl.float32)
    xb = tl.load(x_ptr + ks + HALF).to(tl.float32)
    if EMBED:                                  # the first programs start the residual stream with it
        if tl.program_id(0) == 0:
            tl.store(copy_ptr + ks, xa)
            tl.store(copy_ptr + ks + HALF, xb)
    if RMSNORM:
        squares += xa * xa + xb * xb
        xa = xa * tl.load(gain_ptr + ks).to(tl.float32)
        xb = xb * tl.load(gain_ptr + ks + HALF).to(tl.float32)
    xa, xb = _quarters(xa), _quarters(xb)
    low_a, low_b, codes = tile
    acc = _sum_words(acc, low_a, codes & 0x0F0F0F0F, base4, xa, ASM)
    acc = _sum_words(acc, low_b, (codes >> 4) & 0x0F0F0F0F, base4, xb, ASM)
    if PAIRED:
        low_a, low_b, codes = pair
        acc_pair = _sum_words(acc_pair, low_a, codes & 0x0F0F0F0F, base4, xa, ASM)
        acc_pair = _sum_words(acc_pair, low_b, (codes >> 4) & 0x0F0F0F0F, base4, xb, ASM)
    return acc, acc_pair, squares


@triton.jit
def _fix_entries(start_ptr, row_ptr, col_ptr, true_ptr, decoded_ptr, at, end, CHUNK: tl.constexpr):
    """CHUNK fixes from at (those before end): (rows, columns, true values, decoded values)."""
    index = at + tl.arange(0, CHUNK)
    ok = index < end
    return (tl.load(row_ptr + index, mask=ok, other=-1), tl.load(col_ptr + index, mask=ok, other=0),
            tl.load(true_ptr + index, mask=ok, other=0.0), tl.load(decoded_ptr + index, mask=ok, other=0.0))


@triton.jit
def _add_fixes(y, entries, start_ptr, row_ptr, col_ptr, true_ptr, decoded_ptr, x_ptr, gain_ptr, row0, first, last,
               RMSNORM: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """y plus (true - decoded) * x (times the gain, RMSNORM) for the fixes of rows row0 .. row0 + BLOCK_N in
    columns first .. last: the first CHUNK of them loaded already (entries), the rest (rarely any) here."""
    begin = tl.load(start_ptr + row0)
    end = tl.load(start_ptr + row0 + BLOCK_N)
    mine = row0 + tl.arange(0, BLOCK_N)
    for at in range(begin, end, CHUNK):
        if at > begin:
            entries = _fix_entries(start_ptr, row_ptr, col_ptr, true_ptr, decoded_ptr, at, end, CHUNK)
        rows, columns, true, decoded = entries
        ok = (rows >= 0) & (columns >= first) & (columns < last)
        x = tl.load(x_ptr + columns, mask=ok, other=0.0).to(tl.float32)
        if RMSNORM:
            x *= tl.load(gain_ptr + columns, mask=ok, other=0.0).to(tl.float32)
        terms = true * x - decoded * x                 # two products: the difference may not be a float32
        y += tl.sum(tl.where((mine[:, None] == rows[None, :]) & ok[None, :], terms[None, :], 0.0), 1)
    return y


@triton.jit
def _packed_kernel(x_ptr, low_ptr, code_ptr, start_ptr, row_ptr, col_ptr, true_ptr, decoded_ptr, out_ptr, bias_ptr,
                   gain_ptr, token_ptr, copy_ptr, best_ptr, N, K, span, eps, base, RMSNORM: tl.constexpr,
                   PAIRED: tl.constexpr, SWIGLU: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EMBED: tl.constexpr, GREEDY: tl.constexpr, PDL: tl.constexpr, FIXES: tl.constexpr,
                   ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """_matvec_kernel over a Packed matrix (whole tiles only): low_ptr and code_ptr are its planes as int32
    words, the fixes a CSR list by row (start_ptr [rows + 1], then each fix's row, column, true and decoded
    value)."""
    WORDS: tl.constexpr = BLOCK_K // 8       # words of low bytes in half a tile row, and of codes in a whole one
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(1) * span
    last = tl.minimum(first + span, K)
    lows = low_ptr + cols[:, None] * (K // 4) + tl.arange(0, WORDS)[None, :]
    codes = code_ptr + cols[:, None] * (K // 8) + tl.arange(0, WORDS)[None, :]
    pair_lows, pair_codes = lows + N * (K // 4), codes + N * (K // 8)    # PAIRED: the second half's rows
    base4 = base * 0x01010101
    tile = _packed_tile(lows, codes, first, WORDS)                       # only weights before the wait
    pair = tile
    if PAIRED:
        pair = _packed_tile(pair_lows, pair_codes, first, WORDS)
    if FIXES:     # the first CHUNK of this program's fixes (and its pair rows')
        row0 = tl.program_id(0) * BLOCK_N
        fixes = _fix_entries(start_ptr, row_ptr, col_ptr, true_ptr, decoded_ptr, tl.load(start_ptr + row0),
                             tl.load(start_ptr + row0 + BLOCK_N), CHUNK)
        pair_fixes = fixes
        if PAIRED:
            pair_fixes = _fix_entries(start_ptr, row_ptr, col_ptr, true_ptr, decoded_ptr,
                                      tl.load(start_ptr + N + row0), tl.load(start_ptr + N + row0 + BLOCK_N), CHUNK)
    _await_previous(PDL)
    if EMBED:     # x is the row of the table at x_ptr that the token names (written by the step before)
        x_ptr += tl.load(token_ptr) * K
    acc = tl.zeros((BLOCK_N, WORDS), tl.float32)
    acc_pair = acc
    squares = tl.zeros((WORDS, 4), tl.float32)
    start = first
    for _ in range(1, tl.cdiv(last - first, BLOCK_K)):   # all tiles but the last, which has no next one
        coming = _packed_tile(lows, codes, start + BLOCK_K, WORDS)      # in flight while these are summed
        coming_pair = coming
        if PAIRED:
            coming_pair = _packed_tile(pair_lows, pair_codes, start + BLOCK_K, WORDS)
        acc, acc_pair, squares = _sum_packed_tile(acc, acc_pair, squares, tile, pair, x_ptr, gain_ptr, copy_ptr,
                                                  start, base4, RMSNORM, PAIRED, EMBED, ASM, WORDS, BLOCK_K // 2)
        tile, pair = coming, coming_pair
        start += BLOCK_K
    acc, acc_pair, squares = _sum_packed_tile(acc, acc_pair, squares, tile, pair, x_ptr, gain_ptr, copy_ptr, start,
                                              base4, RMSNORM, PAIRED, EMBED, ASM, WORDS, BLOCK_K // 2)
    y = tl.sum(acc, 1)
    y_pair = tl.sum(acc_pair, 1)
    if FIXES:
        y = _add_fixes(y, fixes, start_ptr, row_ptr, col_ptr, true_ptr, decoded_ptr, x_ptr, gain_ptr, row0, first,
                       last, RMSNORM, BLOCK_N, CHUNK)
        if PAIRED:
            y_pair = _add_fixes(y_pair, pair_fixes, start_ptr, row_ptr, col_ptr, true_ptr, decoded_ptr, x_ptr,
                                gain_ptr, N + row0, first, last, RMSNORM, BLOCK_N, CHUNK)
    _finish(y, y_pair, tl.sum(tl.sum(squares, 1), 0), K, eps, out_ptr, bias_ptr, best_ptr, cols, cols < N, N,
            RMSNORM, PAIRED, SWIGLU, ACCUMULATE, HAS_BIAS, GREEDY)


@triton.jit
def _greedy(y, cols, col_ok, best_ptr):
    """Offer this program's best logit of y (already rounded to the output's dtype, as an argmax of the stored
    logits sees them) as one int64: the logit's order in the high bits, the column's complement in the low 31
    (ties go to the first column, as torch.argmax's do; NaN counts as the largest, as there, so the token is
    always a column). _pick_kernel reads the maximum."""
    y = tl.where(col_ok, tl.where(y != y, float("inf"), y), float("-inf"))
    top = tl.max(y, 0)
    col = tl.min(tl.where((y == top) & col_ok, cols, 2147483647), 0).to(tl.int64)
    bits = top.to(tl.int32, bitcast=True).to(tl.int64)
    order = tl.where(bits < 0, -2147483649 - bits, bits) + 2147483648   # float order, in [0, 2^32)
    tl.atomic_max(best_ptr, order * 2147483648 + (2147483647 - col), sem="relaxed")


@triton.jit
def _pick_kernel(best_ptr, token_ptr, pos_ptr, PDL: tl.constexpr):
    """After a greedy matvec: the token its programs agreed on, the position moved on, the maximum reset."""
    _await_previous(PDL)
    best = tl.load(best_ptr)
    tl.store(token_ptr, 2147483647 - best % 2147483648)
    tl.store(pos_ptr, tl.load(pos_ptr) + 1)
    tl.store(best_ptr, 0)


@triton.jit
def _matvec_store(out_ptr, bias_ptr, cols, col_ok, y, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        if tl.program_id(1) == 0:              # the first K split adds it
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if ACCUMULATE:
        tl.atomic_add(out_ptr + cols, y, mask=col_ok, sem="relaxed")
    else:
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


def _compiled(tensor) -> bool:
    """Kernels on this tensor run compiled for a GPU, not in triton's interpreter."""
    import os

    return tensor.is_cuda and not os.environ.get("TRITON_INTERPRET")


def _pdl(tensor) -> bool:
    """Programmatic dependent launch: compiled kernels on a Hopper or newer GPU."""
    import torch

    return _compiled(tensor) and torch.cuda.get_device_capability(tensor.device)[0] >= 9


def _program_rows(n: int, swiglu: bool, halves: int, greedy: bool = False) -> tuple[bool, int]:
    """(paired, rows): whether each program sums rows of both halves of the matrix (SwiGLU's gate and up
    always; a tile's halves = 2 where n is even, except for greedy, which needs one half), and how many rows
    the programs are laid over."""
    paired = swiglu or (halves == 2 and n % 2 == 0 and not greedy)
    return paired, n // 2 if paired and not swiglu else n


def pack(weight, *, accumulate: bool = False, swiglu: bool = False):
    """weight as a Packed matrix for matvec (with out= when accumulate, swiglu as matvec's), or weight itself
    where packing does not apply: not bf16, or its shape not whole tiles of the kernel's. The tile is TILES's
    with twice the rows: the program decodes what it reads, and its x work is shared by more rows (on an H100,
    7.79 against 7.91 ms a step for TILES's rows, run 49)."""
    import torch

    rows, k = weight.shape
    n = rows // 2 if swiglu else rows
    block_n, _, warps, splits, halves = _tile(n, k, accumulate, swiglu)
    block_n *= 2
    block_k = next((b for b in (512, 256) if k % b == 0), 0)
    if (weight.dtype != torch.bfloat16 or not weight.is_contiguous() or not block_k
            or _program_rows(n, swiglu, halves)[1] % block_n):
        return weight
    packed = Packed(weight, block_k)
    packed.tile = (block_n, block_k, warps, splits, halves)
    return packed


class Packed:
    """A bf16 matrix [rows, K] in 12 bits a weight, losslessly (see _packed_kernel): `low` uint8 [rows, K], the
    weights' low bytes; `codes` uint8 [rows, K / 2], their high bytes as 4-bit codes (sign, exponent part -
    base), ordered for tiles of block_k columns; `fixes` the weights whose exponent is outside the codes' 16
    binades, as a CSR list by row (starts [rows + 1] int32, then each one's row and column, int32, its true
    value and the value its code decodes to, float32: the kernel adds true * x - decoded * x).
    matvec takes it where it takes the matrix. Built `rows_at_once` rows at a time, to bound the memory it
    needs on the way."""

    def __init__(self, weight, block_k: int = 512, rows_at_once: int = 4096):
        import torch

        rows, k = weight.shape
        if weight.dtype != torch.bfloat16 or not weight.is_contiguous() or k % block_k or block_k % 16:
            raise ValueError(f"only a contiguous bf16 matrix whose {k} columns are whole tiles of {block_k} packs")
        self.shape, self.block_k, self.dtype, self.device = (rows, k), block_k, weight.dtype, weight.device
        self.tile = None      # matvec's tile for it where not TILES's (its block_k is this one's)
        counts = torch.zeros(128, dtype=torch.long, device=weight.device)
        for chunk in weight.split(rows_at_once):
            counts += torch.bincount(((chunk.view(torch.int16).int() >> 8) & 0x7F).flatten(), minlength=128)
        self.base = int(counts.unfold(0, 8, 1).sum(1).argmax())   # the 16 binades holding the most weights
        self.low = torch.empty(rows, k, dtype=torch.uint8, device=weight.device)
        self.codes = torch.empty(rows, k // 2, dtype=torch.uint8, device=weight.device)
        found = []                             # per chunk of rows: the fixes' rows, columns, true and decoded
        for at in range(0, rows, rows_at_once):
            chunk = weight[at:at + rows_at_once]
            bits = chunk.view(torch.int16).int() & 0xFFFF
            sign, part = bits >> 15, ((bits >> 8) & 0x7F) - self.base
            kept = part.clamp(0, 7)
            code = (sign << 3 | kept).view(bits.shape[0], k // block_k, 2, block_k // 2)
            self.codes[at:at + bits.shape[0]] = (code[:, :, 0] | code[:, :, 1] << 4).reshape(-1, k // 2)
            self.low[at:at + bits.shape[0]] = bits & 0xFF
            where = (part != kept).nonzero(as_tuple=True)
            decoded = (sign << 15 | (kept + self.base) << 8 | (bits & 0xFF))[where]
            decoded = (decoded - (decoded >> 15 << 16)).to(torch.int16).view(torch.bfloat16)
            found.append((where[0] + at, where[1], chunk[where], decoded))

        def joined(i: int, dtype):   # one of the lists, with one entry more: never an empty tensor to launch with
            return torch.cat([f[i].to(dtype) for f in found] + [torch.zeros(1, dtype=dtype, device=weight.device)])

        fix_rows = joined(0, torch.int32)
        self.fix_count = len(fix_rows) - 1
        starts = torch.zeros(rows + 1, dtype=torch.int32, device=weight.device)
        starts[1:] = torch.bincount(fix_rows[:-1].long(), minlength=rows).cumsum(0)
        self.fixes = (starts, fix_rows, joined(1, torch.int32), joined(2, torch.float32), joined(3, torch.float32))

    def unpacked(self):
        """The bf16 matrix again (the tests' check that nothing was lost)."""
        import torch

        rows, k = self.shape
        codes = self.codes.view(rows, k // self.block_k, 1, self.block_k // 2).int()
        code = torch.cat([codes & 0xF, codes >> 4], 2).reshape(rows, k)
        bits = (code >> 3) << 15 | ((code & 7) + self.base) << 8 | self.low.int()
        starts, fix_rows, fix_cols, true, _ = self.fixes
        bits[fix_rows[:-1].long(), fix_cols[:-1].long()] = true[:-1].view(torch.int32) >> 16 & 0xFFFF   # in bits:
        return (bits - (bits >> 15 << 16)).to(torch.int16).view(torch.bfloat16)   # a NaN keeps its own


def matvec(x, weight, *, out=None, bias=None, gain=None, eps: float = 1e-6, swiglu: bool = False, tile=None,
           token=None, copy_into=None, greedy=None, ordered: bool = False):
    """One row: weight [N, K] times x [K] -> [N].

    gain: RMSNorm x first (with this gain and eps); bias: added after. swiglu: weight holds the gate's rows
    and then the up projection's, and the result is SiLU(gate x) * (up x), [N / 2]. out: a float32 vector
    to add the result into (the residual stream; K splits add there atomically); without it a new vector
    in weight's dtype. x and weight must be contiguous. tile: see TILES.
    token (a one-element integer tensor): x is a table [rows, K] (the embeddings) and its row token[0] the
    input, which is also stored as float32 into copy_into [K] (the residual stream starts with it).
    greedy (tokens, positions, scratch): then write the argmax of the result into tokens[0] and add one to
    positions[0] (a one-program kernel after this one); scratch is an int64 zero, left at zero. Both read
    and write on the device only. ordered: no K splits, so that each element of out gets one atomic add and
    the result is the same bit for bit every time (splits add in whatever order they finish).
    """
    import torch

    n, k = weight.shape
    n = n // 2 if swiglu else n
    packed = isinstance(weight, Packed)
    block_n, block_k, warps, splits, halves = tile or (packed and weight.tile) or _tile(n, k, out is not None,
                                                                                      swiglu, ordered)
    if packed:
        block_k = weight.block_k
    paired, rows = _program_rows(n, swiglu, halves, greedy is not None)
    if out is None or gain is not None or ordered:
        splits = 1                           # a plain store, RMSNorm needs the whole row, or a fixed order
    span = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, span)
    result = out if out is not None else torch.empty(n, dtype=weight.dtype, device=weight.device)
    ends = (result if bias is None else bias, result if gain is None else gain, result if token is None else token,
            result if copy_into is None else copy_into, result if greedy is None else greedy[2])
    flags = dict(RMSNORM=gain is not None, PAIRED=paired, SWIGLU=swiglu, ACCUMULATE=out is not None,
                 HAS_BIAS=bias is not None, EMBED=token is not None, GREEDY=greedy is not None)
    grid = (triton.cdiv(rows, block_n), splits)
    if packed:
        if rows % block_n:
            raise ValueError(f"a packed matrix needs whole tiles: {rows} rows are not a multiple of {block_n}")
        pdl = _pdl(weight.low)
        _packed_kernel[grid](
            x, weight.low.view(torch.int32), weight.codes.view(torch.int32), *weight.fixes, result, *ends, rows, k,
            span, eps, weight.base, **flags, PDL=pdl, FIXES=weight.fix_count > 0, ASM=_compiled(weight.low),
            BLOCK_N=block_n, BLOCK_K=block_k, CHUNK=32, num_warps=warps, launch_pdl=pdl)
    else:
        pdl = _pdl(weight)
        _matvec_kernel[grid](
            x, weight, result, *ends, rows, k, span, eps, **flags, PDL=pdl,
            EVEN=EVEN and rows % block_n == 0 and k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, launch_pdl=pdl)
    if greedy is not None:
        tokens, positions, scratch = greedy
        _pick_kernel[(1,)](scratch, tokens, positions, PDL=pdl, num_warps=1, launch_pdl=pdl)
    return result


@triton.jit
def _rope_rows(ptr, cos, sin, dims, mask, D: tl.constexpr):
    """RoPE of rows of D values at ptr ([R, 1] offsets + dims): x * cos + rotate_half(x) * sin, in float32."""
    partner = (dims + D // 2) % D
    sign = tl.where(dims < D // 2, -1.0, 1.0)
    x = tl.load(ptr + dims, mask=mask, other=0.0).to(tl.float32)
    rotated = tl.load(ptr + partner, mask=mask, other=0.0).to(tl.float32) * sign
    return x * cos + rotated * sin


@triton.jit
def _attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, part_ptr, stats_ptr, count_ptr, out_ptr,
                      stride_qkv, stride_cb, stride_ch, stride_cl, scale, H, KVH, splits, GROUP: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr, D: tl.constexpr,
                      PRECISION: tl.constexpr, PDL: tl.constexpr):
    row_kv = tl.program_id(0)
    split = tl.program_id(1)
    row = row_kv // KVH
    kv = row_kv % KVH
    pos = tl.load(pos_ptr + row)             # set before this step's first kernel: safe to read early
    # The positions so far, [0, pos], in `splits` equal runs of whole blocks: every program has the same work.
    run = tl.cdiv(tl.cdiv(pos + 1, splits), BLOCK) * BLOCK
    first = split * run
    last = tl.minimum(first + run, pos)      # cache positions before pos: written by earlier steps
    dims = tl.arange(0, D)
    offsets = tl.arange(0, BLOCK)
    cache = row * stride_cb + kv * stride_ch + dims[None, :]
    at = first + offsets
    keys = tl.load(k_ptr + cache + at[:, None] * stride_cl, mask=(at < last)[:, None], other=0.0)
    values = tl.load(v_ptr + cache + at[:, None] * stride_cl, mask=(at < last)[:, None], other=0.0)
    _await_previous(PDL)

    cos = tl.load(cos_ptr + pos * D + dims).to(tl.float32)
    sin = tl.load(sin_ptr + pos * D + dims).to(tl.float32)
    src = qkv_ptr + row * stride_qkv
    member = tl.arange(0, ROWS)              # the query heads sharing this K/V head, padded to a dot's rows
    heads = kv * GROUP + member
    in_group = member < GROUP
    q = _rope_rows(src + heads[:, None] * D, cos[None, :], sin[None, :], dims[None, :], in_group[:, None], D)
    q = q * scale
    # This step's own key and value, from qkv: the program whose run holds pos stores them for later steps
    # and starts its sums with them.
    new_k = _rope_rows(src + (H + kv) * D, cos, sin, dims, dims < D, D)
    new_v = tl.load(src + (H + KVH) * D + kv * D + dims).to(tl.float32)
    mine = (pos >= first) & (pos < first + run)
    if mine:
        slot = row * stride_cb + kv * stride_ch + pos * stride_cl + dims
        tl.store(k_ptr + slot, new_k.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + slot, new_v.to(v_ptr.dtype.element_ty))
    best = tl.where(mine, tl.sum(q * new_k[None, :], 1), float("-inf"))       # [ROWS]: running max
    total = tl.where(mine, 1.0, 0.0) + tl.zeros((ROWS,), tl.float32)           # running sum of exp
    acc = total[:, None] * new_v[None, :]                                      # [ROWS, D]
    q = q.to(keys.dtype)
    for start in range(first, last, BLOCK):
        at = start + offsets
        coming = at + BLOCK                  # the next block is in flight while this one is summed
        keys_next = tl.load(k_ptr + cache + coming[:, None] * stride_cl, mask=(coming < last)[:, None], other=0.0)
        values_next = tl.load(v_ptr + cache + coming[:, None] * stride_cl, mask=(coming < last)[:, None],
                              other=0.0)
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        scores = tl.where((at < last)[None, :], scores, float("-inf"))
        higher = tl.maximum(best, tl.max(scores, 1))                           # finite: the block has a position
        weights = tl.exp(scores - higher[:, None])
        fade = tl.exp(best - higher)
        total = total * fade + tl.sum(weights, 1)
        acc = acc * fade[:, None] + tl.dot(weights.to(values.dtype), values, input_precision=PRECISION)
        best = higher
        keys, values = keys_next, values_next
    entries = (row * H + heads) * splits + split
    tl.store(part_ptr + entries[:, None] * D + dims[None, :], acc, mask=in_group[:, None])
    tl.store(stats_ptr + entries * 2, best, mask=in_group)
    tl.store(stats_ptr + entries * 2 + 1, total, mask=in_group)

    # The last program of this row and K/V head to finish combines them all (no second kernel).
    tl.debug_barrier()
    finished = tl.atomic_add(count_ptr + row_kv, 1, sem="acq_rel")
    if finished == splits - 1:
        which = tl.arange(0, SLOTS)
        used = which < splits
        for g in tl.static_range(GROUP):
            head = row * H + kv * GROUP + g
            slots = head * splits + which
            bests = tl.load(stats_ptr + slots * 2, mask=used, other=float("-inf"))
            totals = tl.load(stats_ptr + slots * 2 + 1, mask=used, other=0.0)
            factors = tl.where(bests == float("-inf"), 0.0, tl.exp(bests - tl.max(bests, 0)))
            parts = tl.load(part_ptr + slots[:, None] * D + dims[None, :], mask=used[:, None], other=0.0)
            out = tl.sum(factors[:, None] * parts, 0) / tl.sum(factors * totals, 0)
            tl.store(out_ptr + head * D + dims, out.to(out_ptr.dtype.element_ty))
        tl.store(count_ptr + row_kv, 0)        # ready for the next layer and step


def fused_attention(qkv, cos, sin, positions, k_cache, v_cache, counts, scale: float, heads: int,
                    splits: int | None = None, block: int | None = None, warps: int | None = None):
    """One decode step's attention from qkv [M, (H + 2 KVH) D]: RoPE on q and k at each row's position, the
    new k and v stored in the caches [rows, KVH, length, D], attention over positions [0, positions[row]]
    -> [M, H * D]. counts: int32 zeros, at least M * KVH, left zeroed. splits (runs per row and K/V head),
    block and warps default to ATTENTION's."""
    import torch

    rows = qkv.shape[0]
    kv_heads, dim = k_cache.shape[1], k_cache.shape[-1]
    group = heads // kv_heads
    if splits is None:
        sms = torch.cuda.get_device_properties(qkv.device).multi_processor_count if qkv.is_cuda else 4
        programs = ATTENTION["programs_per_sm"] * sms
        splits = max(1, programs // (rows * kv_heads))
    pdl = _pdl(qkv)
    parts = torch.empty(rows * heads * splits, dim, dtype=torch.float32, device=qkv.device)
    stats = torch.empty(rows * heads * splits, 2, dtype=torch.float32, device=qkv.device)
    out = torch.empty(rows, heads * dim, dtype=qkv.dtype, device=qkv.device)
    _attention_kernel[(rows * kv_heads, splits)](
        qkv, cos, sin, positions, k_cache, v_cache, parts, stats, counts, out, qkv.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), scale, heads, kv_heads, splits, GROUP=group,
        ROWS=max(16, triton.next_power_of_2(group)), BLOCK=block or ATTENTION["block"],
        SLOTS=triton.next_power_of_2(splits), D=dim, PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        PDL=pdl, num_warps=warps or ATTENTION["warps"], launch_pdl=pdl)
    return out
