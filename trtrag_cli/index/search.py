"""Dense search over the segments of a chunk store: one searcher per segment, results merged by score.

Per segment, by where it runs and what the recipe asks:
  - the base segment of an ivf, ivfpq or hnsw index: its faiss file (vectors.faiss), dead ids removed in
    memory after loading (hnsw cannot remove: it is searched deeper and dead rows are dropped);
  - flat, and every delta segment (the small ones re-indexing adds): exact search straight over the
    memory-mapped vectors, so the vectors are held once, by the page cache, not copied into faiss;
  - on a GPU (index.device auto/gpu with faiss-gpu or torch): VectorIndex's GPU placement, fed the live
    vectors of the segment.
"""

from __future__ import annotations

import numpy as np

from trtrag_cli.index.chunks import FAISS_FILE, ChunkStore, Segment
from trtrag_cli.index.vectors import VectorIndex, placement_for
from trtrag_cli.recipe.schema import IndexConfig
from trtrag_cli.util.errors import TrtragError

_BLOCK = 1 << 16  # rows scored per matrix product in exact search: bounded memory at any size


class MappedExact:
    """Exact inner-product top-k over a memory-mapped [n, dim] array, dead rows excluded."""

    def __init__(self, vectors: np.ndarray, dead: np.ndarray):
        self.vectors, self.dead = vectors, dead
        self.placement = "cpu: exact over memory-mapped vectors"

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, local rows) [len(q), k], best first; -1 rows pad when fewer live rows exist."""
        n = len(self.vectors)
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_r = np.zeros((len(q), 0), dtype=np.int64)
        for lo in range(0, n, _BLOCK):
            scores = np.asarray(self.vectors[lo:lo + _BLOCK]) @ q.T  # [block, nq]
            scores[self.dead[lo:lo + _BLOCK]] = -np.inf
            take = min(k, len(scores))
            part = np.argpartition(-scores, take - 1, axis=0)[:take].T  # [nq, take]
            best_s = np.concatenate([best_s, np.take_along_axis(scores.T, part, axis=1)], axis=1)
            best_r = np.concatenate([best_r, part + lo], axis=1)
            if best_s.shape[1] > k:
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        best_s, best_r = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)
        best_r[~np.isfinite(best_s)] = -1
        return best_s, best_r


class SegmentSearch:
    """Dense top-k over a ChunkStore's live rows; `search` returns (scores, global rows)."""

    def __init__(self, store: ChunkStore, cfg: IndexConfig, device: bool = True):
        self.store, self.cfg = store, cfg
        self._parts: list[tuple[object, bool, int]] = []  # (searcher, returns ids, extra depth for dead rows)
        wants_gpu = bool(store.segments) and device and self._gpu_placement()  # one answer for every segment
        for s, seg in enumerate(store.segments):
            self._parts.append(self._open(seg, store.dead[s], wants_gpu))
        self.placement = getattr(self._parts[0][0], "placement", "cpu") if self._parts else "cpu: empty"
        base = self._parts[0][0] if self._parts else None
        self.choice = getattr(base, "choice", {})

    def _open(self, seg: Segment, dead: np.ndarray, wants_gpu: bool):
        faiss_file = seg.folder / FAISS_FILE
        if faiss_file.is_file():
            vindex = VectorIndex.load(faiss_file, self.cfg, seg.dim, device=False)
            extra = 0
            if dead.any():
                if vindex.supports_remove():
                    vindex.remove(np.asarray(seg.ids)[dead])
                else:
                    extra = int(dead.sum())
            if wants_gpu:
                vindex.to_device()
            elif vindex.kind() == "hnsw" and self.cfg.device != "cpu":
                vindex.to_device()  # sets the placement that says faiss has no GPU HNSW
            return vindex, True, extra
        if wants_gpu:
            live = np.flatnonzero(~dead)
            vindex = VectorIndex(self.cfg.model_copy(update={"kind": "flat"}), seg.dim)
            vindex.build(np.asarray(seg.vectors[live]), np.asarray(seg.ids)[live])
            vindex.to_device()
            return vindex, True, 0
        return MappedExact(seg.vectors, dead), False, 0

    def _gpu_placement(self) -> bool:
        if self.cfg.device == "cpu":
            return False
        from trtrag_cli.util.gpu import gpu_count, torch_gpu_count

        kind = "flat" if self.cfg.kind == "hnsw" else self.cfg.kind  # deltas are flat; hnsw bases stay on CPU
        plan = placement_for(kind, self.cfg.device, self.cfg.exact, gpu_count(), torch_gpu_count())
        if plan.problem:
            raise TrtragError(*plan.problem)
        return bool(plan.engines)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products of each query row over every live chunk: (scores, global rows), -1 padded."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[1] != self.store.dim:
            raise TrtragError(f"query vectors have dimension {q.shape[1]}, the index has {self.store.dim}",
                              "re-index with the encoder that encodes the queries")
        k = max(1, min(k, max(len(self.store), 1)))
        all_s, all_r = [], []
        for s, (searcher, by_id, extra) in enumerate(self._parts):
            seg = self.store.segments[s]
            if not seg.rows:
                continue
            scores, found = searcher.search(q, min(k + extra, seg.rows))
            local = seg.rows_of(found.ravel()).reshape(found.shape) if by_id else found
            ok = local >= 0
            if extra:
                ok[ok] = ~self.store.dead[s][local[ok]]
            all_s.append(np.where(ok, scores, -np.inf))
            all_r.append(np.where(ok, local + self.store.offsets[s], -1))
        if not all_s:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        scores, rows = np.concatenate(all_s, axis=1), np.concatenate(all_r, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        rows[~np.isfinite(scores)] = -1
        return scores.astype(np.float32), rows

    def close(self) -> None:
        """Nothing to release beyond what garbage collection frees (kept for the Retriever's protocol)."""
