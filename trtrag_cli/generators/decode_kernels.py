"""Triton kernels for one decode step of a Llama-family model on a CUDA GPU, one row (batch 1).

Why: at batch 1 a decode step is reading the weights once. On an H200 with the Llama-2-13B shape the
compiled torch layers took 7.8 ms a step where reading 25.7 GB allows about 5.4: cuBLAS's
matrix-vector kernels read the narrow matrices (output and down projections) at 3.3-3.6 TB/s,
attention walked the whole 256-rounded span behind a mask, and RMSNorm, RoPE, SiLU and the cache writes
were kernels of their own. Here a layer is five kernels:
  - `matvec` for Q/K/V with the input RMSNorm folded in: W (x * gain) is summed along K together with
    sum(x^2), and 1/rms scales the result at the end (no normalised copy of x is written);
  - `fused_attention`: RoPE on q and on the new k, the new k and v stored in the cache, attention split
    along the cache into chunks that run in parallel and stop at the row's position (no mask, nothing
    read past it), the last chunk to finish combining them all;
  - `matvec` for the output projection, added into the float32 residual stream;
  - `matvec` for gate and up together (RMSNorm folded in; each program sums a block of gate rows and
    the matching up rows) writing SiLU(gate) * up;
  - `matvec` for down, added into the residual stream; its K is split over programs (atomic adds).
Each matrix program streams [BLOCK_N x BLOCK_K] weight tiles with the next tile's load in flight while
the current one is summed, in float32. On Hopper the kernels use programmatic dependent launch: a kernel
starts loading its weights (or older cache positions) while the previous one finishes, then waits for
it before reading its output. H200 figures are in the README ("Generation on the GPU").

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


def _tile(n: int, k: int, accumulate: bool, swiglu: bool) -> tuple[int, int, int, int, int]:
    if (n, k) in TILES:
        return TILES[n, k]
    if swiglu:
        return 4, 256, 4, 1, 2
    if accumulate:                # narrow matrices: long ones split K so that enough programs run
        return (8, 512, 4, 1, 1) if k <= 8192 else (16, 256, 4, -(-k // 4096), 1)
    return 8, 256, 4, 1, 1


@triton.jit
def _await_previous(PDL: tl.constexpr):
    """With programmatic dependent launch (Hopper on): let the next kernel start launching, then wait until
    the previous one is done and its writes are visible. Everything before this may only read weights."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, gain_ptr, N, K, span, eps, RMSNORM: tl.constexpr,
                   PAIRED: tl.constexpr, SWIGLU: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(1) * span
    last = tl.minimum(first + span, K)
    col_ok = cols < N
    rows = w_ptr + cols[:, None] * K
    pairs = rows + N * K                       # PAIRED: the same rows of the second half (SwiGLU: up)
    ks = first + tl.arange(0, BLOCK_K)
    tile_ok = col_ok[:, None] & (ks < last)[None, :]
    w = tl.load(rows + ks[None, :], mask=tile_ok, other=0.0)        # weights only before the wait
    if PAIRED:
        u = tl.load(pairs + ks[None, :], mask=tile_ok, other=0.0)
    _await_previous(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_pair = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    squares = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(first, last, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < last
        coming = ks + BLOCK_K                  # the next tiles are in flight while these are summed
        next_ok = col_ok[:, None] & (coming < last)[None, :]
        w_next = tl.load(rows + coming[None, :], mask=next_ok, other=0.0)
        if PAIRED:
            u_next = tl.load(pairs + coming[None, :], mask=next_ok, other=0.0)
        x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        if RMSNORM:   # the gain now, 1/rms at the end
            squares += x * x
            x = x * tl.load(gain_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
        if PAIRED:
            acc_pair += u.to(tl.float32) * x[None, :]
            u = u_next
    y = tl.sum(acc, 1)
    y_pair = tl.sum(acc_pair, 1)
    if RMSNORM:
        inverse_rms = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
        y = y * inverse_rms
        y_pair = y_pair * inverse_rms
    if SWIGLU:
        y = y / (1.0 + tl.exp(-y)) * y_pair
    _matvec_store(out_ptr, bias_ptr, cols, col_ok, y, ACCUMULATE, HAS_BIAS)
    if PAIRED and not SWIGLU:
        _matvec_store(out_ptr, bias_ptr, cols + N, col_ok, y_pair, ACCUMULATE, HAS_BIAS)


@triton.jit
def _matvec_store(out_ptr, bias_ptr, cols, col_ok, y, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        if tl.program_id(1) == 0:              # the first K split adds it
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if ACCUMULATE:
        tl.atomic_add(out_ptr + cols, y, mask=col_ok, sem="relaxed")
    else:
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


def _pdl(tensor) -> bool:
    """Programmatic dependent launch: compiled kernels on a Hopper or newer GPU."""
    import os

    import torch

    return (tensor.is_cuda and not os.environ.get("TRITON_INTERPRET")
            and torch.cuda.get_device_capability(tensor.device)[0] >= 9)


def matvec(x, weight, *, out=None, bias=None, gain=None, eps: float = 1e-6, swiglu: bool = False, tile=None):
    """One row: weight [N, K] times x [K] -> [N].

    gain: RMSNorm x first (with this gain and eps); bias: added after. swiglu: weight holds the gate's rows
    and then the up projection's, and the result is SiLU(gate x) * (up x), [N / 2]. out: a float32 vector
    to add the result into (the residual stream; K splits add there atomically); without it a new vector
    in weight's dtype. x and weight must be contiguous. tile: see TILES.
    """
    import torch

    n, k = weight.shape
    n = n // 2 if swiglu else n
    block_n, block_k, warps, splits, halves = tile or _tile(n, k, out is not None, swiglu)
    paired = swiglu or (halves == 2 and n % 2 == 0)
    if out is None or gain is not None:
        splits = 1                           # a plain store, and RMSNorm needs the whole row
    span = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, span)
    result = out if out is not None else torch.empty(n, dtype=weight.dtype, device=weight.device)
    rows = n // 2 if paired and not swiglu else n
    pdl = _pdl(weight)
    _matvec_kernel[(triton.cdiv(rows, block_n), splits)](
        x, weight, result, result if bias is None else bias, result if gain is None else gain, rows, k, span,
        eps, RMSNORM=gain is not None, PAIRED=paired, SWIGLU=swiglu, ACCUMULATE=out is not None,
        HAS_BIAS=bias is not None, PDL=pdl, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, launch_pdl=pdl)
    return result


@triton.jit
def _rotated(ptr, cos_lo, cos_hi, sin_lo, sin_hi, half, D: tl.constexpr):
    """RoPE of the D values at ptr, as (low half, high half): x * cos + rotate_half(x) * sin."""
    lo = tl.load(ptr + half).to(tl.float32)
    hi = tl.load(ptr + D // 2 + half).to(tl.float32)
    return lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi


@triton.jit
def _fused_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, part_ptr, stats_ptr, count_ptr,
                            out_ptr, stride_qkv, stride_cb, stride_ch, stride_cl, scale, H, KVH, chunks,
                            GROUP: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, D: tl.constexpr,
                            PDL: tl.constexpr):
    row_head = tl.program_id(0)
    chunk = tl.program_id(1)
    row = row_head // H
    head = row_head % H
    kv = head // GROUP
    pos = tl.load(pos_ptr + row)             # set before this step's first kernel: safe to read early
    half = tl.arange(0, D // 2)
    dims = tl.arange(0, D)
    at = chunk * CHUNK + tl.arange(0, CHUNK)
    earlier = at < pos                       # written by earlier steps, so loaded before the wait
    cache = row * stride_cb + kv * stride_ch + at[:, None] * stride_cl
    k_lo = tl.load(k_ptr + cache + half[None, :], mask=earlier[:, None], other=0.0)
    k_hi = tl.load(k_ptr + cache + D // 2 + half[None, :], mask=earlier[:, None], other=0.0)
    v = tl.load(v_ptr + cache + dims[None, :], mask=earlier[:, None], other=0.0)
    _await_previous(PDL)

    cos_lo = tl.load(cos_ptr + pos * D + half).to(tl.float32)
    cos_hi = tl.load(cos_ptr + pos * D + D // 2 + half).to(tl.float32)
    sin_lo = tl.load(sin_ptr + pos * D + half).to(tl.float32)
    sin_hi = tl.load(sin_ptr + pos * D + D // 2 + half).to(tl.float32)
    src = qkv_ptr + row * stride_qkv
    q_lo, q_hi = _rotated(src + head * D, cos_lo, cos_hi, sin_lo, sin_hi, half, D)
    q_lo, q_hi = q_lo * scale, q_hi * scale
    # This step's own key and value: from qkv, written to the cache once per K/V head for later steps.
    new_lo, new_hi = _rotated(src + (H + kv) * D, cos_lo, cos_hi, sin_lo, sin_hi, half, D)
    new_v = tl.load(src + (H + KVH) * D + kv * D + dims).to(tl.float32)
    mine = (pos >= chunk * CHUNK) & (pos < chunk * CHUNK + CHUNK)
    if mine & (head % GROUP == 0):
        slot = row * stride_cb + kv * stride_ch + pos * stride_cl
        tl.store(k_ptr + slot + half, new_lo.to(k_ptr.dtype.element_ty))
        tl.store(k_ptr + slot + D // 2 + half, new_hi.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + slot + dims, new_v.to(v_ptr.dtype.element_ty))

    scores = tl.sum(k_lo.to(tl.float32) * q_lo[None, :], 1) + tl.sum(k_hi.to(tl.float32) * q_hi[None, :], 1)
    scores = tl.where(earlier, scores, float("-inf"))
    own = tl.where(mine, tl.sum(new_lo * q_lo, 0) + tl.sum(new_hi * q_hi, 0), float("-inf"))
    best = tl.maximum(tl.max(scores, 0), own)
    shift = tl.where(best == float("-inf"), 0.0, best)       # a chunk wholly past pos sees nothing
    weights = tl.exp(scores - shift)
    own_weight = tl.exp(own - shift)
    acc = tl.sum(weights[:, None] * v.to(tl.float32), 0) + own_weight * new_v
    entry = row_head * chunks + chunk
    tl.store(part_ptr + entry * D + dims, acc)
    tl.store(stats_ptr + entry * 2, best)
    tl.store(stats_ptr + entry * 2 + 1, tl.sum(weights, 0) + own_weight)

    # The last chunk of this row and head to finish combines them all (no second kernel).
    tl.debug_barrier()
    finished = tl.atomic_add(count_ptr + row_head, 1, sem="acq_rel")
    if finished == chunks - 1:
        which = tl.arange(0, CHUNKS)
        used = which < chunks
        entries = row_head * chunks + which
        bests = tl.load(stats_ptr + entries * 2, mask=used, other=float("-inf"))
        totals = tl.load(stats_ptr + entries * 2 + 1, mask=used, other=0.0)
        factors = tl.where(bests == float("-inf"), 0.0, tl.exp(bests - tl.max(bests, 0)))
        parts = tl.load(part_ptr + entries[:, None] * D + dims[None, :], mask=used[:, None], other=0.0)
        out = tl.sum(factors[:, None] * parts, 0) / tl.sum(factors * totals, 0)
        tl.store(out_ptr + row_head * D + dims, out.to(out_ptr.dtype.element_ty))
        tl.store(count_ptr + row_head, 0)      # ready for the next layer and step


def fused_attention(qkv, cos, sin, positions, k_cache, v_cache, counts, span: int, scale: float, heads: int,
                    chunk: int = 128, warps: int = 4):
    """One decode step's attention from qkv [M, (H + 2 KVH) D]: RoPE on q and k at each row's position, the
    new k and v stored in the caches [rows, KVH, length, D], attention over positions [0, positions[row]]
    (within the first `span`) -> [M, H * D]. counts: int32 zeros, at least M * H, left zeroed."""
    import torch

    rows = qkv.shape[0]
    kv_heads, dim = k_cache.shape[1], k_cache.shape[-1]
    chunks = triton.cdiv(span, chunk)
    pdl = _pdl(qkv)
    parts = torch.empty(rows * heads * chunks, dim, dtype=torch.float32, device=qkv.device)
    stats = torch.empty(rows * heads * chunks, 2, dtype=torch.float32, device=qkv.device)
    out = torch.empty(rows, heads * dim, dtype=qkv.dtype, device=qkv.device)
    _fused_attention_kernel[(rows * heads, chunks)](
        qkv, cos, sin, positions, k_cache, v_cache, parts, stats, counts, out, qkv.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), scale, heads, kv_heads, chunks, GROUP=heads // kv_heads, CHUNK=chunk,
        CHUNKS=triton.next_power_of_2(chunks), D=dim, PDL=pdl, num_warps=warps, launch_pdl=pdl)
    return out
