"""Vector index over faiss: inner product on L2-normalised vectors (cosine), with stable int64 ids.

Kinds: `flat` (exact), `ivf` (IVF-Flat), `ivfpq` (IVF with product quantization) and `hnsw`; their
parameters come from the recipe. The index is always saved in faiss's CPU form, so any machine can load
it; where a GPU is present (index.device auto or gpu) it is moved there on load:

  - ivf / ivfpq: faiss-gpu clones (ivfpq with fp16 lookup tables), trained and filled on the GPU too;
  - flat: faiss-gpu's GpuIndexFlatIP or PyTorch exact search (exact.py), whichever measured faster
    here at load time (index.exact: auto), or the one the recipe names;
  - hnsw: faiss has no GPU HNSW: it stays on the CPU, and `placement` says so.

Ids: flat and hnsw sit in an IndexIDMap2 (they cannot store ids); IVF kinds store ids natively. An
IDMap around an IVF returns wrong ids once anything is deleted (the IVF keeps its old positions while
the map is compacted), so indexes of that form written by older versions are never updated in place.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtrag_cli.recipe.schema import IndexConfig
from trtrag_cli.util.deps import require
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.workspace import REBUILD_HINT
from trtrag_cli.util.gpu import gpu_count, torch_gpu_count

IVF_KINDS = ("ivf", "ivfpq")
TRAIN_PER_LIST = 64  # k-means samples per ivf cluster (faiss: 256). 1M vectors, nlist 4000: 256k, not 1M, points
BUILD_FIELDS = ("kind", "nlist", "pq_m", "pq_bits", "hnsw_m", "ef_construction")  # the rest apply at search time


def _faiss():
    return require("faiss", "the vector index")


def default_nlist(n: int) -> int:
    """ivf/ivfpq clusters for n vectors when index.nlist is null: about 4 sqrt(n), faiss's rule of thumb."""
    return max(1, round(4 * math.sqrt(n)))


_omp = threading.local()


def _search_threads(n: int) -> None:
    """Give this thread's faiss searches n OpenMP threads, once: OpenMP keeps the count per calling thread
    (libgomp; checked), so it is set on the thread that searches, not where the index was opened, and
    never changed back and forth around each call."""
    if getattr(_omp, "n", None) != n:
        _faiss().omp_set_num_threads(n)
        _omp.n = n


@dataclass(frozen=True)
class Placement:
    """Where a recipe's index is searched on a machine: the GPU engines ("torch", "faiss"; none: faiss on
    the CPU), why, and (problem, hint) where the recipe asks for what the machine cannot do."""
    engines: tuple[str, ...]
    why: str
    problem: tuple[str, str] | None = None


def placement_for(kind: str, device: str, exact: str, faiss_gpus: int, torch_gpus: int,
                  gpu_present: bool | None = None) -> Placement:
    """The placement rules, with the machine given: VectorIndex follows them when it moves an index to the
    GPU, and `trtrag doctor` reports them. gpu_present: a GPU is there at all (default: either count)."""
    if device == "cpu":
        return Placement((), "index.device: cpu")
    if kind == "hnsw":
        return Placement((), "faiss has no GPU HNSW: use flat, ivf or ivfpq for the GPU")
    if kind == "flat" and (faiss_gpus or torch_gpus):
        engines = tuple(name for name, n in (("torch", torch_gpus), ("faiss", faiss_gpus))
                        if n and exact in ("auto", name))
        if not engines:
            return Placement((), "flat on a GPU", (f"index.exact is {exact} but that engine has no GPU here",
                                                   "set index.exact: auto, or install faiss-gpu / torch with CUDA"))
        how = "measured at load, the faster one serves" if len(engines) > 1 else "the one present"
        return Placement(engines, f"flat on a GPU: {how}")
    if faiss_gpus:
        return Placement(("faiss",), f"{faiss_gpus} GPU(s) with faiss-gpu")
    present = bool(faiss_gpus or torch_gpus) if gpu_present is None else gpu_present
    why = "a GPU but no faiss-gpu (pip install faiss-gpu for ivf/ivfpq there)" if present else "no GPU"
    if device != "gpu":
        return Placement((), why)
    return Placement((), why, ("index.device is gpu but no GPU is usable (faiss-gpu or, for flat, torch with CUDA)",
                               "install faiss-gpu on a CUDA machine, or set index.device: auto"))


def torch_devices(cfg: IndexConfig) -> list[str]:
    """CUDA devices PyTorch exact search spreads its rows over: index.gpus of them (null: all), or only the first
    with multi_gpu replicate (torch search shards; replicas would serve throughput, not one query)."""
    n = torch_gpu_count() if cfg.gpus is None else min(cfg.gpus, torch_gpu_count())
    return [f"cuda:{i}" for i in range(1 if cfg.multi_gpu == "replicate" else n)] if n else []


def pq_subquantizers(cfg: IndexConfig, dim: int) -> int:
    """index.pq_m, or dim / 8 by default (768 -> 96, 384 -> 48); must divide dim."""
    m = cfg.pq_m or max(1, dim // 8)
    if dim % m:
        raise TrtragError(f"index.pq_m={m} does not divide the vector dimension {dim}",
                          f"pick a divisor of {dim}, e.g. {max(1, dim // 8)}")
    return m


class VectorIndex:
    """A faiss index with ids; `search` returns (scores, ids) with -1 ids for empty slots.

    `placement` says where searches run and with what (e.g. "gpu: faiss-gpu IVF4096,PQ96 fp16 LUT").
    """

    def __init__(self, cfg: IndexConfig, dim: int, index=None):
        self.cfg = cfg
        self.dim = dim
        self._index = index
        self._gpu = None          # a faiss GPU index or a TorchExact, searched instead of _index
        self._gpu_ids = None      # flat on faiss-gpu: position -> id (GpuIndexFlat stores no ids)
        self._resources = None
        self.placement = "cpu: faiss"
        self.choice: dict = {}

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _factory(self) -> str:
        if self.cfg.kind == "ivf":
            return "IVF{nlist},Flat"
        return f"IVF{{nlist}},PQ{pq_subquantizers(self.cfg, self.dim)}x{self.cfg.pq_bits}"

    def _make(self, n_train: int):
        faiss = _faiss()
        metric = faiss.METRIC_INNER_PRODUCT
        if self.cfg.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.cfg.kind in IVF_KINDS:
            # faiss wants ~39 training points per list; shrink nlist on small corpora rather than fail.
            nlist = max(1, min(self.cfg.nlist or default_nlist(n_train), n_train // 39))
            index = faiss.index_factory(self.dim, self._factory().format(nlist=nlist), metric)
            # k-means cost grows with its sample; past ~64 points a cluster the centroids barely move.
            faiss.extract_index_ivf(index).cp.max_points_per_centroid = TRAIN_PER_LIST
            return index
        hnsw = faiss.IndexHNSWFlat(self.dim, self.cfg.hnsw_m, metric)
        hnsw.hnsw.efConstruction = self.cfg.ef_construction
        return faiss.IndexIDMap2(hnsw)

    def _inner(self):
        faiss = _faiss()
        index = faiss.downcast_index(self._index)
        return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index

    def _tune(self) -> None:
        faiss = _faiss()
        inner = self._inner()
        if isinstance(inner, faiss.IndexIVF):
            inner.nprobe = min(self.cfg.nprobe, inner.nlist)
        elif isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = max(self.cfg.ef_search, 1)

    def _placement(self) -> Placement:
        if self.cfg.device == "cpu":      # no GPU library is asked anything
            return placement_for(self.kind(), "cpu", self.cfg.exact, 0, 0)
        kind = self.kind()
        return placement_for(kind, self.cfg.device, self.cfg.exact, gpu_count(),
                             torch_gpu_count() if kind == "flat" else 0)

    def _wants_gpu(self) -> bool:
        plan = self._placement()
        if plan.problem:
            raise TrtragError(*plan.problem)
        return bool(plan.engines)

    # ------------------------------------------------------------------------------------ build

    def build(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Create the index from scratch (training it where the kind needs training), on a GPU if wanted."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index = self._make(len(vectors))
        if self.cfg.kind in IVF_KINDS and len(vectors) and self._wants_gpu() and gpu_count() > 0:
            self._build_ivf_on_gpu(vectors, ids)
        else:
            if len(vectors) and not self._index.is_trained:
                self._index.train(vectors)
            self._tune()
            self.add(vectors, ids)

    def _build_ivf_on_gpu(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Train and fill on GPU 0 (k-means and list assignment are the slow parts), keep the CPU form."""
        faiss = _faiss()
        res = self._gpu_resources()
        gpu = faiss.index_cpu_to_gpu(res[0], 0, self._index, self._cloner_options())
        gpu.train(vectors)
        gpu.add_with_ids(vectors, ids.astype(np.int64))
        self._index = faiss.index_gpu_to_cpu(gpu)
        self._tune()

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under the given int64 ids (to the CPU form; call to_device() to refresh the GPU copy)."""
        if len(vectors):
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
            self._drop_device()

    def kind(self) -> str:
        """The kind of the index actually held (a loaded file may predate the recipe)."""
        if self._index is None:
            return self.cfg.kind
        faiss = _faiss()
        inner = self._inner()
        if isinstance(inner, faiss.IndexIVFPQ):
            return "ivfpq"
        if isinstance(inner, faiss.IndexIVF):
            return "ivf"
        return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"

    def nlist(self) -> int | None:
        """Clusters of the ivf/ivfpq index held (None for other kinds)."""
        if self._index is None or self.kind() not in IVF_KINDS:
            return None
        return int(self._inner().nlist)

    def supports_remove(self) -> bool:
        """Flat and IVF can delete in place; HNSW cannot, nor can an IVF inside an IDMap (older versions)."""
        if self.kind() == "hnsw":
            return False
        if self._index is None:
            return True
        faiss = _faiss()
        return not (isinstance(faiss.downcast_index(self._index), faiss.IndexIDMap) and self.kind() in IVF_KINDS)

    def remove(self, ids: np.ndarray) -> int:
        """Delete ids in place; returns how many were removed."""
        if not self.supports_remove():
            raise TrtragError(f"this {self.kind()} index cannot delete vectors in place",
                              "rebuild it (trtrag index does so)")
        faiss = _faiss()
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids.astype(np.int64))))
        self._drop_device()
        return removed

    # ------------------------------------------------------------------------------------ devices

    def _gpu_resources(self) -> list:
        faiss = _faiss()
        if self._resources is None:
            n = gpu_count() if self.cfg.gpus is None else min(self.cfg.gpus, gpu_count())
            self._resources = [faiss.StandardGpuResources() for _ in range(n)]
        return self._resources

    def _cloner_options(self, multiple: bool = False):
        faiss = _faiss()
        co = faiss.GpuMultipleClonerOptions() if multiple else faiss.GpuClonerOptions()
        co.useFloat16 = bool(self.cfg.fp16)  # flat: fp16 storage; ivfpq: fp16 lookup tables (needed past 48 x 8 bits)
        co.indicesOptions = faiss.INDICES_64_BIT
        if multiple:
            co.shard = self.cfg.multi_gpu == "shard"
        return co

    def _drop_device(self) -> None:
        self._gpu = self._gpu_ids = None
        self.placement = "cpu: faiss"

    def to_device(self) -> str:
        """Move the search copy to the GPU(s) where the recipe allows it; returns the placement."""
        self._drop_device()
        if self._index is None or not self.ntotal or not self._wants_gpu():
            if self.kind() == "hnsw" and self.cfg.device != "cpu":
                self.placement = "cpu: faiss HNSW (faiss has no GPU HNSW)"
            return self.placement
        kind = self.kind()
        if kind == "flat":
            self._flat_to_device()
        else:
            faiss = _faiss()
            self._gpu = self._to_gpus(self._index)
            nprobe = min(self.cfg.nprobe, self._inner().nlist)
            faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", nprobe)
            lut = " fp16 LUT" if kind == "ivfpq" and self.cfg.fp16 else ""
            self.placement = f"gpu: faiss-gpu {kind}{lut} nprobe={self.cfg.nprobe}{self._spread()}"
        return self.placement

    def _to_gpus(self, cpu_index):
        """A faiss-gpu clone of cpu_index on the recipe's GPUs: one, or sharded/replicated over several."""
        faiss = _faiss()
        res = self._gpu_resources()
        if len(res) == 1:
            return faiss.index_cpu_to_gpu(res[0], 0, cpu_index, self._cloner_options())
        vres, vdev = faiss.GpuResourcesVector(), faiss.Int32Vector()
        for i, r in enumerate(res):
            vres.push_back(r)
            vdev.push_back(i)
        return faiss.index_cpu_to_gpu_multiple(vres, vdev, cpu_index, self._cloner_options(True))

    def _spread(self) -> str:
        n = len(self._resources or ())
        return f" ({self.cfg.multi_gpu}ed over {n} GPUs)" if n > 1 else ""

    def _flat_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        outer = faiss.downcast_index(self._index)
        flat = faiss.downcast_index(outer.index)
        return flat.reconstruct_n(0, flat.ntotal), faiss.vector_to_array(outer.id_map).astype(np.int64)

    def _flat_to_device(self) -> None:
        """GPU exact search: faiss-gpu or torch, by the recipe or by measuring both here."""
        vectors, ids = self._flat_vectors()
        build = {"torch": lambda: self._torch_exact(vectors, ids), "faiss": lambda: self._faiss_flat(vectors)}
        options = {name: build[name]() for name in self._placement().engines}
        if len(options) > 1:
            timings = {name: _time_search(engine, self.dim) for name, engine in options.items()}
            best = min(timings, key=lambda n: timings[n]["batch1_ms"] + timings[n]["batch64_ms"] / 8)
            self.choice = {"measured_ms": timings, "chosen": best}
        else:
            best = next(iter(options))
            self.choice = {"chosen": best, "why": f"index.exact: {self.cfg.exact}" if self.cfg.exact != "auto"
                           else "the only GPU exact engine present"}
        for name in options:
            if name != best:
                options[name] = None  # free the loser's GPU memory now
        if best == "torch":
            self._gpu = options["torch"]
            self.placement = f"gpu: {self._gpu.name}"
        else:
            self._gpu, self._gpu_ids = options["faiss"], ids
            self.placement = f"gpu: faiss-gpu flat {'fp16' if self.cfg.fp16 else 'fp32'}{self._spread()}"

    def _torch_exact(self, vectors: np.ndarray, ids: np.ndarray):
        from trtrag_cli.index.torch_exact import TorchExact

        return TorchExact(vectors, ids, torch_devices(self.cfg), fp16=self.cfg.fp16)

    def _faiss_flat(self, vectors: np.ndarray):
        faiss = _faiss()
        flat = faiss.IndexFlatIP(self.dim)
        flat.add(vectors)
        return self._to_gpus(flat)

    # ------------------------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products for each query row."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[1] != self.dim:
            raise TrtragError(f"query vectors have dimension {q.shape[1]}, the index has {self.dim}",
                              "re-index with the encoder that encodes the queries")
        k = max(1, min(k, self.ntotal))
        if self._gpu is not None:
            scores, found = self._gpu.search(q, k)
            if self._gpu_ids is not None:
                found = np.where(found >= 0, self._gpu_ids[np.clip(found, 0, None)], -1)
            return scores, found
        # index.threads null: one. A few queries cannot use all cores well; OpenMP spin-waits then cost far
        # more than the scan (measured on 21k x 384 flat, 2 cores: 1.2 ms on one thread, 7-23 ms on two
        # under load), and the encoder shares the cores.
        _search_threads(self.cfg.threads or 1)
        return self._index.search(q, k)

    # ------------------------------------------------------------------------------------ files

    def save(self, path: Path) -> None:
        """Serialise to a file (CPU form, so any machine can load it)."""
        _faiss().write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, cfg: IndexConfig, dim: int, device: bool = True) -> "VectorIndex":
        """Load a saved index, apply the recipe's search parameters and (device=True) move it to the GPU."""
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise TrtragError(f"cannot read vector index '{path}': {str(exc).splitlines()[0]}",
                              REBUILD_HINT) from None
        if index.d != dim:
            raise TrtragError(f"vector index '{path}' has dimension {index.d}, expected {dim}",
                              REBUILD_HINT)
        out = cls(cfg, dim, index)
        out._tune()
        if device:
            out.to_device()
        return out


def _time_search(engine, dim: int, reps: int = 20) -> dict:
    """Median ms of an engine's search at batch 1 and 64 (k 100) on random unit queries."""
    rng = np.random.default_rng(0)
    out = {}
    for batch in (1, 64):
        q = rng.standard_normal((batch, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        engine.search(q, 100)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            engine.search(q, 100)
            times.append(time.perf_counter() - t)
        out[f"batch{batch}_ms"] = round(float(np.median(times)) * 1e3, 4)
    return out
