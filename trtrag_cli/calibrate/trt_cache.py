"""TensorRT's legacy implicit-INT8 calibration cache (TensorRT <= 10): its text format, and writing it.

The header, `TRT-<getInferLibVersion()>-EntropyCalibration2`, names the TensorRT release that reads the
cache, so the file is written only for a real one: the TensorRT installed here, or the version a user
names for the target machine. Without either, `calibrate` writes none and its report says why.
"""

from __future__ import annotations

import struct
from pathlib import Path

from trtrag_cli.encode.artifacts import TRT_CACHE
from trtrag_cli.util.errors import TrtragError

CACHE_ALGORITHM = "EntropyCalibration2"  # IInt8EntropyCalibrator2 is the calibrator that reads it back


def trt_version_number(version: tuple[int, int, int]) -> int:
    """TensorRT's getInferLibVersion() encoding: M*1000+m*100+p before 10, (M*100+m)*100+p from 10 on."""
    major, minor, patch = version
    return major * 1000 + minor * 100 + patch if major < 10 else (major * 100 + minor) * 100 + patch


def trt_cache_text(ranges: dict[str, float], version: tuple[int, int, int]) -> str:
    """Legacy implicit-INT8 calibration cache: a header, then `<tensor>: <big-endian float32 scale hex>`."""
    lines = [f"TRT-{trt_version_number(version)}-{CACHE_ALGORITHM}"]
    for name, amax in ranges.items():
        scale = max(float(amax), 1e-8) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def read_trt_cache(text: str) -> dict[str, float]:
    """Tensor -> amax from a legacy cache (names may contain ':', so split at the last ': ')."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise ValueError("not a TensorRT calibration cache (no TRT- header)")
    out = {}
    for line in lines[1:]:
        if line.strip():
            name, _, hexed = line.rpartition(": ")
            out[name] = struct.unpack(">f", bytes.fromhex(hexed.strip()))[0] * 127.0
    return out


def _parse_trt_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from '10.16.1' (a fourth build number is ignored), else None."""
    parts = str(text).strip().split(".")
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def _no_calibrator(version: tuple[int, int, int]) -> str:
    return (f"TensorRT {'.'.join(map(str, version))} has no implicit-INT8 calibrator to read a legacy cache "
            "(TensorRT 11 removed it); it builds model.qdq.onnx")


def target_trt_version(trt_version: str | None) -> tuple[int, int, int] | None:
    """The TensorRT version a user names for the cache, checked before calibrating; None if none named."""
    if not trt_version:
        return None
    version = _parse_trt_version(trt_version)
    if version is None:
        raise TrtragError(f"trt_version {trt_version!r} is not a TensorRT version",
                          "give major.minor.patch of the target's TensorRT, e.g. 10.16.1")
    if version[0] > 10:
        raise TrtragError(_no_calibrator(version), "give a TensorRT 10 (or older) version, or none")
    return version


def _installed_trt_version() -> str | None:
    """The TensorRT version importable here, or None."""
    from trtrag_cli.util import deps

    if not deps.available("tensorrt"):
        return None
    # The module's own version: the wheel may be installed as tensorrt-cu12 rather than tensorrt.
    return getattr(deps.require("tensorrt", "the legacy calibration cache"), "__version__", None)


def write_trt_cache(folder: Path, ranges: dict[str, float], trt_version: str | None = None) -> dict:
    """Write the legacy cache for trt_version (else the installed TensorRT), or say why not; its report entry.

    The header names the TensorRT version that reads the cache, so it is written only for a real one:
    never a guess, which would make a cache that looks valid for a release nobody chose.
    """
    entry: dict = {"file": None, "version": None, "source": None, "algorithm": CACHE_ALGORITHM}
    if trt_version:
        version = target_trt_version(trt_version)
        source = "requested"
    else:
        installed = _installed_trt_version()
        if installed is None:
            entry["skipped"] = ("TensorRT is not installed here, so there is no version to write in the legacy "
                                "cache header; pass trt_version (e.g. 10.16.1) for the target machine's TensorRT")
            return entry
        version = _parse_trt_version(installed)
        if version is None:
            entry["skipped"] = f"cannot read the installed TensorRT version {installed!r}"
            return entry
        source = "installed"
    if version[0] > 10:
        entry["skipped"] = _no_calibrator(version)
        return entry
    (folder / TRT_CACHE).write_text(trt_cache_text(ranges, version), encoding="utf-8")
    entry.update(file=TRT_CACHE, version=".".join(map(str, version)), source=source)
    return entry
