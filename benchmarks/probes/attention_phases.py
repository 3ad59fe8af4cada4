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
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import random_llama_13b, step_loop_ms  # noqa: E402

from trtrag_cli.generators import decode_kernels as dk  # noqa: E402
from trtrag_cli.generators.graph_decode import GraphDecoder  # noqa: E402

GREEDY = (0.0, 0, 1.0)
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
    out_dir = os.environ.get("OUT", ".")
    model = random_llama_13b()
    dec = GraphDecoder(model, compile=False)
    original = dk._attention_kernel
    kernels = {"full": original, "no_combine": variant(True, False), "first_block": variant(False, True),
               "neither": variant(True, True)}
    graphs = {}
    with torch.inference_mode():
        dec._ensure_cache(1, 1152)
        dec.prefill(list(range(100, 1124)), 0)
        for name, kernel in kernels.items():
            dk._attention_kernel = kernel
            dec._graphs = {}
            dec.tokens[:1].fill_(1000)
            dec.positions[:1].fill_(1024)
            graphs[name] = dec._graph(1, 1280, GREEDY)
        dk._attention_kernel = original

        rounds = {name: [] for name in kernels}
        for _ in range(7):
            for name, graph in graphs.items():
                rounds[name].append(round(step_loop_ms(dec, graph), 4))
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    report = {"gpu": torch.cuda.get_device_name(0), "ms_per_step": medians,
              "us_per_layer_saved": {name: round((medians["full"] - m) * 1e3 / 40, 2) for name, m in medians.items()},
              "rounds_ms": rounds}
    print(json.dumps(report, indent=1))
    with open(f"{out_dir}/attention-phases.json", "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
