"""Vector index over faiss: inner product on L2-normalised vectors (cosine), with stable int64 ids.

`flat` is exact; `ivf` and `hnsw` take their parameters from the recipe. Ids are kept through an
IndexIDMap2 so chunks can be deleted in place (flat, ivf); HNSW cannot delete, so it is rebuilt from
the kept vectors instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .deps import require
from .errors import TrtragError
from .recipe import IndexConfig


SMALL_BATCH = 16  # below this many queries a search runs on one thread


def _faiss():
    return require("faiss", "the vector index")


class VectorIndex:
    """A faiss index with ids; `search` returns (scores, ids) with -1 ids for empty slots."""

    def __init__(self, cfg: IndexConfig, dim: int, index=None):
        self.cfg = cfg
        self.dim = dim
        self._index = index

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _make(self, n_train: int):
        faiss = _faiss()
        metric = faiss.METRIC_INNER_PRODUCT
        if self.cfg.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.cfg.kind == "ivf":
            # faiss wants ~39 training points per list; shrink nlist on small corpora rather than fail.
            nlist = max(1, min(self.cfg.nlist, n_train // 39))
            quantizer = faiss.IndexFlatIP(self.dim)
            return faiss.IndexIDMap2(faiss.IndexIVFFlat(quantizer, self.dim, nlist, metric))
        hnsw = faiss.IndexHNSWFlat(self.dim, self.cfg.hnsw_m, metric)
        hnsw.hnsw.efConstruction = self.cfg.ef_construction
        return faiss.IndexIDMap2(hnsw)

    def _tune(self) -> None:
        faiss = _faiss()
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexIVF):
            inner.nprobe = min(self.cfg.nprobe, inner.nlist)
        elif isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = max(self.cfg.ef_search, 1)

    def build(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Create the index from scratch (training it where the kind needs training)."""
        self._index = self._make(len(vectors))
        if len(vectors) and not self._index.is_trained:
            self._index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        self._tune()
        self.add(vectors, ids)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under the given int64 ids."""
        if len(vectors):
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def supports_remove(self) -> bool:
        """HNSW graphs cannot drop nodes; flat and IVF can."""
        return self.cfg.kind != "hnsw"

    def remove(self, ids: np.ndarray) -> int:
        """Delete ids in place; returns how many were removed."""
        if not self.supports_remove():
            raise TrtragError("an hnsw index cannot delete vectors in place", "rebuild it (trtrag index does so)")
        faiss = _faiss()
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids.astype(np.int64))))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products for each query row."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[1] != self.dim:
            raise TrtragError(f"query vectors have dimension {q.shape[1]}, the index has {self.dim}",
                              "re-index with the encoder that encodes the queries")
        k = max(1, min(k, self.ntotal))
        if len(q) >= SMALL_BATCH:
            return self._index.search(q, k)
        # A few queries cannot use all cores well; OpenMP spin-waits then cost far more than the scan
        # (measured on 21k x 384 flat, 2 cores: 1.2 ms on one thread, 7-23 ms on two under load).
        faiss = _faiss()
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._index.search(q, k)
        finally:
            faiss.omp_set_num_threads(before)

    def save(self, path: Path) -> None:
        """Serialise to a file (CPU form, so any machine can load it)."""
        _faiss().write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, cfg: IndexConfig, dim: int) -> "VectorIndex":
        """Load a saved index and apply the recipe's search parameters."""
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise TrtragError(f"cannot read vector index '{path}': {str(exc).splitlines()[0]}",
                              "re-run trtrag index to rebuild it") from None
        if index.d != dim:
            raise TrtragError(f"vector index '{path}' has dimension {index.d}, expected {dim}",
                              "re-run trtrag index to rebuild it")
        out = cls(cfg, dim, index)
        out._tune()
        return out
