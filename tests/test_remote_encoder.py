"""The remote encoder (encoder.backend: openai) against real nodes on loopback.

The node is `trtrag serve` over the default recipe (ONNX Runtime encoder), which serves /v1/embeddings; a
second workspace indexes examples/corpus through it and must retrieve what the local encoder retrieves.
A small FastAPI app on loopback plays the broken nodes: one answering 8-dimensional vectors under the
same model name, one answering 503. A dead node is an unused port.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from conftest import EXAMPLES, ROOT, write_recipe
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from test_serve import _serve

from trtrag_cli.util.errors import TrtragError

MODEL = "all-MiniLM-L6-v2"
QUERIES = [json.loads(line)["query"] for line in (ROOT / "examples" / "queries.jsonl").read_text().splitlines()
           if line.strip()][:6]


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """`trtrag serve` over the default recipe (local ONNX Runtime encoder); yields (its /v1, local recipe)."""
    folder = tmp_path_factory.mktemp("node")
    recipe = write_recipe(folder / "local.yaml", "local", folder / "ws", serve={"access_log": "off"})
    from conftest import Cli

    Cli().json("index", EXAMPLES, "--recipe", recipe)
    service, start = _serve(recipe)
    with start() as url:
        yield f"{url}/v1", recipe
    service.close()


@pytest.fixture(scope="module")
def broken():
    """A FastAPI app on loopback: /wrong/v1 answers 8-d vectors, /mixed/v1 384-d for one text and 8-d for
    more, /busy/v1 503; yields its base URL."""
    app = FastAPI()

    @app.post("/wrong/v1/embeddings")
    async def wrong(body: dict) -> dict:
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 0, "total_tokens": 0},
                "data": [{"object": "embedding", "index": i, "embedding": [0.5] * 8} for i in range(len(texts))]}

    @app.post("/mixed/v1/embeddings")
    async def mixed(body: dict) -> dict:  # 384-d for one text (the probe), 8-d for more
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        size = 384 if len(texts) == 1 else 8
        return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 0, "total_tokens": 0},
                "data": [{"object": "embedding", "index": i, "embedding": [0.5] * size} for i in range(len(texts))]}

    @app.post("/busy/v1/embeddings")
    async def busy(body: dict):
        return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def _remote_recipe(folder, base_url, name="remote", **encoder):
    return write_recipe(folder / f"{name}-{abs(hash(str(base_url))) % 10**8}.yaml", name, folder / "ws",
                        encoder={"backend": "openai", "base_url": base_url, "model": MODEL, **encoder})


@pytest.fixture(scope="module")
def remote(node, tmp_path_factory):
    """A second workspace indexed through the node; (folder, recipe, index run report)."""
    url, _ = node
    folder = tmp_path_factory.mktemp("remote")
    recipe = _remote_recipe(folder, url, batch_size=16, concurrency=3)
    from conftest import Cli

    report = Cli().json("index", EXAMPLES, "--recipe", recipe)
    return folder, recipe, report


def _current(folder) -> str:
    return (folder / "ws" / "remote" / "index" / "CURRENT").read_text()


def _one_line_error(result) -> str:
    err = result.stderr.strip()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and err.startswith("error:") and "\n" not in err, result.output
    return err


def _top(cli, recipe, query) -> list[str]:
    return [p["id"] for p in cli.json("ask", query, "--recipe", recipe, "--top-k", "5")["passages"]]


def test_node_lists_the_served_encoder(node):
    import openai

    url, _ = node
    ids = [m.id for m in openai.OpenAI(base_url=url, api_key="x", max_retries=0).models.list().data]
    assert MODEL in ids


def test_remote_index_answers_as_the_local_encoder(node, remote, cli):
    _, local = node
    folder, recipe, _ = remote
    manifest = json.loads((folder / "ws" / "remote" / "index" / _current(folder).strip() / "manifest.json").read_text())
    assert manifest["encoder"]["name"] == f"openai/{MODEL}" and manifest["encoder"]["dim"] == 384
    assert manifest["encoder"]["backend"] == "openai"
    for query in QUERIES:
        assert _top(cli, recipe, query) == _top(cli, local, query), query


def test_batches_run_concurrently_and_keep_their_order(node):
    from trtrag_cli.encode.artifacts import open_recipe_encoder
    from trtrag_cli.encode.remote import RemoteEncoder
    from trtrag_cli.recipe.schema import load_recipe

    url, local = node
    texts = [f"sensor {i} " + "reading " * (i % 7) for i in range(23)]
    seen = []
    with RemoteEncoder([url], MODEL, concurrency=4) as enc, open_recipe_encoder(load_recipe(local)) as ref:
        got = enc.encode(texts, batch_size=3, progress=seen.append)
        want = ref.encode(texts)
    assert got.shape == (23, 384) and seen[-1] == 23 and seen == sorted(seen)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert float((got * want).sum(1).min()) > 0.9999


def test_a_dead_node_is_one_line_and_keeps_the_index(remote, cli):
    folder, _, _ = remote
    before = _current(folder)
    dead = _dead_url()
    err = _one_line_error(cli("index", EXAMPLES, "--recipe", _remote_recipe(folder, dead), ok=False))
    assert "no embedding node answered" in err and dead in err and "encoder.base_url" in err
    assert _current(folder) == before
    err = _one_line_error(cli("ask", QUERIES[0], "--recipe", _remote_recipe(folder, dead), ok=False))
    assert dead in err


def test_a_node_with_another_dimension_is_refused(remote, broken, cli):
    folder, _, _ = remote
    before = _current(folder)
    wrong = f"{broken}/wrong/v1"
    for command in (("index", EXAMPLES), ("ask", QUERIES[0])):
        err = _one_line_error(cli(*command, "--recipe", _remote_recipe(folder, wrong), ok=False))
        assert "8-dimensional" in err and "384" in err and f"'{MODEL}'" in err, err
    assert _current(folder) == before


def test_failover_to_the_next_node(node, remote, broken, cli):
    url, _ = node
    folder, recipe, _ = remote
    want = _top(cli, recipe, QUERIES[1])
    for first in (_dead_url(), f"{broken}/busy/v1"):
        two = _remote_recipe(folder, [first, url])
        assert _top(cli, two, QUERIES[1]) == want
    doctor = cli.json("doctor", "--recipe", _remote_recipe(folder, [_dead_url(), url]))
    enc = doctor["stages"]["encoder"] if "stages" in doctor else doctor["encoder"]
    assert enc["ok"] and enc["backend"] == "openai" and enc["answering"] == url and enc["dim"] == 384


def test_a_node_changing_dimension_mid_run_is_refused(broken):
    from trtrag_cli.encode.remote import RemoteEncoder

    with RemoteEncoder([f"{broken}/mixed/v1"], MODEL) as enc:
        assert enc.dim == 384 and enc.name == f"openai/{MODEL}"
        with pytest.raises(TrtragError, match="answered 8-dimensional vectors .* opened with 384"):
            enc.encode(["one", "two", "three"], batch_size=2)
    with pytest.raises(TrtragError, match="answers 8-dimensional .* the index: 384"):
        RemoteEncoder([f"{broken}/wrong/v1"], MODEL, expect_dim=384, expect_why="the index")


def test_recipe_keys_of_the_remote_encoder():
    from trtrag_cli.recipe.schema import load_recipe

    with pytest.raises(TrtragError, match="needs encoder.base_url"):
        load_recipe(None, ["encoder.backend=openai"])
    with pytest.raises(TrtragError, match="applies to encoder.backend: openai"):
        load_recipe(None, ["encoder.base_url=http://127.0.0.1:8000/v1"])
    with pytest.raises(TrtragError, match="threads"):
        load_recipe(None, ["encoder.backend=openai", "encoder.base_url=http://x/v1", "encoder.threads=2"])
    r = load_recipe(None, ["encoder.backend=openai", "encoder.base_url=[http://a/v1, http://b/v1]"])
    assert r.encoder.base_urls() == ["http://a/v1", "http://b/v1"]


def test_chunk_tokens_need_a_local_tokenizer():
    from trtrag_cli.encode.models import chunk_tokenizer
    from trtrag_cli.recipe.schema import load_recipe

    unknown = ["encoder.backend=openai", "encoder.base_url=http://x/v1", "encoder.model=nvidia/nv-embedqa-e5-v5"]
    with pytest.raises(TrtragError, match="encoder.tokenizer"):
        chunk_tokenizer(load_recipe(None, unknown))
    assert chunk_tokenizer(load_recipe(None, [*unknown, f"encoder.tokenizer={MODEL}"])).encode("hello").ids
