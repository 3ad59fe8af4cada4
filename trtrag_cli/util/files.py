"""Workspace layout, manifests and atomic writes.

Every artifact is written under a temporary name and renamed into place. The index is kept in
generations: a new one is written whole, then the `CURRENT` pointer is replaced atomically, so a run
that fails or is killed half-way leaves the previous index untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from trtrag_cli.util.errors import TrtragError

LAYOUT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text variant of atomic_write_bytes."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """Read JSON, turning corruption into a user error that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrtragError(f"cannot read '{path}': {exc}",
                          "delete the workspace folder and re-run the command") from None


def library_versions(names: tuple[str, ...] = ("numpy", "onnxruntime", "faiss-cpu", "bm25s", "tokenizers")) -> dict:
    """Versions of the libraries that shape an artifact, recorded in every manifest."""
    from trtrag_cli.util.deps import version

    out = {"python": platform.python_version(), "trtrag": version("trtrag") or "dev"}
    out.update({n: version(n) for n in names})
    return out


