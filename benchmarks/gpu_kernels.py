"""The decode step's kernels one by one on a CUDA GPU: our Triton kernels against what torch runs.

Llama-2-13B shape, bf16, 40 distinct weights per matrix (as 40 layers: nothing stays in L2), each
sequence of 40 calls captured in a CUDA graph and replayed, so launch costs are what a decode step sees.
Prints and writes JSON:
  - per weight shape at batch 1: cuBLAS (F.linear) and decode_kernels.matvec as the decode step calls it
    (RMSNorm folded in for Q/K/V, gate/up and the head; SwiGLU for gate/up; added into the float32
    residual for the output and down projections) for every tile in --tiles (BLOCK_N x BLOCK_K x warps x
    K splits x halves, see decode_kernels.TILES), with microseconds per call and the weight bytes read
    per second;
  - attention over a 1,280-position span (row position 1,087): SDPA with a mask (the torch layer),
    and decode_kernels.fused_attention for each programs-per-SM x block x warps of a small sweep
    (decode_kernels.ATTENTION).

Usage: python benchmarks/gpu_kernels.py [--out gpu-kernels.json] [--tiles 8x512x4x1x1,8x256x4x1x2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = 40
HIDDEN, INTER, HEADS, HEAD_DIM, VOCAB = 5120, 13824, 40, 128, 32000
SHAPES = {"qkv": (3 * HIDDEN, HIDDEN, "norm"), "o": (HIDDEN, HIDDEN, "residual"),
          "gate_up": (2 * INTER, HIDDEN, "swiglu"), "down": (HIDDEN, INTER, "residual"),
          "head": (VOCAB, HIDDEN, "norm")}
TILES = ",".join("x".join(map(str, tile)) for tile in [
    (4, 256, 4, 1, 1), (4, 512, 4, 1, 1), (8, 256, 4, 1, 1), (8, 256, 8, 1, 1), (8, 512, 4, 1, 1),
    (16, 256, 4, 1, 1), (4, 256, 4, 1, 2), (8, 256, 4, 1, 2), (4, 512, 4, 1, 2), (4, 512, 4, 4, 1),
    (8, 256, 4, 4, 1), (8, 256, 4, 8, 1), (8, 512, 4, 2, 1), (16, 256, 4, 4, 1), (8, 256, 4, 4, 2),
    (8, 512, 4, 1, 2)])


def graph_time_us(fn, calls: int, reps: int = 20) -> float:
    """Median microseconds per call of fn(i) for i in range(calls), the sequence replayed as a CUDA graph."""
    import statistics

    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def bench_matrices(tiles: list[tuple], shapes: list[str]) -> dict:
    """Batch 1: cuBLAS as the torch layer runs it against decode_kernels.matvec for every tile."""
    import torch
    import torch.nn.functional as F

    from trtrag_cli.generate.decode import kernels as dk

    out = {}
    for name in shapes:
        n, k, kind = SHAPES[name]
        layers = 1 if name == "head" else LAYERS
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(layers)]
        gain = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        gbytes = n * k * 2 / 1e9
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(n, device="cuda", dtype=torch.float32)
        us = graph_time_us(lambda i: F.linear(x, weights[i % layers]), LAYERS)
        entry = {"cublas": {"us": round(us, 2), "tb_s": round(gbytes / us * 1e3, 3)}}
        xf = x.float()[0]
        normed = xf * torch.rsqrt(xf.pow(2).mean() + 1e-5) * gain.float()
        if kind == "residual":
            reference = residual + weights[0].float() @ xf
        elif kind == "swiglu":
            product = weights[0].float() @ normed
            reference = F.silu(product[:n // 2]) * product[n // 2:]
        else:
            reference = weights[0].float() @ normed
        for tile in tiles:
            if tile[3] > 1 and kind != "residual" or tile[4] == 1 and kind == "swiglu":
                continue                        # RMSNorm needs whole rows; SwiGLU always pairs gate and up
            scratch = residual.clone()

            def ours(i, tile=tile, scratch=scratch):
                w = weights[i % layers]
                if kind == "residual":
                    return dk.matvec(x[0], w, out=scratch, tile=tile)
                return dk.matvec(x[0], w, gain=gain, eps=1e-5, swiglu=kind == "swiglu", tile=tile)

            try:
                error = (ours(0).float() - reference).abs().max().item()
                us = graph_time_us(ours, LAYERS)
            except Exception as exc:  # a tile that does not compile or fit, say
                entry["x".join(map(str, tile))] = {"error": str(exc)[:200]}
                continue
            entry["x".join(map(str, tile))] = {"us": round(us, 2), "tb_s": round(gbytes / us * 1e3, 3),
                                               "max_abs_diff": round(error, 4)}
        best = min((v["us"], key) for key, v in entry.items() if "us" in v and key[0].isdigit())
        entry["best"] = best[1]
        out[f"{n // 2 if kind == 'swiglu' else n}x{k}"] = entry   # the shape decode_kernels.TILES keys
        print(f"{name} {n}x{k}: cuBLAS {entry['cublas']['us']} us ({entry['cublas']['tb_s']} TB/s), best ours "
              f"{best[1]} {best[0]} us ({entry[best[1]]['tb_s']} TB/s)", flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    return out


def bench_attention(span: int = 1280, position: int = 1087) -> dict:
    """Batch 1, from the Q/K/V projection's output: SDPA with a mask (the torch layer; its RoPE and cache
    writes are kernels of their own, not counted) and fused_attention per programs per SM, block and warps."""
    import torch
    import torch.nn.functional as F

    from trtrag_cli.generate.decode import kernels as dk

    caches = [(torch.randn(1, HEADS, 2304, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
               torch.randn(1, HEADS, 2304, HEAD_DIM, device="cuda", dtype=torch.bfloat16)) for _ in range(LAYERS)]
    qkv = torch.randn(1, 3 * HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cos, sin = (torch.randn(4096, HEAD_DIM, device="cuda").bfloat16() for _ in range(2))
    positions = torch.full((1,), position, device="cuda", dtype=torch.long)
    visible = (torch.arange(span, device="cuda")[None, :] <= positions[:, None])[:, None, None, :]
    counts = torch.zeros(HEADS, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5
    q = qkv[:, :HEADS * HEAD_DIM].view(1, HEADS, 1, HEAD_DIM)

    def sdpa(i, q=q):
        k, v = caches[i]
        return F.scaled_dot_product_attention(q, k[:, :, :span], v[:, :, :span], attn_mask=visible, scale=scale)

    entry = {"sdpa_us": round(graph_time_us(sdpa, LAYERS), 2)}
    dk.fused_attention(qkv, cos, sin, positions, *caches[0], counts, scale, HEADS)   # writes position
    half = HEAD_DIM // 2
    rotated = q * cos[position] + torch.cat((-q[..., half:], q[..., :half]), -1) * sin[position]
    reference = sdpa(0, rotated.bfloat16()).reshape(1, -1).float()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for per_sm, block, warps in itertools.product((1, 2, 3, 4), (16, 32, 64), (4, 8)):
        label = f"{per_sm}x{block}x{warps}"

        def fused(i, splits=max(1, per_sm * sms // HEADS), block=block, warps=warps):
            k, v = caches[i]
            return dk.fused_attention(qkv, cos, sin, positions, k, v, counts, scale, HEADS, splits=splits,
                                      block=block, warps=warps)
        try:
            error = (fused(0).float() - reference).abs().max().item()
            us = graph_time_us(fused, LAYERS)
        except Exception as exc:  # a configuration that does not compile or fit, say
            entry[label] = {"error": str(exc)[-300:]}
            continue
        entry[label] = {"us": round(us, 2), "max_abs_diff": round(error, 4)}
    timed = [(v["us"], key) for key, v in entry.items() if isinstance(v, dict) and "us" in v]
    entry["best"] = min(timed)[1]
    entry["counts_left_zero"] = bool((counts == 0).all().item())
    entry["kv_bytes_read_gb"] = round(2 * HEADS * (position + 1) * HEAD_DIM * 2 / 1e9, 4)
    print(f"attention: {json.dumps(entry)}", flush=True)
    caches.clear()
    torch.cuda.empty_cache()
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-kernels.json"))
    ap.add_argument("--tiles", default=TILES, help="BLOCK_NxBLOCK_KxWARPSxSPLITSxHALVES, comma-separated")
    ap.add_argument("--skip", default="", help="matrices,attention: parts to leave out")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="which matrices to time: " + ",".join(SHAPES))
    args = ap.parse_args()

    import torch

    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if "attention" not in args.skip:
        report["attention"] = bench_attention()
    if "matrices" not in args.skip:
        report["matrices"] = bench_matrices(tiles, args.shapes.split(","))
        report["best_tiles"] = {shape: entry["best"] for shape, entry in report["matrices"].items()}

    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
