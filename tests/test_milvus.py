"""index.backend: milvus with Milvus Lite in a temporary folder: index, incremental update and delete by
chunk id, ask, eval against the faiss backend, the chain check, doctor and the recipe's per-backend rules.
Real encoder, real Milvus Lite; no mocks."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from conftest import EXAMPLES, ROOT, Cli

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'trtrag[milvus]')")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install 'trtrag[milvus]')")

from trtrag_cli.recipe.schema import load_recipe  # noqa: E402

QUERIES = ROOT / "examples" / "queries.jsonl"
MODES = ("bm25", "dense", "rrf", "hybrid")
MILVUS = {"backend": "milvus"}


def _recipe(folder, name: str, **index) -> str:
    data = yaml.safe_load((ROOT / "recipes" / "default.yaml").read_text())
    data.update(name=name, workspace=str(folder / "ws"))
    data["index"].update(index)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _one_line_error(result) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in result.output and err.startswith("error:") and "\n" not in err, result.output
    return err


def _recall(report: dict) -> dict:
    return {m: report["modes"][m]["metrics"]["recall@10"] for m in MODES}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The example corpus indexed once with each backend (recipes in one folder, one workspace)."""
    tmp = tmp_path_factory.mktemp("milvus")
    faiss, milvus = _recipe(tmp, "flat"), _recipe(tmp, "mv", **MILVUS)
    reports = {name: Cli().json("index", EXAMPLES, "--recipe", path) for name, path in
               (("faiss", faiss), ("milvus", milvus))}
    return {"faiss": faiss, "milvus": milvus, "reports": reports}


def test_index_fills_the_collection_and_records_it(both):
    report = both["reports"]["milvus"]
    info = report["milvus"]
    assert info["rebuilt"] and info["index_type"] == "HNSW" and info["collection"] == "trtrag_mv"
    assert info["rows"] == info["upserted"] == report["counts"]["chunks_total"] > 0
    recipe = load_recipe(both["milvus"])
    gen = recipe.workspace_dir() / "index"
    assert (recipe.workspace_dir() / "milvus.db").exists()
    current = next(p for p in gen.iterdir() if p.name.startswith("gen-"))
    assert not (current / "vectors.faiss").exists()  # the collection holds the vectors that are searched
    manifest = json.loads((current / "manifest.json").read_text())
    assert manifest["index"]["backend"] == "milvus" and manifest["milvus"]["sync"] == info["sync"]


def test_eval_recall_matches_the_faiss_backend(both, capsys):
    cli = Cli()
    got = {b: _recall(cli.json("eval", "--queries", QUERIES, "--modes", ",".join(MODES), "--recipe", both[b]))
           for b in ("faiss", "milvus")}
    with capsys.disabled():
        print(f"\nrecall@10 on examples/queries.jsonl: {got}")
    assert abs(got["milvus"]["hybrid"] - got["faiss"]["hybrid"]) <= 0.02
    for mode in MODES:
        assert abs(got["milvus"][mode] - got["faiss"][mode]) <= 0.05, (mode, got)


def test_ask_and_doctor(both):
    cli = Cli()
    res = cli.json("ask", "what does DevEUI mean", "--recipe", both["milvus"])
    assert res["passages"][0]["source"] == "gloss-001" and "DevEUI" in res["answer"]
    assert res["search_backend"].startswith("milvus lite: HNSW")
    doc = cli.json("doctor", "--recipe", both["milvus"])
    stages = doc.get("stages", doc)
    assert stages["index"]["ok"] and stages["index"]["milvus"]["rows"] == both["reports"]["milvus"]["counts"][
        "chunks_total"]
    assert stages["vector_index"]["backend"] == "milvus lite" and stages["lexical"]["backend"] == "milvus BM25"


def test_backend_mismatch_is_one_line(both):
    result = Cli()("ask", "what does DevEUI mean", "--recipe", both["milvus"], "--set", "index.backend=faiss",
                   ok=False)
    err = _one_line_error(result)
    assert "built with index.backend milvus" in err and "index.backend: milvus" in err


def test_incremental_update_and_delete_by_chunk_id(tmp_path, corpus_copy):
    cli = Cli()
    recipe = _recipe(tmp_path, "inc", **MILVUS)
    cli.json("index", corpus_copy, "--recipe", recipe)
    again = cli.json("index", corpus_copy, "--recipe", recipe)
    assert again["counts"]["chunks_embedded"] == 0
    assert (again["milvus"]["rebuilt"], again["milvus"]["upserted"], again["milvus"]["deleted"]) == (False, 0, 0)

    changed = corpus_copy / "products" / "th50-environment-sensor.md"
    changed.write_text(changed.read_text() + "\n\nThe TH-50 ships in a teal recyclable box since May 2025.\n")
    upd = cli.json("index", corpus_copy, "--recipe", recipe)
    c, m = upd["counts"], upd["milvus"]
    assert (c["files_changed"], c["files_added"], c["files_removed"]) == (1, 0, 0) and not m["rebuilt"]
    # only the changed file's touched chunk(s) are embedded, and exactly those are upserted
    assert 1 <= c["chunks_embedded"] <= 4 and m["upserted"] == c["chunks_embedded"]
    assert m["rows"] == c["chunks_total"] and m["deleted"] == 0  # the edit added text: ids stay, rows replaced
    res = cli.json("ask", "What colour is the TH-50 box?", "--recipe", recipe)
    assert res["passages"][0]["source"] == "products/th50-environment-sensor.md" and "teal" in res["answer"]

    gone = "internal/memo-2025-04-hq-relocation.txt"
    (corpus_copy / gone).unlink()
    rem = cli.json("index", corpus_copy, "--recipe", recipe)
    assert rem["counts"]["files_removed"] == 1 and rem["counts"]["chunks_embedded"] == 0
    assert rem["milvus"]["deleted"] == rem["counts"]["chunks_dropped"] >= 1 and rem["milvus"]["upserted"] == 0
    assert rem["milvus"]["rows"] == rem["counts"]["chunks_total"]
    for mode in ("bm25", "dense"):
        res = cli.json("ask", "When does the headquarters move to Fife?", "--top-k", "50", "--mode", mode,
                       "--recipe", recipe)
        assert gone not in {p["source"] for p in res["passages"]}


def _tiny_corpus(folder):
    folder.mkdir()
    (folder / "a.md").write_text("# Alpha\nThe alpha relay switches pumps at night.\n")
    (folder / "b.md").write_text("# Beta\nThe beta gateway forwards LoRaWAN frames.\n")
    return folder


def test_chain_check_refuses_a_collection_of_another_encoder(tmp_path):
    from trtrag_cli.index.milvus import MilvusIndex

    cli = Cli()
    recipe = _recipe(tmp_path, "chain", **MILVUS)
    cli.json("index", _tiny_corpus(tmp_path / "c"), "--recipe", recipe)
    r = load_recipe(recipe)
    with MilvusIndex(r.index, r.workspace_dir(), r.name) as mv:
        mv.client.alter_collection_properties(mv.name, properties={"trtrag.encoder": "torch-fp16/other-model"})
    err = _one_line_error(cli("ask", "alpha relay", "--recipe", recipe, ok=False))
    assert "holds vectors of encoder torch-fp16/other-model" in err and "re-index: trtrag index" in err
    # the next `trtrag index` sees the collection out of step and rebuilds it rather than editing it
    rebuilt = cli.json("index", tmp_path / "c", "--recipe", recipe)
    assert rebuilt["milvus"]["rebuilt"] and any("collection rebuilt" in n for n in rebuilt["notes"])
    assert cli.json("ask", "alpha relay", "--recipe", recipe)["passages"][0]["source"] == "a.md"


def test_a_collection_written_by_another_workspace_is_refused(tmp_path):
    cli = Cli()
    corpus = _tiny_corpus(tmp_path / "c")
    db = str(tmp_path / "shared.db")
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
    one, two = (_recipe(tmp_path / sub, "same", backend="milvus", uri=db) for sub in ("one", "two"))
    cli.json("index", corpus, "--recipe", one)
    cli.json("index", corpus, "--recipe", two)
    err = _one_line_error(cli("ask", "alpha relay", "--recipe", one, ok=False))
    assert "was changed by another index run" in err and "index.collection" in err


def test_recipe_rules_per_backend(tmp_path):
    cli = Cli()
    err = _one_line_error(cli("index", EXAMPLES, "--set", f"workspace={tmp_path}", "--set", "index.backend=milvus",
                              "--set", "index.milvus_index=GPU_CAGRA", ok=False))
    assert "GPU_CAGRA needs a Milvus server with GPUs" in err and "http://<host>:19530" in err
    err = _one_line_error(cli("index", EXAMPLES, "--set", f"workspace={tmp_path}", "--set", "index.uri=x.db",
                              ok=False))
    assert "index.uri applies to index.backend: milvus" in err
    err = _one_line_error(cli("index", EXAMPLES, "--set", f"workspace={tmp_path}", "--set", "index.backend=milvus",
                              "--set", "index.uri=folder/store", ok=False))
    assert "ends in .db" in err


def test_missing_pymilvus_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # hides the package: importing it raises ImportError
    err = _one_line_error(Cli()("index", _tiny_corpus(tmp_path / "c"), "--set", f"workspace={tmp_path}",
                                "--set", "index.backend=milvus", ok=False))
    assert "pymilvus is not installed" in err and "trtrag[milvus]" in err
