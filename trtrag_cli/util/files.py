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
import uuid
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside target for a writer to create; move it into place only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, not mkstemp: the writer creates the file, so it gets the usual umask permissions.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file under a temporary name in the same folder, flush it to disk, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


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


