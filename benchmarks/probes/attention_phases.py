"""Probe: what the decode attention's phases cost inside the step (Llama-2-13B shape, random bf16, batch 1,
after a 1024-token prompt). decode_kernels is rebuilt from its own source with one phase of the attention
kernel cut, and the whole step is captured and replayed per variant, taking turns (ms per step, 7 rounds of 64):
  full          the kernel as it is
  no_combine    without the last program's combine (the counter and the sum over runs)
  first_block   each program sums only the block it loads before its wait (the rest of its run is skipped)
  neither       both cuts
The cut variants compute wrong attention: only their time means anything.
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/attention_phases.py
"""
import inspect
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import edited_kernels, random_llama_13b, step_rounds  # noqa: E402

from trtrag_cli.generate.decode import kernels as dk
from trtrag_cli.generate.decode.graph import GraphDecoder

COMBINE = "    # The last program of this row and K/V head to finish combines them all (no second kernel).\n"
LOOP = "    for start in range(first, last, BLOCK):\n"


def variant(no_combine: bool, first_block: bool):
    """decode_kernels._attention_kernel with phases cut (gpu_generation.edited_kernels)."""
    source = inspect.getsource(dk._attention_kernel.fn)
    assert COMBINE in source and LOOP in source, "the kernel changed: update the probe's cut points"
    edits = []
    if no_combine:                            # everything from the combine to the kernel's end
        edits.append((source[source.index(COMBINE):], ""))
    if first_block:
        edits.append((LOOP, "    for start in range(first, tl.minimum(last, first + BLOCK), BLOCK):\n"))
    module = edited_kernels(f"attention_{int(no_combine)}{int(first_block)}", {"_attention_kernel": edits})
    return module._attention_kernel


def main() -> None:
    kernels = {"full": dk._attention_kernel, "no_combine": variant(True, False), "first_block": variant(False, True),
               "neither": variant(True, True)}
    step_rounds(GraphDecoder(random_llama_13b(), compile=False), dk, "_attention_kernel", kernels,
                "attention-phases.json")


if __name__ == "__main__":
    main()
