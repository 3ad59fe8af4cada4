"""`trtrag calibrate`: INT8 ranges on domain queries, the Q/DQ model, the TensorRT cache and the accuracy gate."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import (JsonOpt, RecipeOpt, SetOpt, at_least, command, console, emit_json, load,
                                   print_warnings)
from trtrag_cli.cli.progress import Progress


@command
def calibrate(queries: Optional[Path] = typer.Option(None, "--queries", "-q", help="Domain queries: text (one "
                                                      "per line) or jsonl; default: the recipe's calibrate.queries."),
              method: Optional[str] = typer.Option(None, "--method", help="entropy, percentile or max "
                                                   "(calibrate.method)."),
              batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Queries per batch, at least "
                                                       "1024 (calibrate.batch_size)."),
              iterations: Optional[int] = typer.Option(None, "--iterations", help="Most batches to run "
                                                       "(calibrate.max_iterations; also caps min_iterations)."),
              eval_file: Optional[Path] = typer.Option(None, "--eval", help="queries.jsonl for the recall gate."),
              strict: bool = typer.Option(False, "--strict", help="Exit 1 when INT8 cannot meet the gate."),
              trt_version: Optional[str] = typer.Option(None, "--trt-version", help="Also write calibration.cache "
                                                        "for this TensorRT (<= 10, e.g. 10.16.1) on the target "
                                                        "machine; default: the TensorRT installed here, if any."),
              recipe: Optional[Path] = RecipeOpt, set_: Optional[List[str]] = SetOpt,
              as_json: bool = JsonOpt) -> None:
    """INT8 calibration on domain queries: ranges, Q/DQ ONNX, TensorRT cache, and the accuracy gate."""
    from trtrag_cli.calibrate.run import run_calibrate

    if iterations is not None:
        at_least("--iterations", iterations, 1)
    cfg = load(recipe, set_, {"calibrate.method": ("--method", method),
                              "calibrate.batch_size": ("--batch-size", batch_size)})
    err = console(stderr=True)
    total = iterations or cfg.calibrate.max_iterations
    with Progress(err) as progress:

        def report_event(event: dict) -> None:
            if "gate" in event:
                g = event["gate"]
                progress.log(f"gate: {g['kept_float']} MatMuls in float: mean cosine {g['mean_cosine']:.4f}"
                             + (f", recall@10 drop {g['recall@10_drop']:+.4f}" if "recall@10_drop" in g else ""))
                return
            drift = "-" if event["drift"] is None else f"{event['drift']:.2%}"
            progress.log(f"iteration {event['iteration']}/{total}: {event['queries']} queries, drift {drift}, "
                         f"{event['seconds']:.1f} s, peak RSS {event['peak_rss_mib']} MiB")
            progress.update("calibrate", event["iteration"], total, plain=False)

        report = run_calibrate(cfg, queries, None, None, iterations, strict, eval_file, report_event,
                               trt_version=trt_version)
    if as_json:
        emit_json(report)
        return
    out = console()
    g = report["gate"]
    final = g["final"]
    out.print(f"calibrated {report['sites']} MatMuls ({report['method']}) on {report['queries']['count']} "
              f"queries in {report['iterations']} batches of {report['queries']['batch_size']}; "
              f"{'stable' if report['stable'] else 'NOT stable'}; peak RSS {report['peak_rss_mib']} MiB", markup=False)
    out.print(f"gate {'passed' if g['passed'] else 'FAILED'}: mean cosine {final['mean_cosine']:.4f} "
              f"(min {final['min_cosine']:.4f})"
              + (f", top-10 overlap {final['top10_overlap']:.3f}" if "top10_overlap" in final else "")
              + (f", recall@10 {final['recall@10']:.3f} vs fp32 {final['recall@10_fp32']:.3f}"
                 if "recall@10" in final else "")
              + f"; {g['quantized']}/{g['total']} MatMuls INT8", markup=False)
    for name in g["kept_float"]:
        out.print(f"  kept in float: {name} (alone it lost {g['sensitivity'][name]:.5f} cosine)", markup=False)
    out.print(f"wrote {report['path']}", markup=False)
    cache = report.get("trt_cache") or {}
    if cache.get("file"):
        out.print(f"wrote {cache['file']} for TensorRT {cache['version']} ({cache['source']})", markup=False)
    elif cache.get("skipped"):
        err.print(f"note: no calibration.cache: {cache['skipped']}", markup=False)
    print_warnings(err, report["warnings"])
