"""Probe: how much of the batch-1 decode step is kernels waiting for the one before (Llama-2-13B shape,
random bf16, after a 1024-token prompt). decode_kernels is rebuilt from its own source with some PDL waits
(gdc_wait) removed, so that those kernels run on while the previous one finishes, as a persistent kernel with
perfect overlap would at best; the step is captured and replayed per variant, taking turns (ms per step,
7 rounds of 64):
  waits              the kernels as they are
  no_waits           no kernel waits (the lower bound of any scheme that overlaps the step's phases)
  no_matvec_waits    the matrix kernels do not wait; attention and the greedy pick do
  no_attention_wait  attention does not wait for Q/K/V; the others do
  no_attention       attention is not launched at all (o reads whatever its input holds)
Variants other than `waits` compute garbage: only their time means anything.
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/dependency_bound.py
"""
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import edited_kernels, random_llama_13b, step_rounds  # noqa: E402

from trtrag_cli.generate.decode import kernels as dk
from trtrag_cli.generate.decode.graph import GraphDecoder

WAIT = "_await_previous(PDL)"
LAUNCH_ONLY = '''

@triton.jit
def _launch_only(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
'''


def rebuilt(name: str, unwaited: tuple[str, ...]):
    """decode_kernels compiled from a copy of its source in which the kernels named call _launch_only instead
    of _await_previous."""
    return edited_kernels(name, {kernel: [(WAIT, "_launch_only(PDL)")] for kernel in unwaited}, LAUNCH_ONLY)


def without_attention(module):
    """A copy of the module's interface whose fused_attention launches nothing."""
    class Kernels:
        matvec = staticmethod(module.matvec)

        @staticmethod
        def fused_attention(qkv, cos, sin, positions, k_cache, v_cache, counts, scale, heads):
            return torch.empty(1, heads * k_cache.shape[-1], dtype=qkv.dtype, device=qkv.device)
    return Kernels


def main() -> None:
    dec = GraphDecoder(random_llama_13b(), compile=False)
    variants = {"waits": dk,
                "no_waits": rebuilt("no_waits", ("_matvec_kernel", "_attention_kernel", "_pick_kernel")),
                "no_matvec_waits": rebuilt("no_matvec_waits", ("_matvec_kernel",)),
                "no_attention_wait": rebuilt("no_attention_wait", ("_attention_kernel",)),
                "no_attention": without_attention(dk)}
    step_rounds(dec, dec, "kernels", variants, "dependency-bound.json")


if __name__ == "__main__":
    main()
