"""Probe: would the matrix kernels read the weights for less time or energy if each program's weight tile were
one contiguous block of memory? Today a [BLOCK_N x BLOCK_K] tile is BLOCK_N pieces of a row each (512 bytes
apart by a row's length), and thousands of programs stream such pieces at once; a layout with every tile
stored whole (4 KB for 8 x 256 bf16) would ask the memory for longer runs. The kernels are rebuilt with the
tile addresses of that layout over the same weight tensors, so the bytes are the same and the sums are
garbage (only time and power mean anything). Batch-1 step after a 1024-token prompt (Llama-2-13B shape,
random bf16), replayed 500 times a round per variant, taking turns, 3 rounds, with nvidia-smi every 100 ms:
  rows    the kernels as they are
  tiles   each program's tile read from one contiguous block
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/tile_layout.py
"""
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import edited_kernels, random_llama_13b, step_rounds  # noqa: E402

from trtrag_cli.generate.decode import kernels as dk
from trtrag_cli.generate.decode.graph import GraphDecoder

# A program's rows become one region of BLOCK_N * K elements, its tiles BLOCK_N * BLOCK_K apart in it: the
# tile at column start begins at start * BLOCK_N, its row r at r * BLOCK_K.
TILED = [("rows = w_ptr + cols[:, None] * K",
          "rows = w_ptr + tl.program_id(0) * BLOCK_N * K + tl.arange(0, BLOCK_N)[:, None] * BLOCK_K"),
         ("_weights(rows, first, col_ok, last,", "_weights(rows, first * BLOCK_N, col_ok, last * BLOCK_N,"),
         ("_weights(pairs, first, col_ok, last,", "_weights(pairs, first * BLOCK_N, col_ok, last * BLOCK_N,"),
         ("_weights(rows, coming, col_ok, last,", "_weights(rows, coming * BLOCK_N, col_ok, last * BLOCK_N,"),
         ("_weights(pairs, coming, col_ok, last,", "_weights(pairs, coming * BLOCK_N, col_ok, last * BLOCK_N,")]


def main() -> None:
    dec = GraphDecoder(random_llama_13b(), compile=False)
    variants = {"rows": dk, "tiles": edited_kernels("tiles", {"_matvec_kernel": TILED})}
    step_rounds(dec, dec, "kernels", variants, "tile-layout.json", rounds=3, steps=500, watch=True)


if __name__ == "__main__":
    main()
