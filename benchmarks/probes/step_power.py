"""Probe: what the batch-1 decode step draws (Llama-2-13B shape, random bf16, after a 1024-token prompt), and
how much of it the matrix kernels' arithmetic is. H200 cards at their 700 W limit lower the SM clock and decode
1-3% slower; fewer instructions a weight would help them only if the arithmetic is a real share of the power.
The step is replayed 500 times a round per variant, taking turns, 3 rounds, with nvidia-smi sampling every
100 ms (doctor.GpuWatch):
  as_is      the kernels as they are
  extra_fma  one more FMA for every weight in the matrix kernels (the sums become garbage; the bytes are the
             same), which shows what the arithmetic costs in watts and in time
and then decode_kernels.EVEN on and off: whole tiles loaded without per-element masks or with them. (Run 43
also timed the tile loop unrolled by two, which spared the register copies but took more registers: 2.5%
slower at full clock; not kept.)
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/step_power.py
"""
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import edited_kernels, random_llama_13b, step_rounds  # noqa: E402

from trtrag_cli.generate.decode import kernels as dk
from trtrag_cli.generate.decode.graph import GraphDecoder

SUM = "        acc += w.to(tl.float32) * x[None, :]\n"
SUM_PAIR = "            acc_pair += u.to(tl.float32) * x[None, :]\n"


def main() -> None:
    dec = GraphDecoder(random_llama_13b(), compile=False)
    heavier = edited_kernels("extra_fma", {"_matvec_kernel": [
        (SUM, SUM + "        acc += w.to(tl.float32) * w.to(tl.float32)\n"),
        (SUM_PAIR, SUM_PAIR + "            acc_pair += u.to(tl.float32) * u.to(tl.float32)\n")]})
    step_rounds(dec, dec, "kernels", {"as_is": dk, "extra_fma": heavier}, "step-power.json", rounds=3, steps=500,
                watch=True)
    step_rounds(dec, dk, "EVEN", {"even": True, "masked": False}, "step-power-even.json", rounds=3, steps=500,
                watch=True)


if __name__ == "__main__":
    main()
