"""Probe: what the decode attention's phases cost inside the step (Llama-2-13B shape, random bf16, batch 1,
after a 1024-token prompt). decode_kernels._attention_kernel is rebuilt from its own source with one phase
cut, and the whole step is captured and replayed per variant, taking turns (ms per step, 7 rounds of 64):
  full          the kernel as it is
  no_combine    without the last program's combine (the counter and the sum over runs)
  first_block   each program sums only the block it loads before its wait (the rest of its run is skipped)
  neither       both cuts
The cut variants compute wrong attention: only their time means anything.
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/attention_phases.py
"""
import importlib.util
import inspect
import os
import sys
import tempfile


sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import random_llama_13b, step_rounds  # noqa: E402

from trtrag_cli.generators import decode_kernels as dk  # noqa: E402
from trtrag_cli.generators.graph_decode import GraphDecoder  # noqa: E402

COMBINE = "    # The last program of this row and K/V head to finish combines them all (no second kernel).\n"
LOOP = "    for start in range(first, last, BLOCK):\n"


def variant(no_combine: bool, first_block: bool):
    """decode_kernels._attention_kernel with phases cut, compiled from a module written for it."""
    source = inspect.getsource(dk._attention_kernel.fn)
    source = source[source.index("def _attention_kernel("):]            # without its decorator
    assert COMBINE in source and LOOP in source, "the kernel changed: update the probe's cut points"
    if no_combine:
        source = source[:source.index(COMBINE)]
    if first_block:
        source = source.replace(LOOP, "    for start in range(first, tl.minimum(last, first + BLOCK), BLOCK):\n")
    module = ("import triton\nimport triton.language as tl\n"
              "from trtrag_cli.generators.decode_kernels import _await_previous, _rope_rows\n\n\n"
              "@triton.jit\n" + source)
    path = os.path.join(tempfile.mkdtemp(), f"attention_{int(no_combine)}{int(first_block)}.py")
    with open(path, "w") as f:
        f.write(module)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded._attention_kernel


def main() -> None:
    kernels = {"full": dk._attention_kernel, "no_combine": variant(True, False), "first_block": variant(False, True),
               "neither": variant(True, True)}
    step_rounds(GraphDecoder(random_llama_13b(), compile=False), dk, "_attention_kernel", kernels,
                "attention-phases.json")


if __name__ == "__main__":
    main()
