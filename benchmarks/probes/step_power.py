"""Probe: what the batch-1 decode step draws (Llama-2-13B shape, random bf16, after a 1024-token prompt), with
the product's own switch between its two ways of loading weight tiles. H200 cards at their 700 W limit lower the
SM clock and decode 1-3% slower, so time alone does not say which form is cheaper: the step is replayed 500
times a round per variant, taking turns, 3 rounds, with nvidia-smi sampling every 100 ms (util.gpu.GpuWatch),
and the report gives ms, watts and joules a step:
  even    decode_kernels.EVEN = True (the default): whole tiles loaded without per-element masks
  masked  decode_kernels.EVEN = False: every tile loaded with masks
Runs 42-44 also timed kernels rebuilt from edited source (one more FMA a weight; the tile loop unrolled); those
variants changed product source text and are gone from this probe (docs/benchmarks.md keeps their figures).
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/step_power.py
"""
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import random_llama_13b, step_rounds  # noqa: E402

from trtrag_cli.generate.decode import kernels as dk
from trtrag_cli.generate.decode.graph import GraphDecoder


def main() -> None:
    dec = GraphDecoder(random_llama_13b(), compile=False)
    step_rounds(dec, dk, "EVEN", {"even": True, "masked": False}, "step-power.json", rounds=3, steps=500,
                watch=True)


if __name__ == "__main__":
    main()
