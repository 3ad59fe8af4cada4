"""Scratch probe (not in the product): matrix-kernel load variants in time and joules, plus the energy floor of
just reading the step's bytes. OUT=dir PYTHONPATH=$PWD python .gpu-base/probe_energy.py"""
import importlib.util
import json
import os
import statistics
import sys

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gpu_generation import random_llama_13b, step_rounds  # noqa: E402

from trtrag_cli.util.gpu import GpuWatch
from trtrag_cli.generate.decode import kernels as dk
from trtrag_cli.generate.decode.graph import GraphDecoder


def load(name):
    spec = importlib.util.spec_from_file_location(name, f".gpu-base/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@triton.jit
def _stream(ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def check(variants):
    torch.manual_seed(0)
    shapes = {"qkv": (15360, 5120, "gain"), "o": (5120, 5120, "out"), "gate_up": (2 * 13824, 5120, "swiglu"),
              "down": (5120, 13824, "out"), "head": (32000, 5120, "gain")}
    report = {}
    for label, (n, k, kind) in shapes.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        x = torch.randn(k, device="cuda")
        xb = x.bfloat16()
        g = (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
        if kind == "out":
            want = w.float() @ xb.float()
        else:
            normed = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * g.float()
            want = w.float() @ normed
            if kind == "swiglu":
                want = torch.nn.functional.silu(want[: n // 2]) * want[n // 2:]
        for name, m in variants.items():
            if kind == "out":
                got = torch.zeros(n, device="cuda")
                m.matvec(xb, w, out=got)
            else:
                got = m.matvec(x, w, gain=g, eps=1e-5, swiglu=kind == "swiglu").float()
            report.setdefault(name, {})[label] = float((got - want).abs().max() / want.abs().max())
    print(json.dumps({"max_rel_err": report}, indent=1), flush=True)
    return report


def floor(dec, rounds=3, reps=200):
    tensors = [t for layer in dec.layers for t in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [dec.head]
    tensors += [c for pair in dec._cache for c in pair]
    total = sum(t.numel() * t.element_size() for t in tensors)
    words = [t.view(torch.int32).reshape(-1) for t in tensors]
    programs = torch.cuda.get_device_properties(0).multi_processor_count * 8
    scratch = torch.empty(programs * 1024, dtype=torch.int32, device="cuda")

    def run():
        for t in words:
            _stream[(programs,)](t, scratch, t.numel(), BLOCK=1024, num_warps=4)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    out = {"bytes_gb": round(total / 1e9, 3), "rounds": []}
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with GpuWatch(every_ms=100) as gpu:
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
        ms = start.elapsed_time(end) / reps
        s = gpu.summary()
        out["rounds"].append({"ms": round(ms, 4), "tb_s": round(total / ms / 1e9, 3), "gpu": s,
                              "joules": round(s["power_w"]["median"] * ms / 1e3, 3) if s else None})
    out["ms"] = statistics.median(r["ms"] for r in out["rounds"])
    print(json.dumps({"floor": out}, indent=1), flush=True)
    return out


def main():
    variants = {"as_is": dk}
    for name in ("dk_packed", "dk_noalloc", "dk_nc_noalloc", "dk_scalar_ef"):
        variants[name[3:]] = load(name)
    errors = check(variants)
    dec = GraphDecoder(random_llama_13b(), compile=False)
    report = step_rounds(dec, dec, "kernels", variants, "energy-variants.json", rounds=3, steps=500, watch=True)
    report["max_rel_err"] = errors
    report["floor"] = floor(dec)
    with open(os.path.join(os.environ.get("OUT", "."), "energy-variants.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
