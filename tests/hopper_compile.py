"""Compile decode_kernels for a Hopper GPU (sm_90) without one: the configurations a Llama-2-13B step and a
grouped-K/V model launch. Prints JSON: per configuration, the registers per thread and the stack bytes
(spilled registers), read from the cubin with the cuobjdump that triton's NVIDIA backend carries.

Run in its own process (tests/test_decode_kernels.py does): under TRITON_INTERPRET the kernels are not
compiled at all.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtrag_cli.generate.decode import kernels as dk

# What a launch tells triton divides by 16: pointers to contiguous tensors, their strides, and the Llama-2-13B
# sizes and K spans (all multiples of 16, which triton specialises on; the loads are vectorised for it).
ALIGNED = re.compile(r"_ptr$|^stride_|^(N|K|span)$")


def compile_for_hopper(kernel, types: dict, constants: dict, warps: int) -> dict:
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: types.get(name, "constexpr") for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in names if ALIGNED.search(name)}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "launch_pdl": constants.get("PDL", False)})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1))}


# The matrix kernels' uses in a Llama-2-13B step: weight shape [N, K] and the flags matvec sets for it.
USES = {"qkv": (15360, 5120, dict(RMSNORM=True)), "o": (5120, 5120, dict(ACCUMULATE=True)),
        "gate_up": (13824, 5120, dict(RMSNORM=True, SWIGLU=True)), "down": (5120, 13824, dict(ACCUMULATE=True)),
        "head": (32000, 5120, dict(RMSNORM=True)),
        "qkv, first layer": (15360, 5120, dict(RMSNORM=True, EMBED=True)),   # x is the embedding table
        "head, greedy": (32000, 5120, dict(RMSNORM=True, GREEDY=True))}


def _uses():
    """Per use: its name, TILES's tile, the kernel's flags (all of them, PAIRED as matvec sets it), and the
    types of x and out."""
    for name, (n, k, flags) in USES.items():
        block_n, block_k, warps, _, halves = dk._tile(n, k, flags.get("ACCUMULATE", False), "SWIGLU" in flags)
        paired, _ = dk._program_rows(n, "SWIGLU" in flags, halves, "GREEDY" in flags)
        flags = dict(RMSNORM=False, SWIGLU=False, ACCUMULATE=False, HAS_BIAS=False, EMBED=False, GREEDY=False,
                     PDL=True) | flags | dict(PAIRED=paired)
        types = dict(x_ptr="*bf16" if flags["EMBED"] else "*fp32", out_ptr="*fp32" if flags["ACCUMULATE"] else "*bf16")
        yield name, (block_n, block_k, warps), flags, types


def matvec_configurations():
    types = dict(w_ptr="*bf16", bias_ptr="*bf16", gain_ptr="*bf16", token_ptr="*i64", copy_ptr="*fp32",
                 best_ptr="*i64", N="i32", K="i32", span="i32", eps="fp32")
    for name, (block_n, block_k, warps), flags, ends in _uses():
        constants = flags | dict(EVEN=dk.EVEN, BLOCK_N=block_n, BLOCK_K=block_k)
        yield f"matvec {name}", dk._matvec_kernel, types | ends, constants, warps


def packed_configurations():
    """The same uses over decode_kernels.Packed matrices, in pack's tiles (ASM: PRMT in inline PTX)."""
    types = dict(low_ptr="*i32", code_ptr="*i32", start_ptr="*i32", row_ptr="*i32", col_ptr="*i32",
                 true_ptr="*fp32", decoded_ptr="*fp32", bias_ptr="*bf16", gain_ptr="*bf16", token_ptr="*i64",
                 copy_ptr="*fp32", best_ptr="*i64", N="i32", K="i32", span="i32", eps="fp32", base="i32")
    for name, (block_n, _, warps), flags, ends in _uses():
        constants = flags | dict(FIXES=True, ASM=True, BLOCK_N=2 * block_n, BLOCK_K=512, CHUNK=32)
        yield f"packed {name}", dk._packed_kernel, types | ends, constants, warps


def attention_configurations():
    types = {name: "*bf16" for name in ("qkv_ptr", "cos_ptr", "sin_ptr", "k_ptr", "v_ptr", "out_ptr")}
    types.update(pos_ptr="*i64", part_ptr="*fp32", stats_ptr="*fp32", count_ptr="*i32", stride_qkv="i32",
                 stride_cb="i32", stride_ch="i32", stride_cl="i32", scale="fp32", H="i32", KVH="i32", splits="i32")
    for name, group in (("attention 40 heads", 1), ("attention groups of 8", 8)):
        constants = dict(GROUP=group, ROWS=16, BLOCK=dk.ATTENTION["block"], SLOTS=8, D=128, PRECISION="tf32",
                         PDL=True)
        yield name, dk._attention_kernel, types, constants, dk.ATTENTION["warps"]


if __name__ == "__main__":
    report = {name: compile_for_hopper(kernel, types, constants, warps) for name, kernel, types, constants, warps
              in [*matvec_configurations(), *packed_configurations(), *attention_configurations()]}
    print(json.dumps(report))
