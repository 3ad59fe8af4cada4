"""Vectors an `index` run has embedded, saved as it goes, so a killed run resumes instead of starting over.

Parts are keyed by chunk-text hash under `<workspace>/_cache/embed-checkpoint/<encoder key>/`, one .npz per
CHECKPOINT_BATCHES encoder batches, each written under a temporary name and renamed into place. A run
that publishes its generation clears them; `index --rebuild` ignores and clears them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

CHECKPOINT_BATCHES = 16  # encoder batches between saves: at batch 64, one part per 1024 chunks


class EmbedCheckpoint:
    """Saved vectors of one encoder (name, dimension and token limit: what makes a vector)."""

    def __init__(self, workspace_root: Path, encoder_name: str, dim: int, max_tokens: int):
        key = hashlib.sha256(f"{encoder_name}|{dim}|{max_tokens}".encode()).hexdigest()[:16]
        self.folder = Path(workspace_root) / "_cache" / "embed-checkpoint" / key
        self.dim = dim

    def load(self) -> dict[str, np.ndarray]:
        """hash -> vector of every saved part; a part that cannot be read is ignored (re-embedded)."""
        out: dict[str, np.ndarray] = {}
        if not self.folder.is_dir():
            return out
        for part in sorted(self.folder.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as data:
                    hashes, vectors = data["hashes"], data["vectors"]
            except (OSError, ValueError, KeyError, EOFError):
                continue
            if vectors.ndim == 2 and vectors.shape == (len(hashes), self.dim):
                out.update(zip(hashes.tolist(), vectors.astype(np.float32, copy=False)))
        return out

    def save(self, hashes: list[str], vectors: np.ndarray) -> None:
        """Add one part."""
        self.folder.mkdir(parents=True, exist_ok=True)
        n = len(list(self.folder.glob("part-*.npz")))
        final = self.folder / f"part-{n:06d}-{os.getpid()}.npz"
        tmp = self.folder / f".tmp-{final.name}"
        with open(tmp, "wb") as fh:
            np.savez(fh, hashes=np.array(hashes, dtype="U64"), vectors=np.asarray(vectors, dtype=np.float32))
        os.replace(tmp, final)

    def clear(self) -> None:
        """Forget every saved part (after a publish, or for --rebuild)."""
        shutil.rmtree(self.folder, ignore_errors=True)
