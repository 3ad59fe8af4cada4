"""The chunk store of one index generation: chunk records, their vectors and int64 ids, row-aligned."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trtrag_cli.util.errors import TrtragError

CHUNKS = "chunks.jsonl"
VECTORS = "vectors.npy"
IDS = "ids.npy"
# `trtrag index` notices an unreadable previous generation and rebuilds; --rebuild forces it.
REBUILD_HINT = "rebuild it: trtrag index <corpus> --rebuild (calibration and engines are kept)"


@dataclass
class ChunkRecord:
    """One retrievable passage and where it came from."""

    id: str
    source: str
    file: str
    ordinal: int
    title: str
    text: str
    hash: str


def int_id(chunk_id: str) -> int:
    """Stable non-negative int64 id of a chunk id string (faiss ids must be int64)."""
    return int.from_bytes(hashlib.blake2b(chunk_id.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


class ChunkStore:
    """Row i holds records[i], vectors[i] and ids[i]."""

    def __init__(self, records: list[ChunkRecord], vectors: np.ndarray, ids: np.ndarray | None = None):
        if len(records) != len(vectors):
            raise ValueError(f"{len(records)} records but {len(vectors)} vectors")
        self.records = records
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ids = ids if ids is not None else np.array([int_id(r.id) for r in records], dtype=np.int64)
        self._order = np.argsort(self.ids, kind="stable")
        if len(self.ids) and np.any(np.diff(self.ids[self._order]) == 0):
            raise TrtragError("two chunks share an id", "make document ids unique and re-run trtrag index")

    def __len__(self) -> int:
        return len(self.records)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of int64 ids (-1 where unknown, e.g. faiss's empty slots)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.ids):
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids, sorter=self._order)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        rows = self._order[pos]
        return np.where(self.ids[rows] == ids, rows, -1)

    def save(self, folder: Path) -> None:
        """Write the three row-aligned files into an (unpublished) generation folder."""
        with open(folder / CHUNKS, "w", encoding="utf-8") as fh:
            for r in self.records:
                fh.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
        np.save(folder / VECTORS, self.vectors)
        np.save(folder / IDS, self.ids)

    @classmethod
    def load(cls, folder: Path) -> "ChunkStore":
        """Read a generation's chunk store, refusing inconsistent files."""
        try:
            with open(folder / CHUNKS, encoding="utf-8") as fh:
                records = [ChunkRecord(**json.loads(line)) for line in fh if line.strip()]
            vectors = np.load(folder / VECTORS, mmap_mode=None)
            ids = np.load(folder / IDS)
        except (OSError, ValueError, TypeError, EOFError) as exc:  # EOFError: an empty .npy
            raise TrtragError(f"the index in '{folder}' is damaged: {exc}", REBUILD_HINT) from None
        if vectors.ndim != 2 or vectors.dtype != np.float32 or ids.ndim != 1 or ids.dtype != np.int64:
            raise TrtragError(f"the index in '{folder}' is damaged: {VECTORS} or {IDS} has the wrong shape",
                              REBUILD_HINT)
        if not (len(records) == len(vectors) == len(ids)):
            raise TrtragError(f"the index in '{folder}' is damaged: row counts differ", REBUILD_HINT)
        return cls(records, vectors, ids)
