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
from trtrag_cli.generators import decode_kernels as dk  # noqa: E402

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


def matvec_configurations():
    types = dict(x_ptr="*fp32", w_ptr="*bf16", out_ptr="*bf16", bias_ptr="*bf16", gain_ptr="*bf16",
                 token_ptr="*i64", copy_ptr="*fp32", best_ptr="*i64", N="i32", K="i32", span="i32", eps="fp32")
    uses = {"qkv": (15360, 5120, dict(RMSNORM=True)), "o": (5120, 5120, dict(ACCUMULATE=True)),
            "gate_up": (13824, 5120, dict(RMSNORM=True, SWIGLU=True)), "down": (5120, 13824, dict(ACCUMULATE=True)),
            "head": (32000, 5120, dict(RMSNORM=True)),
            "qkv, first layer": (15360, 5120, dict(RMSNORM=True, EMBED=True)),   # x is the embedding table
            "head, greedy": (32000, 5120, dict(RMSNORM=True, GREEDY=True))}
    for name, (n, k, flags) in uses.items():
        block_n, block_k, warps, _, halves = dk._tile(n, k, flags.get("ACCUMULATE", False), "SWIGLU" in flags)
        constants = dict(RMSNORM=False, SWIGLU=False, ACCUMULATE=False, HAS_BIAS=False, EMBED=False, GREEDY=False,
                         PDL=True, EVEN=dk.EVEN, BLOCK_N=block_n, BLOCK_K=block_k) | flags \
            | dict(PAIRED=halves == 2)
        out = "*fp32" if constants["ACCUMULATE"] else "*bf16"
        x = "*bf16" if constants["EMBED"] else "*fp32"
        yield f"matvec {name}", dk._matvec_kernel, dict(types, out_ptr=out, x_ptr=x), constants, warps


def packed_configurations():
    """The same uses over decode_kernels.Packed matrices, in pack's tiles (ASM: PRMT in inline PTX)."""
    types = dict(x_ptr="*fp32", low_ptr="*i32", code_ptr="*i32", start_ptr="*i32", row_ptr="*i32", col_ptr="*i32",
                 true_ptr="*fp32", decoded_ptr="*fp32", bias_ptr="*bf16", gain_ptr="*bf16", token_ptr="*i64",
                 copy_ptr="*fp32", best_ptr="*i64", N="i32", K="i32", span="i32", eps="fp32", base="i32")
    uses = {"qkv": (15360, 5120, dict(RMSNORM=True)), "o": (5120, 5120, dict(ACCUMULATE=True)),
            "gate_up": (13824, 5120, dict(RMSNORM=True, SWIGLU=True)), "down": (5120, 13824, dict(ACCUMULATE=True)),
            "head, greedy": (32000, 5120, dict(RMSNORM=True, GREEDY=True)),
            "qkv, first layer": (15360, 5120, dict(RMSNORM=True, EMBED=True))}
    for name, (n, k, flags) in uses.items():
        block_n, _, warps, _, halves = dk._tile(n, k, flags.get("ACCUMULATE", False), "SWIGLU" in flags)
        constants = dict(RMSNORM=False, SWIGLU=False, ACCUMULATE=False, HAS_BIAS=False, EMBED=False, GREEDY=False,
                         PDL=True, FIXES=True, ASM=True, BLOCK_N=2 * block_n, BLOCK_K=512, CHUNK=32) | flags \
            | dict(PAIRED=halves == 2 and "GREEDY" not in flags)
        out = "*fp32" if constants["ACCUMULATE"] else "*bf16"
        x = "*bf16" if constants["EMBED"] else "*fp32"
        yield f"packed {name}", dk._packed_kernel, dict(types, out_ptr=out, x_ptr=x), constants, warps


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
