"""`trtrag bench`: search per engine and batch, the batch-1 retrieval stage, the generator, or load on a
running service (--serve); tables or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import (JsonOpt, RecipeOpt, SetOpt, at_least, command, console, emit_json, int_list,
                                   load)
from trtrag_cli.util.errors import TrtragError, UsageError

INDEX_KINDS = ("ivf", "ivfpq", "hnsw", "flat")  # flat (exact search) is always measured: it is the truth


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
          serve: Optional[str] = typer.Option(None, "--serve", help="Load-test a running service at this URL "
                                              "instead (e.g. http://127.0.0.1:8000): --clients at once for "
                                              "--duration, after one client for --baseline-s."),
          duration: float = typer.Option(30.0, "--duration", help="--serve: seconds of load with --clients."),
          baseline_s: float = typer.Option(15.0, "--baseline-s", help="--serve: seconds of one client first, "
                                           "for the N-clients/1-client ratio (0: skip)."),
          route: str = typer.Option("ask", "--route", help="--serve: ask, retrieve or chat (several: ask,retrieve)."),
          api_key: Optional[str] = typer.Option(None, "--api-key", help="--serve: sent as Authorization: Bearer."),
          timeout: float = typer.Option(120.0, "--timeout", help="--serve: seconds one request may take."),
          stream: bool = typer.Option(False, "--stream", help="--serve --route chat: stream the answers and "
                                      "report the time to their first content."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON report to this file."),
          recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
          as_json: bool = JsonOpt) -> None:
    """Measure retrieval: search per engine and batch, the batch-1 stage, recall@10, GPU memory; or
    load-test a running service with --serve URL."""
    from trtrag_cli.bench.run import plot as draw
    from trtrag_cli.bench.run import run_bench
    from trtrag_cli.util.files import write_json

    if serve is not None and from_json is None:
        report = _load_bench(serve, route, clients, duration, baseline_s, api_key, timeout, queries, recipe, set_,
                             stream)
        if out is not None:
            write_json(out, report)
        if as_json:
            emit_json(report)
        else:
            print_load(report)
        return
    if from_json is not None:
        try:
            report = json.loads(Path(from_json).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrtragError(f"cannot read bench report {from_json}: {exc}", "pass a file written by --out") from None
    else:
        at_least("--vectors", vectors, 0, "0 measures the workspace's index")
        at_least("--dim", dim, 0)
        at_least("--k", k, 1)
        at_least("--clients", clients, 1)
        at_least("--reps", reps, 0, "0 picks a count per batch size")
        at_least("--new-tokens", new_tokens, 1)
        kind_list = tuple(x.strip() for x in kinds.split(",") if x.strip())
        unknown = [x for x in kind_list if x not in INDEX_KINDS]
        if unknown:
            raise UsageError(f"unknown index kind(s) {', '.join(unknown)} in --kinds", "use ivf, ivfpq or hnsw")
        gen = {"prompt_lengths": list(int_list("--prompt-lengths", prompt_lengths, example="512,1024")),
               "batches": list(int_list("--gen-batch", gen_batch, example="1,8")), "new_tokens": new_tokens}
        cfg = load(recipe, set_)
        if batch is None:
            from trtrag_cli.util.gpu import gpu_count, torch_gpu_count

            batch = "1,32,1000" if gpu_count() or torch_gpu_count() else "1,32,256"
        sizes = int_list("--batch", batch)
        err = console(stderr=True)
        report = run_bench(cfg, vectors, dim, sizes, k, tuple(x for x in kind_list if x != "flat"), stage=stage,
                           clients=clients, queries_path=queries, reps=reps, search=search,
                           generation=gen if generate else None,
                           log=lambda m: err.print(m, markup=False, style="dim"))
    if out is not None:
        write_json(out, report)
    if plot is not None:
        draw(report, plot)
    if as_json:
        emit_json(report)
        return
    if report.get("schema", "").startswith("trtrag.bench.load"):
        print_load(report)
        return
    print_report(report)


def _load_bench(url, route, clients, duration, baseline_s, api_key, timeout, queries, recipe, set_,
                stream: bool = False) -> dict:
    """Parse the --serve options, pick the questions, run bench.load."""
    from trtrag_cli.bench.load import parse_routes, run_load
    from trtrag_cli.calibrate.run import read_queries

    at_least("--clients", clients, 1)
    if duration <= 0 or baseline_s < 0 or timeout <= 0:
        raise UsageError("--duration and --timeout must be positive, --baseline-s at least 0",
                         "e.g. --duration 30 --baseline-s 15")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--serve takes a URL, got '{url}'", "e.g. --serve http://127.0.0.1:8000")
    try:
        routes = parse_routes(route)
    except TrtragError as exc:
        raise UsageError(exc.message, exc.hint) from None
    if queries is not None:
        questions = read_queries(queries)
    else:
        source = Path(load(recipe, set_).calibrate.queries)
        questions = read_queries(source) if source.exists() else [
            "What is the warranty period?", "How do I reset the sensor?", "Which models support LoRaWAN?"]
    err = console(stderr=True)
    return run_load(url, routes, clients, duration, questions, api_key=api_key, baseline_s=baseline_s,
                    timeout_s=timeout, log=lambda m: err.print(m, markup=False, style="dim"), stream=stream)


def print_load(report: dict) -> None:
    """A load report as a table on stdout: per phase and route, q/s, latency percentiles, errors."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"load on {report['url']} ({report['questions']} questions)"))
    for col in ("phase", "route", "clients", "ok", "q/s", "P50 ms", "P90 ms", "P99 ms", "errors"):
        table.add_column(col, justify="left" if col in ("phase", "route", "errors") else "right")
    for phase in ("baseline", "load"):
        if phase not in report:
            continue
        p = report[phase]
        for name, r in p["routes"].items():
            lat = r["latency"] or {}
            errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
            table.add_row(phase, name, str(p["clients"]), str(r["ok"]), f"{r['qps']:.1f}",
                          *(f"{lat[k]:.1f}" if lat else "-" for k in ("p50_ms", "p90_ms", "p99_ms")), Text(errors))
    out = console()
    out.print(table)
    for phase in ("baseline", "load"):
        for name, r in (report.get(phase) or {}).get("routes", {}).items():
            if r.get("first_content"):
                f = r["first_content"]
                out.print(f"{phase} {name}: first streamed content P50 {f['p50_ms']:.1f} ms, P90 {f['p90_ms']:.1f} ms, "
                          f"P99 {f['p99_ms']:.1f} ms", markup=False)
    for name, ratio in (report.get("ratio") or {}).items():
        if ratio:
            out.print(f"{name}: {report['load']['clients']} clients / 1 client: {ratio['qps']}x q/s, "
                      f"P50 {ratio['p50_ms']}x, P99 {ratio['p99_ms']}x latency", markup=False)


def print_report(report: dict) -> None:
    """The bench report as tables on stdout: search, generation, retrieval stage."""
    from rich.table import Table
    from rich.text import Text

    out = console()
    data, where = report.get("data", {}), report.get("machine", {})
    if report.get("search"):
        table = Table(title=Text(f"search: {data.get('vectors')} x {data.get('dim')} ({data.get('kind')}) on "
                                 f"{where.get('cuda_device') or where.get('cpu')}"))
        for col in ("engine", "batch", "P50 ms", "P90 ms", "P99 ms", "q/s", "R@10", "reranked", "GPU MiB"):
            table.add_column(col, justify="left" if col == "engine" else "right", no_wrap=col == "engine")
        for r in report["search"]:
            table.add_row(Text(r["engine"]), str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                          f"{r['p99_ms']:.3f}", f"{r['qps']:.0f}", f"{r['recall@10']:.3f}",
                          f"{r['recall@10_reranked']:.3f}", str(r.get("gpu_memory_mib", "-")))
        out.print(table)
    gen = report.get("generation")
    if gen:
        table = Table(title=Text(f"generation: {gen['generator']}, {gen['new_tokens']} new tokens"))
        for col in ("measure", "size", "value"):
            table.add_column(col, justify="left" if col == "measure" else "right")
        for n, v in gen["ttft_ms"].items():
            table.add_row("TTFT ms", f"{n} tokens", str(v))
        for b, v in gen["decode_tok_s"].items():
            table.add_row("decode tok/s", f"batch {b}", str(v))
        out.print(table)
    stage = report.get("stage")
    if stage:
        how = "the pipeline's path" if stage.get("path") == "pipeline" else stage.get("path", "dense")
        table = Table(title=Text(f"retrieval stage, one caller: {stage.get('mode', 'dense')} ({how}), "
                                 f"{stage['encoder']} + {stage['search_engine']} (top {stage['top_n']} -> "
                                 f"{stage['top_k']})"))
        for col in ("stage", "P50 ms", "P90 ms", "P99 ms"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for name, v in stage["batch1"].items():
            table.add_row(name, f"{v['p50_ms']:.3f}", f"{v['p90_ms']:.3f}", f"{v['p99_ms']:.3f}")
        out.print(table)
        c = stage["concurrent"]
        speedup = f" ({c['speedup']}x one caller)" if c.get("speedup") else ""
        out.print(f"{c['clients']} concurrent callers: {c['qps']:.0f} q/s{speedup}, P50 {c['latency']['p50_ms']:.2f} ms, "
                  f"P99 {c['latency']['p99_ms']:.2f} ms, mean batch {c['mean_batch']} (max {c['max_batch']}, "
                  f"wait {c['max_wait_ms']} ms)", markup=False)
