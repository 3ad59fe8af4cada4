"""Probe: the batch-1 decode step (Llama-2-13B shape, random bf16, after a 1024-token prompt) reading its matrices
as bf16 or as 12-bit packed copies (decode_kernels.Packed: lossless, 1.5 bytes a weight), in time and joules.
First each packed matrix is checked: unpacked it equals the bf16 one bit for bit, and its matvec agrees with
the bf16 kernel's. Then the step is replayed 500 times a round per variant, taking turns, 3 rounds, with
nvidia-smi every 100 ms:
  bf16        the matrices as they are
  packed      packed in tiles of 512 columns, TILES's rows and warps
  rows_16     the same with 16 rows a tile (8 pairs for gate/up): what GraphDecoder.pack_weights does since
              run 49
  warps_8     with 8 warps a program
  k_1024      in tiles of 1024 columns where K allows (down keeps 512)
Run 48 (card ...968, at its power limit) also packed in tiles of 256 columns: 6.733 ms a step, against 6.422 in
tiles of 512 and 6.700 for bf16.
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/packed_step.py
"""
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import random_llama_13b, step_rounds  # noqa: E402

from trtrag_cli.generate.decode import kernels as dk
from trtrag_cli.generate.decode.graph import GraphDecoder


def packed_matrices(dec, block_k: int = 512, rows: int = 0, warps: int = 0, like: list | None = None) -> list:
    """dec's step matrices as decode_kernels.pack packs them, repacked in tiles of block_k columns where K
    allows and pack chose otherwise, in TILES's tile or, with rows or warps given, BLOCK_N (halved for gate/up's
    pairs) or warps other than TILES's. like: another such list, whose packed data these share (only the tile
    differs)."""
    shared = iter(dec.step_matrix_list(like) if like else [])

    def packed(weight, **usage):
        chosen = copy.copy(next(shared)) if like else dk.pack(weight, **usage)
        if not isinstance(chosen, dk.Packed):
            return weight
        k = weight.shape[1]
        if k % block_k == 0 and block_k != chosen.block_k:
            chosen = dk.Packed(weight, block_k)
        n = weight.shape[0] // 2 if usage.get("swiglu") else weight.shape[0]
        tile = list(dk._tile(n, k, usage.get("accumulate", False), usage.get("swiglu", False)))
        if rows:
            tile[0] = rows // 2 if tile[4] == 2 and usage.get("swiglu") else rows
        tile[2] = warps or tile[2]
        chosen.tile = tuple(tile)
        return chosen
    return dec._step_matrices(packed)


def check(dec, matrices) -> dict:
    """Per kind of matrix (the first layer's, and the head): lossless, fixes, and the matvec's largest
    difference from the bf16 kernel's relative to the largest output."""
    torch.manual_seed(0)
    report = {}
    *layers, head = matrices
    plain = dict(zip(("qkv", "o", "gate_up", "down"), (dec.layers[0].qkv, dec.layers[0].o, dec.layers[0].gate_up,
                                                       dec.layers[0].down)), head=dec.head)
    for name, packed in (*zip(("qkv", "o", "gate_up", "down"), layers[0]), ("head", head)):
        weight = plain[name]
        k = weight.shape[1]
        x, gain = torch.randn(k, device="cuda"), (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
        if name in ("o", "down"):
            want, got = torch.zeros(weight.shape[0], device="cuda"), torch.zeros(weight.shape[0], device="cuda")
            dk.matvec(x.bfloat16(), weight, out=want)
            dk.matvec(x.bfloat16(), packed, out=got)
        else:
            kw = dict(gain=gain, eps=1e-5, swiglu=name == "gate_up")
            want, got = dk.matvec(x, weight, **kw).float(), dk.matvec(x, packed, **kw).float()
        report[name] = {"lossless": bool(torch.equal(packed.unpacked(), weight)), "fixes": packed.fix_count,
                        "fix_share": packed.fix_count / weight.numel(), "base": packed.base,
                        "max_rel_diff": float((got - want).abs().max() / want.abs().max())}
    return report


def main() -> None:
    dec = GraphDecoder(random_llama_13b(), compile=False)
    plain = dec.step_matrices
    started = time.perf_counter()
    packed = packed_matrices(dec)
    report = {"pack_seconds": round(time.perf_counter() - started, 1)}
    variants = {"bf16": plain, "packed": packed, "rows_16": packed_matrices(dec, rows=16, like=packed),
                "warps_8": packed_matrices(dec, warps=8, like=packed), "k_1024": packed_matrices(dec, 1024)}
    report["check"] = {name: check(dec, matrices) for name, matrices in variants.items() if name != "bf16"}
    report["gib"] = {"bf16": sum(t.numel() * 2 for t in dec.step_matrix_list(plain)) / 2**30,
                     "packed": sum(m.low.numel() + m.codes.numel() for m in dec.step_matrix_list(packed)) / 2**30}
    print(json.dumps(report, indent=1), flush=True)
    timed = step_rounds(dec, dec, "step_matrices", variants, "packed-step.json", rounds=3, steps=500, watch=True)
    timed.update(report)
    with open(os.path.join(os.environ.get("OUT", "."), "packed-step.json"), "w") as f:
        json.dump(timed, f, indent=1)


if __name__ == "__main__":
    main()
