"""`trtrag build-engine`: the encoder engine a backend runs, or the answer generator's preparation."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from trtrag_cli.cli.common import JsonOpt, RecipeOpt, SetOpt, command, console, emit_json, load
from trtrag_cli.cli.progress import Progress
from trtrag_cli.util.errors import UsageError


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

        report = build_generator(load(recipe, set_))
        if as_json:
            emit_json(report)
        else:
            _print_generator(report)
        return
    chosen = [name for name, on in (("int8", int8), ("fp16", fp16), ("fp32", fp32)) if on]
    if len(chosen) > 1:
        raise UsageError("choose one precision", "pass one of --int8, --fp16, --fp32")
    cfg = load(recipe, set_)
    precision = chosen[0] if chosen else cfg.encoder.precision
    with Progress(console(stderr=True)) as progress:
        progress.start("build", f"building the {precision} encoder engine (backend {backend})")

        def gate_step(event: dict) -> None:
            progress.log(f"gate: {event['gate']['kept_float']} float MatMuls, mean cosine "
                         f"{event['gate']['mean_cosine']:.4f}")

        manifest = run_build_engine(cfg, precision, backend, progress=gate_step)
    if as_json:
        emit_json(manifest)
        return
    out = console()
    picked = f" (auto picked {manifest['picked_by_auto']})" if "picked_by_auto" in manifest else ""
    out.print(f"built {manifest['backend']} {precision} engine{picked} in {manifest['build_seconds']} s: "
              f"{manifest['path']}", markup=False)
    for form, c in manifest.get("candidates", {}).items():
        out.print(f"  {form}: batch 1 {c['speed']['batch1_ms']} ms, batch 64 "
                  f"{c['speed']['batch64_ms_per_text']} ms/text, mean cosine {c['gate']['mean_cosine']:.4f}, "
                  f"gate {'passed' if c['passed'] else 'failed'}"
                  + (" <- chosen" if form == manifest.get("form") else ""), markup=False)


def _print_generator(report: dict) -> None:
    """One `key: value` line per entry of the generator report (nested values as compact JSON)."""
    import json

    out = console()
    for key, value in report.items():
        shown = value if isinstance(value, (str, int, float)) or value is None else json.dumps(value)
        out.print(f"{key}: {shown}", markup=False)
