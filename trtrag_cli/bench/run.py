"""`trtrag bench`: the design's results table, measured here: search per engine and batch size, the
batch-1 retrieval stage (encode, search, rerank apart and together), concurrent queries through the
batcher, recall@10 of each approximate index against exact search, and GPU memory.

On the workspace's index the retrieval stage is the path `ask` and `serve` run (retrieve.shared): the
recipe's mode (hybrid by default: encoder, faiss, BM25, fusion) through the batch worker, one caller at
a time and then many at once. Synthetic vectors have no texts for BM25: there it is dense search and an
exact re-score, and the report says so.

Vectors are synthetic and clustered (like real embeddings: centres plus noise, unit length) when
--vectors is given, so any scale can be measured without a corpus; otherwise the workspace's own index
and chunks are used. Every latency is a distribution over repeated calls after warm-up (P50/P90/P99),
taken with the results back on the host, as a caller sees them.

The JSON is meant for CI scripts to compare runs: `schema` names its version; rows are keyed by engine
and batch; numbers are milliseconds, queries per second or fractions, never formatted text.
"""

from __future__ import annotations

import math
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.retrieve.retriever import top_indices
from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.gpu import GpuWatch
from trtrag_cli.util.timing import ms_percentiles

SCHEMA = "trtrag.bench/1"
STAGES = ("queue", "encode", "search", "rerank", "total")


def timed(fn: Callable[[], object], reps: int, warmup: int = 3, budget_s: float = 20.0) -> list[float]:
    """Seconds per call of fn after warm-up calls: `reps` calls, fewer (at least 5) past budget_s."""
    for _ in range(warmup):
        fn()
    out = []
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        if len(out) >= 5 and time.perf_counter() - start > budget_s:
            break
    return out


# --------------------------------------------------------------------------------------------- data

def clustered(n: int, dim: int, n_queries: int, seed: int = 0, centres: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `centres` random centres (noise 0.6 of a centre's norm per axis), and queries
    drawn the same way. Generated in pieces so memory stays near the output's size."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((min(centres, max(1, n // 50)), dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 65536
    for lo in range(0, n, step):
        m = min(step, n - lo)
        block = c[rng.integers(0, len(c), m)] + 0.6 * rng.standard_normal((m, dim), dtype=np.float32)
        out[lo:lo + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = c[rng.integers(0, len(c), n_queries)] + 0.6 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    return out, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_truth(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row ids of the exact fp32 top-k per query: the reference, not timed. faiss flat on the CPU, or
    PyTorch in fp32 (on a GPU when there is one) where faiss is not installed."""
    if deps.available("faiss"):
        import faiss

        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        return flat.search(queries, k)[1]
    from trtrag_cli.index.torch_exact import TorchExact
    from trtrag_cli.util.gpu import torch_gpu_count

    device = "cuda:0" if torch_gpu_count() else "cpu"
    ref = TorchExact(vectors, np.arange(len(vectors), dtype=np.int64), [device], fp16=False, graphs=False)
    return ref.search(queries, k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the true top-k found in the top-k."""
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


# ------------------------------------------------------------------------------------------ engines

def gpu_memory_used() -> int | None:
    """Bytes in use on GPU 0 (every allocator, faiss's included), or None without a CUDA GPU."""
    if not deps.available("torch"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info(0)
    return int(total - free)


def build_engines(recipe: Recipe, vectors: np.ndarray, ids: np.ndarray, kinds: list[str],
                  log: Callable[[str], None]) -> list[tuple[str, object, dict]]:
    """(label, searcher, facts) for exact search on each engine present, then each approximate kind.

    Searchers take numpy queries and return (scores, ids), as VectorIndex does.
    """
    from trtrag_cli.index.torch_exact import TorchExact
    from trtrag_cli.index.vectors import VectorIndex, torch_devices
    from trtrag_cli.util.gpu import gpu_count, torch_gpu_count

    out = []
    dim = vectors.shape[1]
    # On a GPU machine the CPU scan is the baseline script's business; here it would only cost minutes.
    placements = ["gpu"] if (gpu_count() or torch_gpu_count()) and recipe.index.device != "cpu" else ["cpu"]
    for where in placements:
        exact_engines = ["torch", "faiss"] if where == "gpu" else ["faiss"]
        for engine in exact_engines:
            if where == "gpu" and engine == "torch" and not torch_gpu_count():
                continue
            if where == "gpu" and engine == "faiss" and not gpu_count():
                continue
            fp16_options = [True, False] if (where == "gpu" and engine == "faiss") else [recipe.index.fp16]
            for fp16 in fp16_options:
                cfg = recipe.index.model_copy(update={"kind": "flat", "device": where, "exact": engine, "fp16": fp16})
                before = gpu_memory_used()
                t = time.perf_counter()
                if where == "cpu" or engine == "faiss":
                    index = VectorIndex(cfg, dim)
                    index.build(vectors, ids)
                    index.to_device()
                    label = f"{where} faiss flat" + (f" {'fp16' if fp16 else 'fp32'}" if where == "gpu" else "")
                    searcher = index
                else:
                    searcher = TorchExact(vectors, ids, torch_devices(cfg), fp16=fp16)
                    label = f"gpu torch exact {'fp16' if fp16 else 'fp32'}"
                    # The same vectors with a plain radix top-k, and with fp16 scores: what each choice costs.
                    out.append((label + " radix-topk", searcher.sharing(select="topk"),
                                _facts(cfg, "flat", None, 0.0) | {"select": "topk"}))
                    out.append((label + " fp16-scores", searcher.sharing(fp32_scores=False),
                                _facts(cfg, "flat", None, 0.0) | {"scores": "fp16"}))
                log(f"built {label}")
                out.append((label, searcher, _facts(cfg, "flat", before, time.perf_counter() - t)))
    for kind in kinds:
        where = "gpu" if gpu_count() and recipe.index.device != "cpu" and kind != "hnsw" else "cpu"
        cfg = recipe.index.model_copy(update={"kind": kind, "device": where})
        before = gpu_memory_used()
        t = time.perf_counter()
        index = VectorIndex(cfg, dim)
        index.build(vectors, ids)
        index.to_device()
        label = f"{where} faiss {kind}" + (f" nprobe={cfg.nprobe}" if kind != "hnsw" else f" ef={cfg.ef_search}")
        log(f"built {label} ({index.placement})")
        out.append((label, index, _facts(cfg, kind, before, time.perf_counter() - t) | {"placement": index.placement}))
    return out


def _facts(cfg, kind: str, mem_before: int | None, seconds: float) -> dict:
    after = gpu_memory_used()
    facts = {"kind": kind, "build_s": round(seconds, 2), "device": cfg.device, "fp16": cfg.fp16}
    if kind in ("ivf", "ivfpq"):
        facts.update(nlist=cfg.nlist, nprobe=cfg.nprobe)
    if kind == "ivfpq":
        facts.update(pq_m=cfg.pq_m, pq_bits=cfg.pq_bits)
    if mem_before is not None and after is not None:
        facts["gpu_memory_mib"] = round((after - mem_before) / 2**20, 1)
    return facts


def reranked(vectors: np.ndarray, queries: np.ndarray, found: np.ndarray, top: int = 10) -> np.ndarray:
    """The top rows after re-scoring each query's candidates exactly in fp32 (the second stage)."""
    out = np.empty((len(found), top), dtype=np.int64)
    for lo in range(0, len(found), 64):
        cand = found[lo:lo + 64]
        scores = np.einsum("qkd,qd->qk", vectors[np.clip(cand, 0, None)], queries[lo:lo + 64])
        scores[cand < 0] = -np.inf
        out[lo:lo + 64] = np.take_along_axis(cand, np.argsort(-scores, axis=1)[:, :top], axis=1)
    return out


def bench_search(engines, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, batches: list[int], k: int,
                 reps: dict[int, int], log) -> list[dict]:
    """Latency and throughput per engine and batch; recall@10 of each against the exact truth, as searched
    and after the exact rerank of its k candidates."""
    rows = []
    for label, searcher, facts in engines:
        _, found = searcher.search(queries, k)
        recall = round(recall_at(found, truth), 4)
        facts = facts | {"recall@10_reranked": round(recall_at(reranked(vectors, queries, found), truth), 4)}
        for batch in batches:
            q = queries[:batch]
            samples = timed(lambda: searcher.search(q, k), reps.get(batch, 10))
            stats = ms_percentiles(samples)
            row = {"engine": label, "batch": batch, "k": k, **stats,
                   "qps": round(batch / (stats["p50_ms"] / 1e3), 1), "recall@10": recall, **facts}
            rows.append(row)
            log(f"{label:32s} batch {batch:5d}: P50 {stats['p50_ms']:.3f} ms  P99 {stats['p99_ms']:.3f} ms  "
                f"{row['qps']:.0f} q/s  recall@10 {recall:.3f} (reranked {facts['recall@10_reranked']:.3f})")
    return rows


# ---------------------------------------------------------------------------------------- retrieval

class Stage:
    """The retrieval stage for one question: encode, search top_n, rerank to top_k (exact re-score)."""

    def __init__(self, encoder, searcher, vectors: np.ndarray, top_n: int, top_k: int):
        self.encoder, self.searcher, self.vectors = encoder, searcher, vectors
        self.top_n, self.top_k = top_n, top_k

    def rerank(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact fp32 scores of the candidates (rows of `vectors`), best top_k first."""
        ids = ids[ids >= 0]
        return ids[top_indices(self.vectors[ids] @ query, self.top_k)]

    def one(self, text: str) -> dict[str, float]:
        t0 = time.perf_counter()
        q = self.encoder.encode([text], batch_size=1)
        t1 = time.perf_counter()
        _, ids = self.searcher.search(q, self.top_n)
        t2 = time.perf_counter()
        self.rerank(q[0], ids[0])
        t3 = time.perf_counter()
        return {"encode": t1 - t0, "search": t2 - t1, "rerank": t3 - t2, "total": t3 - t0}

    def many(self, texts: list[str]) -> list[np.ndarray]:
        q = self.encoder.encode(texts, batch_size=len(texts))
        _, ids = self.searcher.search(q, self.top_n)
        return [self.rerank(v, row) for v, row in zip(q, ids)]


def bench_stage(one: Callable[[str], dict[str, float]], texts: list[str], reps: int) -> dict:
    """Per-stage P50/P90/P99 of one question at a time; one(text) returns seconds per stage."""
    for text in texts[:10]:
        one(text)
    samples: dict[str, list[float]] = {}
    for i in range(reps):
        for name, value in one(texts[i % len(texts)]).items():
            samples.setdefault(name, []).append(value)
    return {name: ms_percentiles(values) for name, values in samples.items()}


def bench_concurrent(call: Callable[[str], object], batcher, texts: list[str], clients: int,
                     per_client: int) -> dict:
    """Many callers at once, each call(text) going through `batcher`: throughput, latency seen by the
    callers, and the sizes of the batches the batcher ran meanwhile."""
    latencies: list[float] = []
    lock = threading.Lock()
    call(texts[0])  # warm
    before = len(batcher.batches)

    def client(offset: int) -> None:
        mine = []
        for i in range(per_client):
            t = time.perf_counter()
            call(texts[(offset + i) % len(texts)])
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c * per_client,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    sizes = batcher.batches[before:]
    return {"clients": clients, "queries": clients * per_client, "qps": round(clients * per_client / wall, 1),
            "latency": ms_percentiles(latencies), "max_batch": batcher.max_batch,
            "max_wait_ms": round(batcher.max_wait * 1e3, 3), "batches": len(sizes),
            "mean_batch": round(statistics.mean(sizes), 2) if sizes else None}


def pipeline_stage(shared) -> Callable[[str], dict[str, float]]:
    """one(text) for bench_stage over a SharedRetriever: its reported stage times, and the total the caller
    saw (the hand-over to the worker thread included), in seconds."""
    def one(text: str) -> dict[str, float]:
        t = time.perf_counter()
        _, ms = shared.rank(text)
        total = time.perf_counter() - t
        return {**{name: v / 1e3 for name, v in ms.items()}, "total": total}

    return one


# --------------------------------------------------------------------------------------- generation

def bench_generation(backend, prompt_lengths=(512, 1024, 2048), batches=(1, 8), new_tokens: int = 128,
                     reps: int = 3, seed: int = 0, log: Callable[[str], None] = lambda m: None) -> dict:
    """TTFT per prompt length and decode tokens/s per batch size of a generation backend.

    TTFT is a generate of one new token (prefill plus the first token); decode is (batch x (new - 1))
    tokens over the time of a whole generate minus its one-token time, both after a 1024-token prompt
    (or the longest that fits). Prompts are random token ids: speed does not depend on their text.
    gpu_during: the busiest GPU's SM clock and power while the TTFTs and each batch's decode ran
    (doctor.GpuWatch; empty without nvidia-smi), since a card at its power limit lowers its clock.
    """
    from trtrag_cli.generate.base import SamplingParams
    from trtrag_cli.generate.prompt import Prompt

    rng = np.random.default_rng(seed)
    vocab = len(backend.tokenizer)
    context = getattr(backend, "context", 4096)

    def prompt(n: int) -> Prompt:
        return Prompt("", rng.integers(min(100, vocab - 1), vocab, n).tolist(), [])

    def median_s(fn) -> float:  # generate returns host data, so each call has finished on the device
        return statistics.median(timed(fn, reps, warmup=1))

    one = SamplingParams(max_new_tokens=1)
    out: dict = {"ttft_ms": {}, "decode_tok_s": {}, "new_tokens": new_tokens, "gpu_during": {}}
    decoder = getattr(backend, "decoder", None)
    if decoder is not None:     # our decode loop: whether its one-row steps read packed matrices
        out["packed_matrices"] = decoder.packed_count()
        if decoder.packed_note:
            out["packed_note"] = decoder.packed_note
    with GpuWatch() as watch:
        for n in prompt_lengths:
            if n + 1 > context:
                continue
            p = prompt(n)
            out["ttft_ms"][str(n)] = round(median_s(lambda: backend.generate([p], one)) * 1e3, 2)
            log(f"TTFT prompt={n}: {out['ttft_ms'][str(n)]} ms")
    out["gpu_during"]["ttft"] = watch.summary()
    base = min(1024, context - new_tokens - 1)
    full = SamplingParams(max_new_tokens=new_tokens)
    for batch in batches:
        ps = [prompt(base) for _ in range(batch)]
        with GpuWatch() as watch:
            total = median_s(lambda: backend.generate(ps, full))
            first = median_s(lambda: backend.generate(ps, one))
        out["decode_tok_s"][str(batch)] = round(batch * (new_tokens - 1) / max(1e-9, total - first), 1)
        gpu = out["gpu_during"][f"decode_{batch}"] = watch.summary()
        log(f"decode batch={batch}: {out['decode_tok_s'][str(batch)]} tok/s" + _clock_note(gpu))
    out["decode_prompt_tokens"] = base
    return out


def _clock_note(gpu: dict) -> str:
    """', SM 1515-1980 MHz, 700 W of 700 (at the power limit)' for a log line; '' without nvidia-smi."""
    if not gpu:
        return ""
    clock, power = gpu["sm_clock_mhz"], gpu["power_w"]
    note = f", SM {clock['min']:.0f}-{clock['max']:.0f} MHz, {power['max']:.0f} W of {gpu['power_limit_w']:.0f}"
    return note + (" (at the power limit)" if gpu["at_power_limit"] else "")


# ------------------------------------------------------------------------------------------- command

def _query_texts(recipe: Recipe, path: Path | None, n: int) -> list[str]:
    from trtrag_cli.calibrate.run import read_queries

    source = path or Path(recipe.calibrate.queries)
    if source.exists():
        texts = read_queries(source)
    else:
        texts = [f"query number {i} about turbine maintenance intervals" for i in range(n)]
    return texts[:n]


def machine() -> dict:
    """Where the figures come from."""
    from trtrag_cli.util.gpu import gpus

    info = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "gpus": gpus()}
    if deps.available("torch"):
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def run_bench(recipe: Recipe, vectors: int = 0, dim: int = 0, batches: tuple[int, ...] = (1, 32, 1000),
              k: int = 100, kinds: tuple[str, ...] = ("ivf", "ivfpq", "hnsw"), n_queries: int = 1000,
              stage: bool = True, clients: int = 16, queries_path: Path | None = None, reps: int = 0,
              search: bool = True, generation: dict | None = None,
              log: Callable[[str], None] = lambda m: None) -> dict:
    """Everything `trtrag bench` reports, as plain data (see module docstring).

    generation: {"prompt_lengths", "batches", "new_tokens"} to also time the recipe's answer generator.
    """
    if any(b < 1 for b in batches) or k < 1:
        raise TrtragError("batch sizes and k must be positive", "e.g. --batch 1,32,1000 --k 100")
    report: dict = {"schema": SCHEMA, "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if generation is not None:
        report["generation"] = _generation_bench(recipe, generation, reps, log)
    if search:
        from trtrag_cli.index.build import follow_index

        followed = follow_index(recipe)  # the workspace's index is queried with the encoder that built it
        if followed:
            log(followed)
        _search_report(report, recipe, vectors, dim, batches, k, kinds, n_queries, stage, clients, queries_path,
                       reps, log)
    return report


def _generation_bench(recipe: Recipe, settings: dict, reps: int, log) -> dict:
    """The recipe's language model timed over prompt lengths and batches (bench_generation), closed after."""
    from trtrag_cli.generate.registry import open_backend

    backend = open_backend(recipe.answer.generator)
    try:
        out = bench_generation(backend, settings["prompt_lengths"], settings["batches"], settings["new_tokens"],
                               reps or 3, log=log)
    finally:
        backend.close()
    return {"generator": recipe.answer.generator.backend, "model": recipe.answer.generator.model, **out}


def _search_report(report, recipe, vectors, dim, batches, k, kinds, n_queries, stage, clients, queries_path,
                   reps, log) -> None:
    n_queries = max(n_queries, max(batches))
    encoder = None
    if vectors:
        if dim < 1:
            raise TrtragError("--vectors needs --dim", "e.g. --vectors 1000000 --dim 768")
        t = time.perf_counter()
        base, queries = clustered(vectors, dim, n_queries)
        source = {"kind": "synthetic clustered", "vectors": vectors, "dim": dim,
                  "seconds": round(time.perf_counter() - t, 1)}
    else:
        base, queries, encoder, source = _workspace_data(recipe, n_queries, queries_path)
        dim = base.shape[1]
    ids = np.arange(len(base), dtype=np.int64)  # row numbers: the rerank reads vectors by them
    log(f"data: {source['vectors']} x {source['dim']} ({source['kind']})"
        + (f", made in {source['seconds']} s" if "seconds" in source else ""))
    cfg = recipe.index
    if vectors and kinds:
        # The recipe's nlist suits its corpus; synthetic scale gets faiss's rule of thumb, 4 * sqrt(N).
        nlist = min(2 ** round(math.log2(4 * math.sqrt(vectors))), max(1, vectors // 39))
        recipe = recipe.model_copy(update={"index": cfg.model_copy(update={"nlist": nlist})})
    report["data"] = source
    report["index"] = {"nlist": recipe.index.nlist, "nprobe": recipe.index.nprobe,
                       "pq_m": recipe.index.pq_m or max(1, dim // 8), "pq_bits": recipe.index.pq_bits}
    truth = exact_truth(base, queries, max(10, k))
    engines = build_engines(recipe, base, ids, list(kinds), log)
    gpu = report["machine"].get("cuda_device")
    per_batch = {b: reps or max(5, (200 if b == 1 else 100 if b <= 32 else 10) // (1 if gpu else 4)) for b in batches}
    report["search"] = bench_search(engines, base, queries, truth, list(batches), k, per_batch, log)
    if stage:
        report["stage"] = _stage_report(recipe, encoder, engines, base, dim, k, clients, queries_path, gpu,
                                        reps or (1000 if gpu else 200), log)
    report["gpu_memory_used_mib"] = round(gpu_memory_used() / 2**20, 1) if gpu else None
    engines.clear()
    if encoder is not None:
        encoder.close()


def _stage_report(recipe, encoder, engines, base, dim, k, clients, queries_path, gpu, reps, log) -> dict:
    """The retrieval stage at batch 1 and under `clients` concurrent callers: on the workspace's index
    (encoder given) the pipeline's own path; on synthetic vectors, the encoder plus the fastest exact
    engine and an exact re-score."""
    texts = _query_texts(recipe, queries_path, 2000)
    per_client = max(5, 4 * reps // clients)
    if encoder is not None:
        out = _pipeline_stage_report(recipe, encoder, texts, clients, per_client, reps, log)
    else:
        out = _synthetic_stage_report(recipe, engines, base, dim, k, texts, clients, per_client, reps, log)
    log("stage P50/P99 ms: " + ", ".join(f"{n} {v['p50_ms']:.3f}/{v['p99_ms']:.3f}"
                                         for n, v in out["batch1"].items()))
    c = out["concurrent"]
    one = out["batch1"]["total"]["mean_ms"]
    c["speedup"] = round(c["qps"] / (1e3 / one), 2) if one > 0 else None  # against one caller in turn
    log(f"concurrent: {clients} clients {c['qps']} q/s ({c['speedup']}x one caller), mean batch {c['mean_batch']}")
    return out


def _pipeline_stage_report(recipe, encoder, texts, clients, per_client, reps, log) -> dict:
    """The recipe's mode through retrieve.shared, as ask (one caller, no batch wait) and serve (the
    serve.retrieve_* batching) run it."""
    from trtrag_cli.retrieve.retriever import Retriever
    from trtrag_cli.retrieve.shared import SharedRetriever

    retriever = Retriever(recipe, encoder=encoder)  # the workspace's index, placed as ask places it
    if hasattr(encoder, "warmup"):
        log(f"capturing the encoder's CUDA graphs: {len(encoder.warmup())} buckets")
    mode = recipe.retrieve.mode
    out = {"encoder": encoder.name, "search_engine": retriever.vindex.placement, "mode": mode,
           "path": "pipeline", "top_n": recipe.retrieve.top_n, "top_k": recipe.retrieve.top_k,
           "rerank": {"dense": "exact fp32 re-score of the candidates", "bm25": "BM25 order",
                      "rrf": "reciprocal rank fusion of dense and BM25", "hybrid": "weighted normalised dense + BM25"
                      }[mode]}
    log(f"retrieval stage: {mode} through the pipeline's batch worker, {reps} questions one at a time")
    with SharedRetriever(recipe, max_wait_ms=0, retriever=retriever, workers=1) as alone:
        out["batch1"] = bench_stage(pipeline_stage(alone), texts, reps)
        with SharedRetriever(recipe, retriever=retriever) as crowd:  # serve's batching settings
            out["concurrent"] = bench_concurrent(lambda t: crowd.rank(t), crowd.batcher, texts, clients,
                                                 per_client)
    return out


def _synthetic_stage_report(recipe, engines, base, dim, k, texts, clients, per_client, reps, log) -> dict:
    """Dense only (synthetic vectors have no texts for BM25): encode, the fastest exact engine, re-score."""
    from trtrag_cli.encode.artifacts import open_recipe_encoder
    from trtrag_cli.retrieve.batcher import Batcher
    from trtrag_cli.util.workspace import Workspace

    encoder = open_recipe_encoder(recipe, Workspace(recipe.workspace_dir()))
    try:
        if encoder.dim != dim:
            raise TrtragError(f"the encoder {encoder.name} makes {encoder.dim}-d vectors but the benchmark's are "
                              f"{dim}-d", f"use --dim {encoder.dim}, or --set encoder.model=<a {dim}-d model folder>")
        exact = [(label, s) for label, s, facts in engines if facts["kind"] == "flat"]
        label, searcher = min(exact, key=lambda e: _p50(e[1], base[:1], k))
        if hasattr(encoder, "warmup"):
            log(f"capturing the encoder's CUDA graphs: {len(encoder.warmup())} buckets")
        top_k = recipe.retrieve.top_k if recipe.retrieve.top_k > 10 else 10
        st = Stage(encoder, searcher, base, k, top_k)
        log(f"retrieval stage: {encoder.name} + {label}, dense only (synthetic vectors), {reps} questions one "
            "at a time")
        out = {"encoder": encoder.name, "search_engine": label, "mode": "dense",
               "path": "synthetic: dense search + exact re-score (no texts for BM25)", "top_n": k, "top_k": top_k,
               "rerank": "exact fp32 re-score of the candidates", "batch1": bench_stage(st.one, texts, reps)}
        with Batcher(st.many, max_batch=recipe.serve.retrieve_max_batch,
                     max_wait_ms=recipe.serve.retrieve_max_wait_ms, name="bench") as batcher:
            out["concurrent"] = bench_concurrent(batcher, batcher, texts, clients, per_client)
        return out
    finally:
        encoder.close()


def _p50(searcher, q, k) -> float:
    return statistics.median(timed(lambda: searcher.search(q, k), 20))


def _workspace_data(recipe: Recipe, n_queries: int, queries_path: Path | None):
    """The workspace index's vectors and ids, and its queries encoded by the recipe's encoder."""
    from trtrag_cli.encode.artifacts import open_recipe_encoder
    from trtrag_cli.index.generation import load_index_manifest, open_store
    from trtrag_cli.util.workspace import Workspace

    ws = Workspace(recipe.workspace_dir())
    gen = ws.require_index()
    store = open_store(gen, load_index_manifest(gen))
    try:
        vectors = store.vectors_of(store.live_rows())
        texts = _query_texts(recipe, queries_path, n_queries)
        if len(texts) < n_queries:  # too few query texts: pad with chunk texts
            pad = zip(range(n_queries - len(texts)), store.iter_records(("text",)))
            texts += [values[0] for _, (_, values) in pad]
    finally:
        store.close()
    encoder = open_recipe_encoder(recipe, ws)
    queries = encoder.encode(texts, batch_size=64)
    return (vectors, queries, encoder,
            {"kind": "workspace index", "vectors": len(vectors), "dim": int(vectors.shape[1]), "queries": len(texts)})


def plot(report: dict, path: Path) -> Path:
    """PNG: per-stage percentiles of the batch-1 retrieval stage, and batch-1 search latency per engine."""
    if not deps.available("matplotlib"):
        raise TrtragError("--plot needs matplotlib", "pip install matplotlib (or trtrag[bench])")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = (report.get("stage") or {}).get("batch1")
    if not report.get("search"):
        raise TrtragError("the report has no search measurements to plot", "run trtrag bench with --search")
    rows = [r for r in report["search"] if r["batch"] == min(x["batch"] for x in report["search"])]
    fig, axes = plt.subplots(1, 2 if stage else 1, figsize=(13 if stage else 7, 4.5), squeeze=False)
    marks = ("p50_ms", "p90_ms", "p99_ms")
    width = 0.27
    ax = axes[0][0]
    for i, m in enumerate(marks):
        ax.bar(np.arange(len(rows)) + (i - 1) * width, [r[m] for r in rows], width, label=m[:3].upper())
    ax.set_xticks(np.arange(len(rows)), [r["engine"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title(f"search, batch {rows[0]['batch']}, k={rows[0]['k']}" if rows else "search")
    ax.legend()
    if stage:
        ax = axes[0][1]
        names = [n for n in STAGES if n in stage]
        for i, m in enumerate(marks):
            ax.bar(np.arange(len(names)) + (i - 1) * width, [stage[n][m] for n in names], width, label=m[:3].upper())
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_ylabel("ms")
        ax.set_title("retrieval stage, one question at a time")
        ax.legend()
    data = report.get("data", {})
    where = report.get("machine", {}).get("cuda_device") or report.get("machine", {}).get("cpu", "")
    fig.suptitle(f"trtrag bench: {data.get('vectors', '?')} x {data.get('dim', '?')} on {where}")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
