"""Exact inner-product top-k with PyTorch: the database on one or more devices, fp16 on a GPU.

At batch 1 an exact search over N x D vectors is bound by reading them once (1M x 768 fp16 is 1.5 GB:
0.32 ms at an H200's bandwidth), so what matters is launching few kernels and moving nothing else:
one matmul and one top-k per slab, the database resident on the device, only ids and scores copied
back. At large batches the score matrix (batch x N) would not fit, so the database is cut into slabs
sized to `budget_mb` of scores; each slab's top-k is kept and the slabs' candidates merged with one
more top-k. On the CPU the same code runs in fp32 (tests, and machines without faiss).

Selecting the top k of a long row is the other cost at large batches: a radix top-k passes over every
score several times. With select "grouped" the scores are cut into groups of GROUP, each group's max
is taken (one pass), the k best groups are kept, and the top k is chosen among their k x GROUP scores.
This is exact: a score in the top k lies in a group whose max is at least that score, and at most k
groups can have such a max. "auto" groups rows long enough for it to pay (at least 4 x k groups); on
an H200 at 1M x 768 it took batch 1000 from 11.0 to 6.9 ms. `trtrag bench` measures both.

Scores come out of the matmul in fp32 (fp16 inputs, fp32 accumulation and output, as faiss's fp16
flat does): written in fp16 they kept 3 significant digits, and on 1M clustered vectors recall@10
against fp32 exact search fell to 0.976. Where neighbours tie after the vectors' own fp16 rounding
they may still come back in another order than faiss's fp32 search.

On CUDA, searches of up to MAX_GRAPH_BATCH queries on one device replay a CUDA graph captured per
(batch bucket, k): the copy in, matmul, selection and id lookup launch as one graph.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import numpy as np

from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.gpu import graph_capture

DEFAULT_BUDGET_MB = 512
GROUP = 256
SELECTS = ("auto", "topk", "grouped")
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32)
MAX_GRAPH_BATCH = GRAPH_BATCHES[-1]


class TorchExact:
    """Top-k by inner product over `vectors` (rows) with int64 `ids`, sharded over `devices`."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, devices: list[Any] | None = None,
                 fp16: bool = True, budget_mb: float = DEFAULT_BUDGET_MB, select: str = "auto",
                 graphs: bool = True, fp32_scores: bool = True):
        torch = deps.require("torch", "exact search with PyTorch")
        if len(vectors) != len(ids):
            raise TrtragError(f"{len(vectors)} vectors but {len(ids)} ids", "pass one id per vector")
        if select not in SELECTS:
            raise TrtragError(f"unknown top-k selection {select!r}", "use one of: " + ", ".join(SELECTS))
        self.select = select
        self._torch = torch
        self._graphs: dict = {}
        self.devices = [torch.device(d) for d in (devices or ["cpu"])]
        on_gpu = self.devices[0].type == "cuda"
        self.dtype = torch.float16 if (fp16 and on_gpu) else torch.float32
        self.dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
        self.budget = int(budget_mb * 2**20)
        self.shards = []
        bounds = np.linspace(0, len(vectors), len(self.devices) + 1).astype(np.int64)
        for dev, lo, hi in zip(self.devices, bounds[:-1], bounds[1:]):
            rows = torch.from_numpy(ids[lo:hi].astype(np.int64)).to(dev)
            self.shards.append((self._upload(vectors[lo:hi], dev), rows))
        self.graphs = graphs and on_gpu and len(self.shards) == 1
        self._lock = threading.Lock()  # graph replays share static buffers
        self.fp32_scores = fp32_scores
        self._mixed_mm = on_gpu and self.dtype == torch.float16 and fp32_scores and self._has_out_dtype()

    def _has_out_dtype(self) -> bool:
        """Whether torch.mm takes out_dtype here (decided once: a failure inside a graph capture would break it)."""
        torch = self._torch
        a = torch.ones((1, 8), dtype=torch.float16, device=self.devices[0])
        try:
            return torch.mm(a, a.T, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError):
            return False

    def sharing(self, select: str | None = None, fp32_scores: bool | None = None) -> TorchExact:
        """The same resident vectors searched with another selection or score precision (no second copy)."""
        select = select or self.select
        if select not in SELECTS:
            raise TrtragError(f"unknown top-k selection {select!r}", "use one of: " + ", ".join(SELECTS))
        twin = copy.copy(self)
        twin.select = select
        if fp32_scores is not None:
            twin.fp32_scores = fp32_scores
            on_gpu = self.devices[0].type == "cuda" and self.dtype == self._torch.float16
            twin._mixed_mm = fp32_scores and on_gpu and self._has_out_dtype()
        twin._graphs = {}
        twin._lock = threading.Lock()
        return twin

    @property
    def ntotal(self) -> int:
        return sum(len(ids) for _, ids in self.shards)

    @property
    def name(self) -> str:
        kind = "fp16" if self.dtype == self._torch.float16 else "fp32"
        return f"torch-{kind} exact on {', '.join(str(d) for d in self.devices)}"

    def _upload(self, rows: np.ndarray, device):
        """Copy rows to device in the storage dtype, in pieces so host memory stays flat."""
        torch = self._torch
        out = torch.empty((len(rows), self.dim), dtype=self.dtype, device=device)
        step = max(1, (64 * 2**20) // max(1, self.dim * 4))
        for lo in range(0, len(rows), step):
            piece = torch.from_numpy(np.ascontiguousarray(rows[lo:lo + step], dtype=np.float32))
            out[lo:lo + step] = piece.to(device, non_blocking=False).to(self.dtype)
        return out

    def search_tensor(self, queries, k: int):
        """(scores float32 [B, k], ids int64 [B, k]) as tensors on the first device; -1 ids past ntotal.

        From a graph replay they are views of its static output: read them before the next search.
        """
        torch = self._torch
        first = self.devices[0]
        if self.graphs and len(queries) <= MAX_GRAPH_BATCH and self.ntotal >= k:
            return self._replay(queries, k)
        results = [self._search_shard(db, ids, queries.to(db.device, self.dtype), k) for db, ids in self.shards]
        if len(results) == 1:
            scores, found = results[0]
        else:
            scores = torch.cat([s.to(first) for s, _ in results], dim=1)
            found = torch.cat([i.to(first) for _, i in results], dim=1)
            scores, pick = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            found = torch.gather(found, 1, pick)
        if scores.shape[1] < k:  # fewer vectors than k: pad like faiss
            pad = k - scores.shape[1]
            scores = torch.cat([scores, scores.new_full((len(scores), pad), -float("inf"))], dim=1)
            found = torch.cat([found, found.new_full((len(found), pad), -1)], dim=1)
        return scores.float(), found

    def _replay(self, queries, k: int):
        """Small batches on one GPU: pad to a bucket and replay that bucket's captured search."""
        rows = len(queries)
        batch = next(b for b in GRAPH_BATCHES if b >= rows)
        graph, q, scores, found = self._graphs.get((batch, k)) or self._capture(batch, k)
        q[:rows].copy_(queries)
        if rows < batch:
            q[rows:].zero_()
        graph.replay()
        return scores[:rows], found[:rows]

    def _capture(self, batch: int, k: int):
        torch = self._torch
        db, ids = self.shards[0]
        q = torch.zeros((batch, self.dim), dtype=self.dtype, device=db.device)
        side = torch.cuda.Stream(db.device)
        side.wait_stream(torch.cuda.current_stream(db.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up: cuBLAS handles and workspaces exist before capture
                self._search_shard(db, ids, q, k)
        torch.cuda.current_stream(db.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), graph_capture(torch, graph, stream=side):
            scores, found = self._search_shard(db, ids, q, k)
            scores = scores.float()
        self._graphs[(batch, k)] = entry = (graph, q, scores, found)
        return entry

    def _search_shard(self, db, ids, q, k: int):
        torch = self._torch
        n = len(db)
        if n == 0:
            return q.new_zeros((len(q), 0)), ids.new_zeros((len(q), 0))
        slab = max(k, self.budget // max(1, len(q) * 4))  # fp32 scores
        slab = max(GROUP, slab // GROUP * GROUP)
        if slab >= n:
            scores, pos = self._top(self._scores(q, db), k)
            return scores, ids[pos]
        kept_s, kept_i = [], []
        for lo in range(0, n, slab):
            part = db[lo:lo + slab]
            s, pos = self._top(self._scores(q, part), k)
            kept_s.append(s)
            kept_i.append(ids[lo:lo + slab][pos])
        scores = torch.cat(kept_s, dim=1)
        scores, pick = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return scores, torch.gather(torch.cat(kept_i, dim=1), 1, pick)

    def _scores(self, q, db):
        """q @ db.T with fp32 output (fp16 inputs on CUDA: out_dtype, where this torch has it)."""
        torch = self._torch
        if db.dtype == torch.float32:
            return q @ db.T
        if self._mixed_mm:
            return torch.mm(q, db.T, out_dtype=torch.float32)
        return q @ db.T  # fp16 scores (fp32_scores off, or torch < 2.8 without out_dtype): fewer digits

    def _top(self, scores, k: int):
        """(values, positions) of the k largest scores per row, best first (see module docstring)."""
        torch = self._torch
        rows, n = scores.shape
        k = min(k, n)
        whole = n // GROUP * GROUP
        plain = self.select == "topk" or whole < 4 * k * GROUP
        if plain:
            return torch.topk(scores, k, dim=1)
        groups = scores[:, :whole].view(rows, whole // GROUP, GROUP)
        _, best = torch.topk(groups.amax(dim=2), k, dim=1)
        picked = torch.gather(groups, 1, best[:, :, None].expand(-1, -1, GROUP)).reshape(rows, k * GROUP)
        values, where = torch.topk(picked, k, dim=1)
        pos = torch.gather(best, 1, where // GROUP) * GROUP + where % GROUP
        if whole < n:  # the ragged tail: its own top-k, then one merge
            tail_v, tail_p = torch.topk(scores[:, whole:], min(k, n - whole), dim=1)
            values, where = torch.topk(torch.cat([values, tail_v], dim=1), k, dim=1)
            pos = torch.gather(torch.cat([pos, tail_p + whole], dim=1), 1, where)
        return values, pos

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """numpy in and out, like faiss: (scores float32 [B, k], ids int64 [B, k])."""
        torch = self._torch
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        with self._lock, torch.inference_mode():
            scores, ids = self.search_tensor(q.to(self.devices[0]), k)
            return scores.cpu().numpy(), ids.cpu().numpy()
