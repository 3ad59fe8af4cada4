"""`trtrag bench` on the CPU: real faiss, the real encoder, a real PNG; the JSON is stable for scripts."""

from __future__ import annotations

import http.server
import json
import threading
import time

import numpy as np
import pytest

from trtrag_cli.bench.run import SCHEMA, clustered, exact_truth, recall_at
from trtrag_cli.util.timing import ms_percentiles


def test_synthetic_bench_reports_every_engine_stage_and_recall(cli, make_recipe, tmp_path):
    recipe = make_recipe()
    png, saved = tmp_path / "bench.png", tmp_path / "bench.json"
    report = cli.json("bench", "--vectors", "4000", "--dim", "384", "--batch", "1,16", "--kinds", "ivf,ivfpq",
                      "--clients", "3", "--reps", "20", "--plot", png, "--out", saved, "--recipe", recipe,
                      "--set", "index.nprobe=8")
    assert report["schema"] == SCHEMA and report["data"]["vectors"] == 4000
    engines = {r["engine"] for r in report["search"]}
    assert {"cpu faiss flat", "cpu faiss ivf nprobe=8", "cpu faiss ivfpq nprobe=8"} <= engines
    assert {(r["engine"], r["batch"]) for r in report["search"]} == {(e, b) for e in engines for b in (1, 16)}
    for r in report["search"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["qps"] > 0
        assert 0.0 <= r["recall@10"] <= 1.0
        # An exact re-score can only help, up to float ties between two fp32 dot-product orders.
        assert r["recall@10_reranked"] >= r["recall@10"] - 2e-3
        if r["kind"] == "flat":
            assert r["recall@10"] == 1.0  # exact search is its own truth
    ivf = next(r for r in report["search"] if r["kind"] == "ivf")
    assert ivf["recall@10"] > 0.5 and ivf["nprobe"] == 8
    stage = report["stage"]
    assert stage["mode"] == "dense" and stage["path"].startswith("synthetic")  # no texts for BM25
    assert set(stage["batch1"]) == {"encode", "search", "rerank", "total"}
    assert stage["batch1"]["total"]["p50_ms"] >= stage["batch1"]["encode"]["p50_ms"]
    assert stage["batch1"]["total"]["n"] == 20
    assert stage["concurrent"]["queries"] >= 30 and stage["concurrent"]["qps"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(saved.read_text()) == report
    # A saved report re-plots without measuring again.
    again = tmp_path / "again.png"
    assert cli.json("bench", "--from-json", saved, "--plot", again)["search"] == report["search"]
    assert again.stat().st_size > 1000


def test_bench_on_the_workspace_index_uses_its_vectors_and_the_recipe_queries(cli, make_recipe, corpus_copy):
    recipe = make_recipe()
    cli("index", corpus_copy, "--recipe", recipe)
    report = cli.json("bench", "--batch", "1,4", "--kinds", "", "--clients", "2", "--reps", "10", "--recipe", recipe)
    assert report["data"]["kind"] == "workspace index" and report["data"]["dim"] == 384
    assert report["data"]["vectors"] > 50  # chunks of the 50 example documents
    assert [r["engine"] for r in report["search"]] == ["cpu faiss flat"] * 2
    stage = report["stage"]
    assert stage["encoder"].startswith("onnxruntime-fp32/")
    # The stage is what ask and serve run: the recipe's mode through the pipeline's batch worker.
    assert stage["mode"] == "hybrid" and stage["path"] == "pipeline" and stage["search_engine"] == "cpu: exact over memory-mapped vectors"
    assert set(stage["batch1"]) == {"queue", "encode", "search", "rerank", "total"}
    assert stage["batch1"]["total"]["n"] == 10
    c = stage["concurrent"]
    assert c["clients"] == 2 and c["queries"] == 2 * 20 and c["batches"] >= 1 and c["speedup"] > 0
    assert c["max_batch"] == 32 and c["max_wait_ms"] == 2.0  # the recipe's serve.retrieve_* settings
    dense = cli.json("bench", "--batch", "1", "--kinds", "", "--clients", "2", "--reps", "5", "--recipe", recipe,
                     "--set", "retrieve.mode=dense", "--set", "serve.retrieve_max_batch=4")
    assert dense["stage"]["mode"] == "dense" and dense["stage"]["concurrent"]["max_batch"] == 4


def test_bench_refuses_a_dimension_the_encoder_cannot_make(cli, make_recipe):
    out = cli("bench", "--vectors", "500", "--dim", "64", "--batch", "1", "--kinds", "", "--recipe", make_recipe(),
              ok=False)
    assert "makes 384-d vectors" in out.output and "--dim 384" in out.output


def test_bench_rejects_bad_options(cli, make_recipe):
    assert "comma-separated" in cli("bench", "--vectors", "100", "--dim", "8", "--batch", "1,x", ok=False).output
    assert "unknown index kind" in cli("bench", "--vectors", "100", "--dim", "8", "--kinds", "annoy", ok=False).output
    assert "needs --dim" in cli("bench", "--vectors", "100", "--no-stage", "--recipe", make_recipe(), ok=False).output


def test_helpers_measure_what_they_say():
    x, q = clustered(2000, 32, 50, seed=1)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    truth = exact_truth(x, q, 10)
    assert recall_at(truth, truth) == 1.0
    assert recall_at(truth[:, ::-1], truth) == 1.0  # order inside the top 10 does not matter
    assert recall_at(np.roll(truth, 1, axis=0), truth) < 0.5
    p = ms_percentiles([0.001] * 98 + [0.010, 0.020])
    assert p["p50_ms"] == 1.0 and p["p99_ms"] > 9.0 and p["n"] == 100


# ------------------------------------------------------------------------------- load on a service

class _TinyService(http.server.BaseHTTPRequestHandler):
    """/v1/ask, /v1/retrieve and /v1/chat/completions shaped answers; every 7th request gets 503."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the real service
    FIELDS = {"/v1/ask": "question", "/v1/retrieve": "query", "/v1/chat/completions": "messages"}

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.seen.append((self.path, self.headers.get("Authorization")))
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            n = len(srv.seen)
        time.sleep(0.005)  # some work, so that clients overlap
        field = self.FIELDS.get(self.path)
        status = 404 if field is None else 400 if field not in body else 503 if n % 7 == 0 else 200
        reply = json.dumps({"answer": "It is [1].", "passages": []} if status == 200 else {"error": status}).encode()
        with srv.lock:
            srv.in_flight -= 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def tiny_service():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TinyService)
    server.lock, server.seen, server.in_flight, server.max_in_flight = threading.Lock(), [], 0, 0
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_load_bench_reports_each_route_against_one_client(cli, tiny_service, tmp_path):
    server, url = tiny_service
    questions = tmp_path / "q.txt"
    questions.write_text("What is the warranty?\nHow do I reset it?\n")
    saved = tmp_path / "load.json"
    report = cli.json("bench", "--serve", url, "--clients", "4", "--duration", "1", "--baseline-s", "0.5",
                      "--route", "ask,retrieve,chat", "--api-key", "sekrit", "--queries", questions, "--out", saved)
    assert report["schema"] == "trtrag.bench.load/1" and json.loads(saved.read_text()) == report
    assert report["baseline"]["clients"] == 1 and report["load"]["clients"] == 4
    for phase in ("baseline", "load"):
        for route in ("ask", "retrieve", "chat"):
            r = report[phase]["routes"][route]
            assert r["ok"] > 0 and r["latency"]["p50_ms"] <= r["latency"]["p90_ms"] <= r["latency"]["p99_ms"]
            assert set(r["errors"]) <= {"http 503"} and r["requests"] == r["ok"] + sum(r["errors"].values())
    errors = sum(r["errors"].get("http 503", 0) for p in ("baseline", "load") for r in report[p]["routes"].values())
    assert errors == len(server.seen) // 7  # every 7th request the server saw (the probe is the 1st)
    assert set(report["ratio"]) == {"ask", "retrieve", "chat"} and report["ratio"]["ask"]["qps"] > 0
    assert {path for path, _ in server.seen} == {"/v1/ask", "/v1/retrieve", "/v1/chat/completions"}
    assert {auth for _, auth in server.seen} == {"Bearer sekrit"} and server.max_in_flight > 1
    # The table, and the saved report printed again.
    text = cli("bench", "--from-json", saved).stdout
    assert "load on" in text and "retrieve" in text and "clients / 1 client" in text


def test_load_bench_says_when_the_service_is_not_there(cli, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = cli("bench", "--serve", f"http://127.0.0.1:{port}", "--duration", "1", "--baseline-s", "0", ok=False)
    assert "cannot reach" in out.output and "connect" in out.output
    assert "unknown route" in cli("bench", "--serve", "http://x", "--route", "sing", ok=False).output
    assert "takes a URL" in cli("bench", "--serve", "localhost:8000", ok=False).output
