"""Which TensorRT is installed, and the few places where TensorRT 10, 11 and TensorRT-RTX differ.

Kept under encode/ (not engine/) because both the plan builder (engine/tensorrt.py) and the plan loader
(encode/tensorrt.py) go through it, and encode sits below engine in the import layers.

  import name      `tensorrt` (10.x, 11.x) or `tensorrt_rtx_bindings` (TensorRT-RTX, pip packages
                   tensorrt-rtx-cu13-libs and tensorrt-rtx-cu13-bindings). Full TensorRT is preferred when
                   both are installed: it is the one that runs on data-centre GPUs (H100's 9.0 is not an
                   RTX target).
  targets          TensorRT-RTX builds ahead of time, on a machine without a GPU, for the compute
                   capabilities named on the builder config (`ComputeCapability.SM89`, ...; the enum is the
                   list of what it supports). TensorRT 10/11 builds for the GPU it runs on, so its only
                   target is that GPU. Probed with hasattr, never with a version number.
  precision        all three are strongly typed here: precision comes from the ONNX (Q/DQ for INT8, a
                   mixed-precision model for FP16). TensorRT-RTX has no FP16/INT8 builder flags at all, nor
                   has TensorRT 11; only TensorRT 10 still offers the legacy FP16 flag (engine/tensorrt.py).
  timing cache     TensorRT 10/11 reuse measured tactics through the builder's timing cache. TensorRT-RTX
                   1.2+ keeps the calls but they are no-ops (its own DeprecationWarning says so, 1.7.1):
                   kernels are compiled just in time on the GPU, and its runtime cache (IRuntimeConfig) is
                   what keeps them, so the builder skips the timing cache there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType

from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError

# (import name, what we call it), in order of preference.
CANDIDATES = (("tensorrt", "tensorrt"), ("tensorrt_rtx_bindings", "tensorrt-rtx"))
# Where no GPU is visible, TensorRT-RTX builds for this compute capability (RTX 40xx, L4, L40S).
DEFAULT_AOT_TARGET = "8.9"


@dataclass(frozen=True)
class TrtRuntime:
    """One installed TensorRT flavour: its module, name and version, and how to drive its builder."""

    name: str
    module: ModuleType

    @property
    def version(self) -> str:
        """The library's version string (e.g. 10.13.0.35 or 1.7.1.116)."""
        return str(self.module.__version__)

    @property
    def label(self) -> str:
        """Name and version, as reports and error messages show it."""
        return f"{self.name} {self.version}"

    @property
    def ahead_of_time(self) -> bool:
        """Whether the builder takes named target compute capabilities (and so needs no GPU)."""
        return hasattr(self.module, "ComputeCapability") and hasattr(self.module.IBuilderConfig,
                                                                     "set_compute_capability")

    def aot_targets(self) -> tuple[str, ...]:
        """Compute capabilities this runtime builds for ahead of time, as "8.9"; () when it cannot."""
        if not self.ahead_of_time:
            return ()
        out = []
        for member in self.module.ComputeCapability.__members__:
            m = re.fullmatch(r"SM(\d+)(\d)", member)
            if m:
                out.append(f"{m.group(1)}.{m.group(2)}")
        return tuple(out)

    @property
    def uses_timing_cache(self) -> bool:
        """TensorRT-RTX accepts the timing-cache calls as no-ops (see the module docstring)."""
        return self.name != "tensorrt-rtx"

    def network_flags(self, strongly_typed: bool) -> int:
        """create_network's flags: STRONGLY_TYPED looked up by name (its bit is 1 in 10.x, 0 in 11.x)."""
        return 1 << int(self.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0

    def set_targets(self, config, targets: list[str]) -> None:
        """Name the compute capabilities the plan is built for (ahead-of-time runtimes only)."""
        trt = self.module
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), i):
                raise TrtragError(f"{self.label} refused target compute capability {cc}",
                                  f"use engine.trt_targets from: {', '.join(self.aot_targets())}")


def installed() -> TrtRuntime | None:
    """The preferred TensorRT flavour that imports here, or None."""
    for module, name in CANDIDATES:
        if deps.available(module):
            try:
                return TrtRuntime(name, deps.require(module))
            except Exception:  # noqa: BLE001 - a wheel whose native library fails to load counts as absent
                continue
    return None


def require(purpose: str = "the TensorRT encoder") -> TrtRuntime:
    """The installed TensorRT flavour, or a one-line error naming both ways to install one."""
    runtime = installed()
    if runtime is None:
        raise TrtragError(f"no TensorRT is installed for {purpose}",
                          "run: pip install 'trtrag[tensorrt]' (a GPU machine) or 'trtrag[rtx]' (TensorRT-RTX, "
                          "builds plans ahead of time on a CPU)")
    return runtime


def describe() -> dict:
    """What doctor reports: the runtime in use, its version, and the targets it builds for."""
    runtime = installed()
    if runtime is None:
        return {"runtime": None, "ok": False,
                "why": "neither tensorrt nor tensorrt_rtx_bindings imports; pip install 'trtrag[rtx]' builds "
                       "plans ahead of time on a CPU"}
    targets = runtime.aot_targets()
    return {"runtime": runtime.name, "version": runtime.version, "ok": True,
            "ahead_of_time_targets": list(targets),
            "why": (f"builds plans ahead of time for compute capability {', '.join(targets)} (no GPU needed)"
                    if targets else "builds plans for the GPU it runs on")}


def resolve_targets(runtime: TrtRuntime, wanted: list[str] | None, local_gpu: str | None) -> list[str]:
    """The compute capabilities to build for: the recipe's list, else the local GPU, else the default.

    An ahead-of-time runtime takes any target it lists; TensorRT 10/11 only the GPU in this machine.
    """
    supported = runtime.aot_targets()
    if not supported:
        if local_gpu is None:
            raise TrtragError(f"{runtime.label} builds plans on the GPU they run on and none is visible",
                              "build on the GPU machine, or install TensorRT-RTX: pip install 'trtrag[rtx]'")
        if wanted and wanted != [local_gpu]:
            raise TrtragError(f"{runtime.label} builds only for this machine's GPU ({local_gpu}), not "
                              f"{', '.join(wanted)}", f"set engine.trt_targets: [{local_gpu}] or leave it null")
        return [local_gpu]
    if wanted is None and local_gpu is not None and local_gpu not in supported:
        raise TrtragError(f"{runtime.label} cannot build for this machine's GPU (compute capability {local_gpu})",
                          f"install full TensorRT (pip install 'trtrag[tensorrt]'), or set engine.trt_targets "
                          f"from {', '.join(supported)} to build for another GPU")
    if wanted is None:
        wanted = [local_gpu or DEFAULT_AOT_TARGET]
    bad = [cc for cc in wanted if cc not in supported]
    if bad:
        raise TrtragError(f"{runtime.label} cannot build for compute capability {', '.join(bad)}",
                          f"use engine.trt_targets from: {', '.join(supported)}")
    return list(dict.fromkeys(wanted))
