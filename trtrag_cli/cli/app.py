"""The `trtrag` command: each command loads the recipe, calls one function, renders the result.

Human output goes to stderr through Rich; `--json` prints one JSON document on stdout. Exit codes:
0 success, 1 user error (one line, no traceback), 2 usage error.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from trtrag_cli.util.errors import TrtragError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build and run a fast retrieval-augmented generation service from one YAML recipe.")

RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe YAML (default: recipes/default.yaml).")
SetOpt = typer.Option(None, "--set", help="Override a recipe value, e.g. --set retrieve.top_k=10 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def command(fn: Callable) -> Callable:
    """Turn TrtragError into one line (or a JSON error document) and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrtragError as exc:
            if kwargs.get("as_json"):
                _emit_json({"error": exc.message, "hint": exc.hint})
            line = f"error: {exc.message}" + (f" — {exc.hint}" if exc.hint else "")
            _console().print(line, markup=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _console().print("interrupted; the existing index is untouched", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def _recipe(recipe: Optional[Path], overrides: Optional[List[str]]):
    from trtrag_cli.recipe.schema import load_recipe

    return load_recipe(recipe, overrides or [])


def _print_warnings(console, warnings: list[str], limit: int = 5) -> None:
    for w in warnings[:limit]:
        console.print(f"warning: {w}", markup=False, style="yellow")
    if len(warnings) > limit:
        console.print(f"... and {len(warnings) - limit} more warnings (see --json)", style="yellow")


@app.command()
@command
def index(paths: List[Path] = typer.Argument(..., help="Corpus folders or files."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          as_json: bool = JsonOpt) -> None:
    """Chunk, embed and index a corpus (incremental: only new or changed files are embedded)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from trtrag_cli.index.build import run_index

    cfg = _recipe(recipe, set_)
    console = _console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=as_json) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            task = bar.tasks[tasks[stage]]
            elapsed = task.elapsed or 0.0
            rate = f"{done / elapsed:.0f} chunks/s" if stage == "embed" and elapsed > 0 else ""
            bar.update(tasks[stage], completed=done, total=total, rate=rate)

        report = run_index(cfg, paths, progress)
    if as_json:
        _emit_json(report)
        return
    c = report["counts"]
    rate = f", {report['docs_per_s']} docs/s" if report["docs_per_s"] else ""
    console.print(f"indexed {c['chunks_total']} chunks into {report['workspace']} in {report['seconds']:.1f} s "
                  f"({report['documents_indexed']} documents embedded{rate}; encoder {report['encoder']})")
    console.print(f"files: {c['files_added']} added, {c['files_changed']} changed, {c['files_removed']} removed, "
                  f"{c['files_unchanged']} unchanged; chunks embedded: {c['chunks_embedded']}"
                  + (f" at {report['embed_chunks_per_s']} chunks/s" if report["embed_chunks_per_s"] else ""))
    if report["skipped"]:
        console.print("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(report["skipped"].items())))
    for note in report["notes"]:
        console.print(f"note: {note}")
    _print_warnings(console, report["warnings"])


@app.command()
@command
def calibrate(queries: Optional[Path] = typer.Option(None, "--queries", "-q", help="Domain queries: text (one "
                                                      "per line) or jsonl; default: the recipe's calibrate.queries."),
              method: Optional[str] = typer.Option(None, "--method", help="entropy, percentile or max."),
              batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Queries per batch (>= 1024)."),
              iterations: Optional[int] = typer.Option(None, "--iterations", help="Most batches to run."),
              eval_file: Optional[Path] = typer.Option(None, "--eval", help="queries.jsonl for the recall gate."),
              strict: bool = typer.Option(False, "--strict", help="Exit 1 when INT8 cannot meet the gate."),
              recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
              as_json: bool = JsonOpt) -> None:
    """INT8 calibration on domain queries: ranges, Q/DQ ONNX, TensorRT cache, and the accuracy gate."""
    from trtrag_cli.calibrate.run import run_calibrate

    cfg = _recipe(recipe, set_)
    console = _console()

    def progress(event: dict) -> None:
        if as_json:
            return
        if "gate" in event:
            g = event["gate"]
            console.print(f"gate: {g['kept_float']} MatMuls in float: mean cosine {g['mean_cosine']:.4f}"
                          + (f", recall@10 drop {g['recall@10_drop']:+.4f}" if "recall@10_drop" in g else ""),
                          markup=False)
            return
        drift = "-" if event["drift"] is None else f"{event['drift']:.2%}"
        console.print(f"iteration {event['iteration']}: {event['queries']} queries, drift {drift}, "
                      f"{event['seconds']:.1f} s, peak RSS {event['peak_rss_mib']} MiB", markup=False)

    report = run_calibrate(cfg, queries, method, batch_size, iterations, strict, eval_file, progress)
    if as_json:
        _emit_json(report)
        return
    g = report["gate"]
    final = g["final"]
    console.print(f"calibrated {report['sites']} MatMuls ({report['method']}) on {report['queries']['count']} "
                  f"queries in {report['iterations']} batches of {report['queries']['batch_size']}; "
                  f"{'stable' if report['stable'] else 'NOT stable'}; peak RSS {report['peak_rss_mib']} MiB")
    console.print(f"gate {'passed' if g['passed'] else 'FAILED'}: mean cosine {final['mean_cosine']:.4f} "
                  f"(min {final['min_cosine']:.4f})"
                  + (f", top-10 overlap {final['top10_overlap']:.3f}" if "top10_overlap" in final else "")
                  + (f", recall@10 {final['recall@10']:.3f} vs fp32 {final['recall@10_fp32']:.3f}"
                     if "recall@10" in final else "")
                  + f"; {g['quantized']}/{g['total']} MatMuls INT8", markup=False)
    for name in g["kept_float"]:
        console.print(f"  kept in float: {name} (alone it lost {g['sensitivity'][name]:.5f} cosine)", markup=False)
    console.print(f"wrote {report['path']}")
    _print_warnings(console, report["warnings"])


@app.command("build-engine")
@command
def build_engine(int8: bool = typer.Option(False, "--int8", help="INT8 from the calibration."),
                 fp16: bool = typer.Option(False, "--fp16", help="FP16 (GPU)."),
                 fp32: bool = typer.Option(False, "--fp32", help="FP32."),
                 backend: str = typer.Option("auto", "--backend", help="auto, tensorrt, onnxruntime or torch."),
                 generator: bool = typer.Option(False, "--generator", help="Prepare the recipe's answer "
                                                "generator instead (warm-up, node check, trtllm-serve command)."),
                 recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
                 as_json: bool = JsonOpt) -> None:
    """Build the encoder engine a backend runs (TensorRT plan, optimised ORT model, torch CUDA graphs)."""
    from trtrag_cli.engine.build import run_build_engine

    if generator:
        from trtrag_cli.generate.build import build_generator

        report = build_generator(_recipe(recipe, set_))
        if as_json:
            _emit_json(report)
        else:
            _console().print(json.dumps(report, indent=2), markup=False)
        return
    chosen = [name for name, on in (("int8", int8), ("fp16", fp16), ("fp32", fp32)) if on]
    if len(chosen) > 1:
        raise TrtragError("choose one precision", "pass one of --int8, --fp16, --fp32")
    cfg = _recipe(recipe, set_)
    precision = chosen[0] if chosen else cfg.encoder.precision
    console = _console()
    manifest = run_build_engine(cfg, precision, backend,
                                progress=None if as_json else lambda e: console.print(
                                    f"gate: {e['gate']['kept_float']} float MatMuls, mean cosine "
                                    f"{e['gate']['mean_cosine']:.4f}", markup=False))
    if as_json:
        _emit_json(manifest)
        return
    picked = f" (auto picked {manifest['picked_by_auto']})" if "picked_by_auto" in manifest else ""
    console.print(f"built {manifest['backend']} {precision} engine{picked} in {manifest['build_seconds']} s: "
                  f"{manifest['path']}", markup=False)
    for form, c in manifest.get("candidates", {}).items():
        console.print(f"  {form}: batch 1 {c['speed']['batch1_ms']} ms, batch 64 "
                      f"{c['speed']['batch64_ms_per_text']} ms/text, mean cosine {c['gate']['mean_cosine']:.4f}, "
                      f"gate {'passed' if c['passed'] else 'failed'}"
                      + (" <- chosen" if form == manifest.get("form") else ""), markup=False)


@app.command()
@command
def ask(question: str = typer.Argument(..., help="The question."),
        top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Passages to return."),
        mode: Optional[str] = typer.Option(None, help="Rerank mode: hybrid, rrf, bm25 or dense."),
        stream: bool = typer.Option(False, "--stream", help="Print the answer as it is generated."),
        recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
        as_json: bool = JsonOpt) -> None:
    """Answer a question from the index, with numbered citations."""
    from trtrag_cli.pipeline import Pipeline, check_question

    check_question(question)
    cfg = _recipe(recipe, set_)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    with Pipeline(cfg) as pipe:
        result = pipe.ask(question, top_k=top_k, mode=mode, on_piece=show if stream and not as_json else None)
    if as_json:
        _emit_json(result)
        return
    console = _console()
    _print_warnings(console, result["warnings"])
    sys.stdout.write(("" if stream and result["generation"] else result["answer"]) + "\n\n")
    for cite in result["citations"]:
        sys.stdout.write(f"[{cite['n']}] {cite['source']} ({cite['chunk']})\n")
    t = result["timings_ms"]
    console.print(f"encode {t['encode']:.1f} ms, search {t['search']:.1f} ms, rerank {t['rerank']:.1f} ms, "
                  f"answer {t['answer']:.1f} ms", style="dim")
    g = result["generation"]
    if g:
        speed = f", {g['tokens_per_s']} tok/s" if g["tokens_per_s"] else ""
        console.print(f"{g['generator']}: {g['prompt_tokens']} prompt + {g['output_tokens']} answer tokens, "
                      f"first token {g['ttft_ms']} ms{speed}", style="dim", markup=False)


@app.command("eval")
@command
def eval_(queries: Path = typer.Option(..., "--queries", "-q", help="JSONL: {query, relevant: [source, ...]}"),
          modes: Optional[str] = typer.Option(None, "--modes", help="Comma-separated modes to compare, "
                                              "e.g. bm25,dense,rrf,hybrid (default: the recipe's)."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          as_json: bool = JsonOpt) -> None:
    """Recall@k and MRR@k on known-item queries, and latency percentiles per stage."""
    from rich.progress import Progress

    from trtrag_cli.evaluate.known_items import KS, run_eval

    cfg = _recipe(recipe, set_)
    mode_list = [m.strip() for m in modes.split(",") if m.strip()] if modes else None
    console = _console()
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("eval", total=None)
        report = run_eval(cfg, queries, mode_list,
                          progress=lambda _s, done, total: bar.update(task, completed=done, total=total))
    if as_json:
        _emit_json(report)
        return
    from rich.table import Table

    table = Table(title=f"{report['queries']} queries, encoder {report['encoder']}")
    table.add_column("mode")
    for k in KS:
        table.add_column(f"R@{k}", justify="right")
    table.add_column("MRR@10", justify="right")
    table.add_column("P50 ms", justify="right")
    table.add_column("P99 ms", justify="right")
    for mode, res in report["modes"].items():
        m, lat = res["metrics"], res["latency_ms"]["total"]
        table.add_row(mode, *[f"{m[f'recall@{k}']:.3f}" for k in KS], f"{m['mrr@10']:.3f}",
                      f"{lat['p50']:.2f}", f"{lat['p99']:.2f}")
    console.print(table)
    if report["unknown_relevant_count"]:
        console.print(f"warning: {report['unknown_relevant_count']} relevant sources are not in the index, e.g. "
                      + ", ".join(report["unknown_relevant_sources"][:3]), style="yellow", markup=False)


@app.command()
@command
def serve(host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8000, "--port", help="Port (0: any free one, printed)."),
          generate_only: bool = typer.Option(False, "--generate-only", help="Serve the generator as an "
                                             "OpenAI-compatible node, without an index."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Serve /ask and an OpenAI-compatible /v1/chat/completions over HTTP until interrupted."""
    from trtrag_cli.generate.base import SamplingParams
    from trtrag_cli.generate.registry import model_context, open_backend
    from trtrag_cli.serve.server import Service, make_server

    cfg = _recipe(recipe, set_)
    pipeline = None
    if not generate_only:
        from trtrag_cli.pipeline import Pipeline

        pipeline = Pipeline(cfg)
    backend = None
    if cfg.answer.generator != "extractive" or generate_only:  # open_backend refuses extractive
        backend = getattr(getattr(pipeline, "generator", None), "backend", None) if pipeline else None
        backend = backend or open_backend(cfg.answer)
        model_context(backend, cfg.answer)
    service = Service(pipeline, backend, model_name=cfg.answer.served_model or Path(cfg.answer.model or "trtrag").name,
                      defaults=SamplingParams.from_recipe(cfg.answer))
    server = make_server(service, host, port)
    bound = server.server_address
    _console().print(f"serving on http://{bound[0]}:{bound[1]} (ask: {pipeline is not None}, "
                     f"generate: {backend is not None}); Ctrl-C stops", markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
        if pipeline is not None:
            pipeline.__exit__(None, None, None)


@app.command()
@command
def bench(vectors: int = typer.Option(0, "--vectors", "-n", help="Synthetic clustered vectors to search (0: the "
                                      "workspace's index)."),
          dim: int = typer.Option(0, "--dim", "-d", help="Dimension of the synthetic vectors."),
          batch: Optional[str] = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,32,1000 (default: that on "
                                              "a GPU, 1,32,256 on the CPU)."),
          k: int = typer.Option(100, "--k", help="Neighbours per query (the candidates that go to the rerank)."),
          kinds: str = typer.Option("ivf,ivfpq", "--kinds", help="Approximate indexes to measure against exact "
                                    "search (ivf, ivfpq, hnsw; empty for none)."),
          queries: Optional[Path] = typer.Option(None, "--queries", "-q", help="Question texts for the retrieval "
                                                 "stage (default: calibrate.queries)."),
          stage: bool = typer.Option(True, "--stage/--no-stage", help="Time encode + search + rerank at batch 1 "
                                     "and under concurrent callers."),
          clients: int = typer.Option(16, "--clients", help="Concurrent callers for the batched measurement."),
          search: bool = typer.Option(True, "--search/--no-search", help="Measure retrieval (off: --generate only)."),
          generate: bool = typer.Option(False, "--generate", help="Also time the recipe's answer generator: "
                                        "TTFT per prompt length, decode tokens/s per batch size."),
          prompt_lengths: str = typer.Option("512,1024,2048", "--prompt-lengths", help="Prompt tokens for TTFT."),
          gen_batch: str = typer.Option("1,8", "--gen-batch", help="Batch sizes for the decode rate."),
          new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens generated for the decode rate."),
          reps: int = typer.Option(0, "--reps", help="Timed calls per measurement (0: 200 at batch 1, fewer for "
                                   "larger batches, a quarter of that on the CPU; the stage: 1000 on a GPU, 200 on "
                                   "the CPU)."),
          plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the percentiles (matplotlib)."),
          from_json: Optional[Path] = typer.Option(None, "--from-json", help="Plot or print a saved report instead "
                                                   "of measuring."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON report to this file."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          as_json: bool = JsonOpt) -> None:
    """Measure retrieval: search per engine and batch, the batch-1 stage, recall@10, GPU memory."""
    from trtrag_cli.bench.run import plot as draw
    from trtrag_cli.bench.run import run_bench
    from trtrag_cli.util.files import write_json

    if from_json is not None:
        try:
            report = json.loads(Path(from_json).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrtragError(f"cannot read bench report {from_json}: {exc}", "pass a file written by --out") from None
    else:
        cfg = _recipe(recipe, set_)
        from trtrag_cli.util.gpu import gpu_count, torch_gpu_count

        on_gpu = bool(gpu_count() or torch_gpu_count())
        try:
            sizes = tuple(int(b) for b in (batch or ("1,32,1000" if on_gpu else "1,32,256")).split(",") if b.strip())
        except ValueError:
            raise TrtragError(f"--batch must be comma-separated integers, got {batch!r}", "e.g. --batch 1,32,1000") \
                from None
        kind_list = tuple(x.strip() for x in kinds.split(",") if x.strip())
        unknown = [x for x in kind_list if x not in ("ivf", "ivfpq", "hnsw", "flat")]
        if unknown:
            raise TrtragError(f"unknown index kind(s) {', '.join(unknown)}", "use ivf, ivfpq or hnsw")
        console = _console()
        try:
            gen = {"prompt_lengths": [int(x) for x in prompt_lengths.split(",") if x.strip()],
                   "batches": [int(x) for x in gen_batch.split(",") if x.strip()], "new_tokens": new_tokens}
        except ValueError:
            raise TrtragError("--prompt-lengths and --gen-batch take comma-separated integers",
                              "e.g. --prompt-lengths 512,1024 --gen-batch 1,8") from None
        report = run_bench(cfg, vectors, dim, sizes, k, tuple(x for x in kind_list if x != "flat"), stage=stage,
                           clients=clients, queries_path=queries, reps=reps, search=search,
                           generation=gen if generate else None,
                           log=(lambda m: None) if as_json else (lambda m: console.print(m, markup=False, style="dim")))
    if out is not None:
        write_json(out, report)
    if plot is not None:
        draw(report, plot)
    if as_json:
        _emit_json(report)
        return
    _print_bench(report)


def _print_bench(report: dict) -> None:
    from rich.table import Table

    console = _console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
        console.width = 150
    data, where = report.get("data", {}), report.get("machine", {})
    if report.get("search"):
        table = Table(title=f"search: {data.get('vectors')} x {data.get('dim')} ({data.get('kind')}) on "
                            f"{where.get('cuda_device') or where.get('cpu')}")
        for col in ("engine", "batch", "P50 ms", "P90 ms", "P99 ms", "q/s", "R@10", "reranked", "GPU MiB"):
            table.add_column(col, justify="left" if col == "engine" else "right", no_wrap=col == "engine")
        for r in report.get("search", []):
            table.add_row(r["engine"], str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                          f"{r['p99_ms']:.3f}", f"{r['qps']:.0f}", f"{r['recall@10']:.3f}",
                          f"{r['recall@10_reranked']:.3f}",
                          str(r.get("gpu_memory_mib", "-")))
        console.print(table)
    gen = report.get("generation")
    if gen:
        console.print(f"generation ({gen['generator']}, {gen['new_tokens']} new tokens): TTFT "
                      + ", ".join(f"{n} tokens {v} ms" for n, v in gen["ttft_ms"].items()) + "; decode "
                      + ", ".join(f"batch {b} {v} tok/s" for b, v in gen["decode_tok_s"].items()), markup=False)
    stage = report.get("stage")
    if stage:
        t = Table(title=f"retrieval stage, batch 1: {stage['encoder']} + {stage['search_engine']} "
                        f"(top {stage['top_n']} -> {stage['top_k']})")
        for col in ("stage", "P50 ms", "P90 ms", "P99 ms"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        for name, v in stage["batch1"].items():
            t.add_row(name, f"{v['p50_ms']:.3f}", f"{v['p90_ms']:.3f}", f"{v['p99_ms']:.3f}")
        console.print(t)
        c = stage["concurrent"]
        console.print(f"{c['clients']} concurrent callers: {c['qps']:.0f} q/s, P50 {c['latency']['p50_ms']:.2f} ms, "
                      f"P99 {c['latency']['p99_ms']:.2f} ms, mean batch {c['mean_batch']}")


@app.command()
@command
def doctor(recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
           as_json: bool = JsonOpt) -> None:
    """Versions, GPU, the backend each stage resolves to and why; exits 1 when `ask` would fail."""
    from trtrag_cli.doctor import run_doctor

    report = run_doctor(_recipe(recipe, set_))
    if as_json:
        _emit_json(report)
        _fail_on_problems(report["problems"])
        return
    from rich.table import Table

    console = _console()
    console.print(f"Python {report['python']} on {report['platform']}; recipe {report['recipe']}")
    console.print("GPUs: " + (", ".join(f"{g['name']} ({g['memory_mib']} MiB, sm {g['compute_capability']})"
                                        for g in report["gpus"]) or "none"))
    libs = Table(title="libraries")
    libs.add_column("package")
    libs.add_column("version")
    for name, ver in report["libraries"].items():
        libs.add_row(name, ver or "-")
    console.print(libs)
    stages = Table(title="stages")
    for col in ("stage", "backend", "ok", "why"):
        stages.add_column(col)
    for name, st in report["stages"].items():
        stages.add_row(name, st["backend"], "yes" if st["ok"] else "MISSING", st["why"])
    console.print(stages)
    for line in report.get("advice", []):
        console.print(f"advice: {line}", markup=False, style="yellow")
    _fail_on_problems(report["problems"])


def _fail_on_problems(problems: list[str]) -> None:
    """One `error:` line per problem on stderr, then exit 1 (doctor: where `ask` would fail)."""
    for line in problems:
        _console().print(f"error: {line}", markup=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()
