"""Recipes are typed and strict: errors name the file, the line and the fix."""

from __future__ import annotations

import pytest

from trtrag_cli.recipe.schema import load_recipe, parse_overrides
from trtrag_cli.util.errors import TrtragError


def test_default_recipe_loads():
    r = load_recipe(__import__("pathlib").Path("recipes/default.yaml"))
    assert r.retrieve.mode == "hybrid" and r.encoder.model == "all-MiniLM-L6-v2"
    assert r.workspace_dir().as_posix().endswith(".trtrag/default")


def test_unknown_key_names_file_line_and_nearest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nretrieve:\n  top_k: 3\n  top_nn: 50\n")
    with pytest.raises(TrtragError) as exc:
        load_recipe(p)
    assert f"{p}:4" in exc.value.message and "retrieve.top_nn" in exc.value.message
    assert "top_n" in exc.value.hint


def test_unknown_section_suggests_nearest(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("retreive:\n  top_k: 3\n")
    with pytest.raises(TrtragError) as exc:
        load_recipe(p)
    assert ":1" in exc.value.message and "'retrieve'" in exc.value.hint


def test_wrong_type_names_path_and_expected_type(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("index:\n  kind: flat\n  nprobe: many\n")
    with pytest.raises(TrtragError) as exc:
        load_recipe(p)
    assert "index.nprobe" in exc.value.message and "expected an integer" in exc.value.message
    assert f"{p}:3" in exc.value.message


def test_literal_choices_are_listed(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("index:\n  kind: annoy\n")
    with pytest.raises(TrtragError, match="one of 'flat', 'ivf', 'ivfpq', 'hnsw'"):
        load_recipe(p)


def test_malformed_yaml_is_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("retrieve:\n  top_k: [1, 2\n  mode: dense\n")
    with pytest.raises(TrtragError) as exc:
        load_recipe(p)
    assert "malformed YAML" in exc.value.message and "\n" not in exc.value.message


def test_overrides_are_typed_and_checked(tmp_path):
    r = load_recipe(None, ["retrieve.top_k=9", "retrieve.dense_weight=1", "index.kind=hnsw"])
    assert r.retrieve.top_k == 9 and r.retrieve.dense_weight == 1.0 and r.index.kind == "hnsw"
    with pytest.raises(TrtragError, match="expected an integer"):
        load_recipe(None, ["retrieve.top_k=nine"])
    with pytest.raises(TrtragError, match="unknown recipe key 'retrieve.topk'"):
        load_recipe(None, ["retrieve.topk=3"])
    with pytest.raises(TrtragError, match="key.path=value"):
        parse_overrides(["retrieve.top_k"])


def test_bounds_are_checked():
    with pytest.raises(TrtragError, match="overlap"):
        load_recipe(None, ["chunking.overlap=300"])
    with pytest.raises(TrtragError, match="must be positive"):
        load_recipe(None, ["retrieve.top_n=0"])
    with pytest.raises(TrtragError, match="plain folder name"):
        load_recipe(None, ["name=../escape"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(TrtragError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
