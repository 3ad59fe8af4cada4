"""benchmarks/scale.py at 2,000 chunks: it runs end to end and its JSON has every figure (no timings checked)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def test_scale_script_small(tmp_path):
    spec = importlib.util.spec_from_file_location("scale_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "scale.json"
    mod.main(["--chunks", "2000", "--files", "20", "--questions", "20", "--dir", str(tmp_path),
              "--out", str(out)])
    res = json.loads(out.read_text())
    assert {"chunks", "vector_bytes", "generate", "encoder_export", "index_full", "serve", "index_1pct",
            "targets"} <= set(res)
    assert res["index_full"]["report"]["counts"]["chunks_with_embeddings"] == 2000
    assert {"wall_s", "peak_rss_mb", "disk_mb"} <= set(res["index_full"])
    assert {"rss_open_mb", "rss_after_mb", "ask_ms"} <= set(res["serve"])
    assert {"p50", "p90", "p99"} <= set(res["serve"]["ask_ms"])
    assert res["serve"]["questions"] == 20
    assert res["index_1pct"]["files_changed"] == 1
    assert res["index_1pct"]["report"]["counts"]["files_changed"] == 1
    assert set(res["targets"]) == {"serve_rss", "ask_p50", "reindex_1pct"}
