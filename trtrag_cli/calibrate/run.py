"""`trtrag calibrate`: domain queries -> activation ranges -> Q/DQ INT8 model that passes the accuracy gate.

Batches of at least 1024 queries are folded into streaming histograms one after another; after each
batch the ranges are recomputed and their drift from the previous batch reported, until they are
stable (drift <= tolerance after min_iterations) or max_iterations is reached. The results, written
to <workspace>/<name>/calibration/ in one atomic step:

  model.qdq.onnx     explicit-quantization model (what TensorRT 10/11 builds and ORT runs for the gate)
  calibration.json   method, per-tensor ranges, query-set hash, drift history, gate report
  calibration.cache  the same activation ranges in TensorRT's legacy (<= 10) implicit-INT8 cache format,
                     only for a real TensorRT version: the one installed here or `trt_version` for the
                     target (its header carries the version; TensorRT 11 has no calibrator to read it)
  holdout.txt        the held-out queries the gate used, so build-engine gates its own INT8 form the same way
  smoothing.json     SmoothQuant factors applied before quantizing (quantize/smooth.py)
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import time
from pathlib import Path

import numpy as np

from trtrag_cli.calibrate.trt_cache import target_trt_version, write_trt_cache
from trtrag_cli.encode.artifacts import CALIBRATION_DIR, HOLDOUT, QDQ_MODEL, REPORT, SMOOTHING
from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import library_versions, sha256_file, write_json
from trtrag_cli.util.workspace import Workspace

MIN_BATCH = 1024
RUN_TOKENS = 2048  # padded tokens per statistics run: bounds the activations held at once


# -------------------------------------------------------------------------------------------- queries

def read_queries(path: Path) -> list[str]:
    """Queries from a text file (one per line), a jsonl file ("query" or "text"), or a folder of them."""
    path = Path(path)
    if not path.exists():
        raise TrtragError(f"calibration queries not found: {path}",
                          "pass --queries FILE, or set calibrate.queries in the recipe")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    queries: list[str] = []
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise TrtragError(f"{file} is not UTF-8 text", "save the query set as UTF-8") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if file.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                    line = str(row.get("query") or row.get("text") or "").strip()
                except (ValueError, AttributeError):
                    raise TrtragError(f"{file}:{number}: not a JSON object",
                                      'write one {"query": "..."} per line') from None
            if line:
                queries.append(line)
    return list(dict.fromkeys(queries))  # duplicates would weigh twice and leak into the holdout


def corpus_queries(recipe: Recipe, n: int, seed: int = 0) -> list[str]:
    """Pseudo-queries cut from the indexed chunks (spans of 4-24 words), for when no query set exists."""
    from trtrag_cli.index.generation import load_index_manifest, open_store

    gen = Workspace(recipe.workspace_dir()).current_index()
    if gen is None:
        raise TrtragError("no calibration queries and no index to sample them from",
                          "put domain queries in calibration/ (one per line) or run trtrag index first")
    store = open_store(gen, load_index_manifest(gen))
    try:
        words = [values[0].split() for _, values in store.iter_records(("text",))]
    finally:
        store.close()
    words = [w for w in words if len(w) >= 4]
    rng = random.Random(seed)
    out: set[str] = set()
    for _ in range(n * 4):
        if len(out) >= n or not words:
            break
        w = rng.choice(words)
        size = rng.randint(4, min(24, len(w)))
        start = rng.randint(0, len(w) - size)
        out.add(" ".join(w[start:start + size]))
    return sorted(out)


def _split(queries: list[str], batch_size: int, holdout: int, seed: int = 0):
    """Shuffle, keep `holdout` queries for the gate (never fewer than one full batch for calibration)."""
    if batch_size < MIN_BATCH:
        raise TrtragError(f"calibration batches must hold at least {MIN_BATCH} queries, got {batch_size}",
                          f"use --batch-size {MIN_BATCH} or more")
    if len(queries) < batch_size:
        raise TrtragError(f"{len(queries)} distinct calibration queries, but one batch needs {batch_size} "
                          f"(plus up to {holdout} held out for the accuracy gate)",
                          f"add at least {batch_size - len(queries)} more domain queries")
    shuffled = list(queries)
    random.Random(seed).shuffle(shuffled)
    held = min(holdout, len(shuffled) - batch_size)
    calib, gate = shuffled[held:], shuffled[:held]
    batches = [calib[i:i + batch_size] for i in range(0, len(calib) - batch_size + 1, batch_size)]
    batches[-1].extend(calib[len(batches) * batch_size:])  # the remainder joins the last batch
    return batches, gate


# ------------------------------------------------------------------------------------------ statistics

def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Runner:
    """Runs texts through a model that also returns the named tensors; hands each run's real tokens on."""

    def __init__(self, model, names: list[str], tokenizer, threads: int):
        from trtrag_cli.calibrate import qdq
        from trtrag_cli.encode.onnxruntime import new_session, session_options

        self.names = names
        self.tokenizer = tokenizer
        self.session = new_session(qdq.with_outputs(model, names).SerializeToString(), session_options(threads))
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, texts: list[str], sink) -> None:
        from trtrag_cli.encode.batching import length_sorted_batches, pad

        for _, ids in length_sorted_batches(self.tokenizer, texts, 256):
            per_run = max(1, RUN_TOKENS // len(ids[0]))
            for sub in range(0, len(ids), per_run):
                part = ids[sub:sub + per_run]
                input_ids, mask = pad(part, len(part[0]))
                feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
                outs = self.session.run(self.names, {n: feeds[n] for n in self.inputs})
                real = mask.astype(bool)  # padding positions are not data
                sink({n: o[real] for n, o in zip(self.names, outs)})


TUNE_ALPHAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
TUNE_ROWS = 4096  # sampled token rows per tensor for the tuning search


class _RowSample:
    """A uniform random sample of at most `size` rows over every run (random keys, keep the smallest)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.keys: np.ndarray | None = None
        self.rows: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        keys = self.rng.random(len(rows))
        if self.rows is not None:
            keys, rows = np.concatenate([self.keys, keys]), np.concatenate([self.rows, rows])
        keep = np.argsort(keys)[:self.size]
        self.keys, self.rows = keys[keep], rows[keep]


def smoothing_pass(model, tokenizer, batches: list[list[str]], cfg, method: str, threads: int = 0):
    """SmoothQuant factors (and, with calibrate.tune, per-tensor range percentiles).

    Factors come from the per-channel maxima of the first batch. Tuning judges them on rows sampled from
    the second batch: judged on the rows they were fitted to, alphas near 1 won by dividing channels
    that happened to stay small there, and the next batch's values in those channels came out up to 8x
    the range. Returns (smoothings, percentiles keyed by tensor, tuning report or None).
    """
    from trtrag_cli.calibrate import qdq, smooth

    sites = qdq.find_sites(model)
    tune = cfg.tune and method in ("percentile", "max")
    names = qdq.activation_names(sites) if tune else [s.activation for s in smooth.smoothable(sites)]
    channel_max = {n: None for n in names}
    samples = {n: _RowSample(TUNE_ROWS) for n in names}

    def fit(outs: dict) -> None:
        for n, v in outs.items():
            m = np.abs(v).max(axis=0)
            channel_max[n] = m if channel_max[n] is None else np.maximum(channel_max[n], m)

    def sample(outs: dict) -> None:
        for n, v in outs.items():
            samples[n].add(v)

    runner = _Runner(model, names, tokenizer, threads)
    runner.run(batches[0], fit)
    if not tune:
        alpha = cfg.smooth_alpha
        return (smooth.plan(model, sites, channel_max, alpha) if alpha > 0 else []), {}, None
    runner.run(batches[1] if len(batches) > 1 else batches[0], sample)
    alphas = TUNE_ALPHAS if cfg.smooth_alpha > 0 else ()
    percentiles = sorted({100.0} if method == "max" else {cfg.percentile, 99.999, 100.0})
    tuning = smooth.search(model, sites, channel_max, {n: s.rows for n, s in samples.items()}, alphas, percentiles)
    return tuning.smoothings, tuning.percentiles, tuning.report


def collect(model, names: list[str], tokenizer, batches: list[list[str]], method: str, percentile: float,
            min_iterations: int, max_iterations: int, tolerance: float, threads: int = 0, progress=None,
            chosen: dict[str, float] | None = None):
    """Stream batches through model, histogramming the named tensors; (collector, ranges, history, stable).

    chosen: tensors whose range takes their own percentile instead of the method's (calibrate.tune).
    """
    from trtrag_cli.calibrate import stats

    runner = _Runner(model, names, tokenizer, threads)
    collector = stats.RangeCollector(names)
    history, previous, ranges, stable = [], None, {}, False
    for iteration, batch in enumerate(batches[:max_iterations], 1):
        started = time.perf_counter()
        runner.run(batch, collector.add)
        ranges = collector.ranges(method, percentile, chosen)
        moved, tensor = stats.drift(previous, ranges) if previous else (float("inf"), "")
        history.append({"iteration": iteration, "queries": len(batch),
                        "drift": None if previous is None else round(moved, 5), "worst_tensor": tensor,
                        "seconds": round(time.perf_counter() - started, 2), "peak_rss_mib": round(_peak_rss_mib())})
        if progress:
            progress(history[-1])
        previous = ranges
        if iteration >= min_iterations and moved <= tolerance:
            stable = True
            break
    return collector, ranges, history, stable


# ------------------------------------------------------------------------------------------- command

def _hash_queries(queries: list[str]) -> str:
    return hashlib.sha256("\n".join(queries).encode()).hexdigest()


def run_calibrate(recipe: Recipe, queries_path: Path | None = None, method: str | None = None,
                  batch_size: int | None = None, iterations: int | None = None, strict: bool = False,
                  eval_path: Path | None = None, progress=None, trt_version: str | None = None) -> dict:
    """Calibrate the recipe's encoder and publish the calibration folder; returns the report.

    trt_version: the TensorRT (<= 10) that will read calibration.cache, e.g. "10.16.1"; without it the
    cache is written for the installed TensorRT, or not at all (report["trt_cache"]["skipped"] says why).
    """
    import onnx

    from trtrag_cli.calibrate import gate, qdq, smooth, stats
    from trtrag_cli.encode.artifacts import encoder_cache
    from trtrag_cli.encode.models import load_tokenizer, model_info
    from trtrag_cli.encode.onnxruntime import cache_folder, ensure_onnx

    target_trt_version(trt_version)  # a bad version fails now, not after minutes of calibration
    cfg = recipe.calibrate
    method = method or cfg.method
    if method not in stats.METHODS:
        raise TrtragError(f"unknown calibration method {method!r}", "use one of: " + ", ".join(stats.METHODS))
    batch_size = batch_size or cfg.batch_size
    max_iter = iterations or cfg.max_iterations
    min_iter = min(cfg.min_iterations, max_iter)
    warnings: list[str] = []
    source = Path(queries_path or cfg.queries)
    if queries_path is None and not source.exists():
        queries = corpus_queries(recipe, batch_size * min_iter + cfg.holdout)
        warnings.append(f"no domain queries at {source}: sampled {len(queries)} word spans from the indexed "
                        "corpus instead; real user queries calibrate better")
        source = Path("<indexed corpus>")
    else:
        queries = read_queries(source)
    batches, holdout = _split(queries, batch_size, cfg.holdout)
    if len(batches) < min_iter:
        warnings.append(f"{len(queries)} queries make {len(batches)} batch(es) of {batch_size}; "
                        f"{min_iter} are needed to confirm the ranges are stable")
    info = model_info(recipe.encoder.model)
    fp32_path = ensure_onnx(recipe.encoder.model, cache_folder(encoder_cache(recipe), recipe.encoder.model), "plain")
    plain = onnx.load(str(fp32_path))
    tokenizer = load_tokenizer(info.dir, recipe.encoder.max_tokens)
    started = time.perf_counter()
    if cfg.tune and method == "entropy":
        warnings.append("calibrate.tune chooses percentiles, which entropy calibration does not use: it was skipped")
    smoothings, chosen, tuning = smoothing_pass(plain, tokenizer, batches, cfg, method, recipe.encoder.threads or 0)
    model = smooth.apply(plain, smoothings)  # FP32-exact; its MatMul inputs are what gets quantized
    plain_names = qdq.activation_names(qdq.find_sites(plain))
    names = list(dict.fromkeys(qdq.activation_names(qdq.find_sites(model)) + plain_names))
    collector, ranges, history, stable = collect(model, names, tokenizer, batches, method, cfg.percentile,
                                                 min_iter, max_iter, cfg.tolerance, recipe.encoder.threads or 0,
                                                 progress, chosen)
    if not stable and len(batches) >= min_iter:
        last = history[-1]["drift"]
        moved = "only one batch ran" if last is None else f"they still moved {last:.3%} in the last batch"
        warnings.append(f"ranges not shown stable: {moved} (tolerance {cfg.tolerance:.1%}); add queries or raise "
                        "calibrate.max_iterations")
    calib_seconds = time.perf_counter() - started
    ws = Workspace(recipe.workspace_dir())
    with ws.lock(), ws.publish_dir(CALIBRATION_DIR) as out:
        probe = gate.Probe.build(recipe, info, fp32_path, holdout, eval_path or (Path(cfg.eval) if cfg.eval else None))
        warnings.extend(probe.warnings)

        def build(keep_float: frozenset[str]) -> Path:
            path = out / QDQ_MODEL
            onnx.save(qdq.insert_qdq(model, ranges, keep_float), str(path))
            return path

        verdict = gate.run(probe, build, qdq.find_sites(model), cfg, progress=progress)
        if not verdict["passed"]:
            message = (f"INT8 misses the accuracy gate even with {len(verdict['kept_float'])} MatMuls in "
                       f"floating point (mean cosine {verdict['final']['mean_cosine']:.4f})")
            if strict:
                raise TrtragError(message, "add domain queries, try --method max or percentile, or raise "
                                           "calibrate.max_float_layers")
            warnings.append(message)
        build(frozenset(verdict["kept_float"]))  # the file left in place is the gated model
        # The legacy cache serves TensorRT's implicit INT8 of the plain FP32 export: unsmoothed tensors.
        trt_cache = write_trt_cache(out, {n: ranges[n] for n in plain_names}, trt_version)
        smooth.save(out / SMOOTHING, smoothings, "tuned" if tuning else cfg.smooth_alpha)
        (out / HOLDOUT).write_text("".join(q.replace("\n", " ") + "\n" for q in holdout), encoding="utf-8")
        report = {
            "model": recipe.encoder.model, "fp32_onnx": str(fp32_path),
            "fp32_onnx_sha256": sha256_file(fp32_path),
            "method": method, "percentile": cfg.percentile if method == "percentile" else None,
            "queries": {"source": str(source), "count": len(queries), "sha256": _hash_queries(queries),
                        "batch_size": batch_size, "batches_available": len(batches), "holdout": len(holdout)},
            "iterations": len(history), "stable": stable, "tolerance": cfg.tolerance, "history": history,
            "calibration_seconds": round(calib_seconds, 2), "peak_rss_mib": round(_peak_rss_mib()),
            "ranges": {name: round(float(v), 6) for name, v in ranges.items()},
            "tensor_max": {name: round(h.max, 6) for name, h in collector.hists.items()},
            "sites": len(qdq.find_sites(model)), "gate": verdict,
            "smoothing": {"alpha": "tuned" if tuning else cfg.smooth_alpha, "sites": len(smoothings),
                          "file": SMOOTHING},
            "tuning": tuning,
            "trt_cache": trt_cache,
            "versions": library_versions(("numpy", "onnx", "onnxruntime")),
            "warnings": warnings,
        }
        report["id"] = hashlib.sha256(json.dumps([report["ranges"], verdict["kept_float"], method,
                                                  [s.factors.tolist() for s in smoothings]],
                                                 sort_keys=True).encode()).hexdigest()[:12]
        write_json(out / REPORT, report)
    report["path"] = str(ws.root / CALIBRATION_DIR)
    return report


