"""Recipes are typed and strict: errors name the file, the line (or --set), the dotted path and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trtrag_cli.recipe.schema import (ENCODER_PRECISIONS, Recipe, dump_recipe, load_recipe, parse_overrides)
from trtrag_cli.util.errors import TrtragError


def _fails(tmp_path: Path, text: str, overrides: list[str] | None = None) -> TrtragError:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(TrtragError) as exc:
        load_recipe(p, overrides)
    assert "\n" not in exc.value.message
    return exc.value


def test_default_recipe_loads_and_documents_every_key():
    r = load_recipe(Path("recipes/default.yaml"))
    assert r.retrieve.mode == "hybrid" and r.encoder.model == "all-MiniLM-L6-v2"
    assert r.workspace_dir().as_posix().endswith(".trtrag/default")
    assert r.answer.generator.backend == "extractive" and r.answer.sampling.seed == 0
    # Every key of every section appears in the file, as a setting or (for the alternatives) a comment.
    text = Path("recipes/default.yaml").read_text()
    schema = Recipe.model_json_schema()
    for name, section in schema["$defs"].items():
        for key in section.get("properties", {}):
            assert f"{key}:" in text, f"recipes/default.yaml does not document {name}.{key}"


def test_defaults_for_our_decode_runtime():
    gen = load_recipe(None, ["answer.generator.backend=transformers", "answer.generator.model=m"]).answer.generator
    assert gen.deterministic is True and gen.pack_weights is False
    assert "0.75x" in type(gen).model_fields["pack_weights"].description


def test_unknown_key_names_file_line_and_nearest(tmp_path):
    err = _fails(tmp_path, "name: x\nretrieve:\n  top_k: 3\n  top_nn: 50\n")
    assert f"{tmp_path / 'r.yaml'}:4" in err.message and "unknown recipe key 'retrieve.top_nn'" in err.message
    assert err.hint == "did you mean 'top_n'?"


def test_unknown_section_suggests_nearest(tmp_path):
    err = _fails(tmp_path, "retreive:\n  top_k: 3\n")
    assert ":1:" in err.message and "'retrieve'" in err.hint


def test_wrong_type_names_path_line_and_expected_type(tmp_path):
    err = _fails(tmp_path, "index:\n  kind: flat\n  nprobe: many\n")
    assert f"{tmp_path / 'r.yaml'}:3: index.nprobe: expected an integer, got str 'many'" == err.message
    err = _fails(tmp_path, "retrieve:\n  top_k: '5'\n")  # strict: a quoted number is a string
    assert "retrieve.top_k: expected an integer" in err.message
    err = _fails(tmp_path, "index:\n  fp16: 1\n")
    assert "index.fp16: expected true or false" in err.message


def test_literal_choices_are_listed(tmp_path):
    err = _fails(tmp_path, "index:\n  kind: annoy\n")
    assert "index.kind: expected one of 'flat', 'ivf', 'ivfpq' or 'hnsw', got 'annoy'" in err.message


@pytest.mark.parametrize("override, words", [
    ("retrieve.top_k=0", "retrieve.top_k must be greater than or equal to 1"),
    ("retrieve.top_k=200", "retrieve.top_n (100) must be at least retrieve.top_k (200)"),
    ("chunking.overlap=300", "chunking.overlap (300) must be smaller than chunking.max_tokens (200)"),
    ("calibrate.batch_size=512", "calibrate.batch_size must be greater than or equal to 1024"),
    ("calibrate.min_iterations=20", "calibrate.min_iterations (20) exceeds calibrate.max_iterations (10)"),
    ("engine.opt_batch=1000", "min <= opt <= max"),
    ("answer.sampling.top_p=0", "answer.sampling.top_p must be greater than 0"),
    ("answer.sampling.seed=-1", "answer.sampling.seed must be greater than or equal to 0"),
    ("index.pq_bits=32", "index.pq_bits must be less than or equal to 16"),
    ("name=../escape", "not a plain folder name"),
])
def test_bounds_are_checked_where_they_are_declared(override, words):
    with pytest.raises(TrtragError) as exc:
        load_recipe(None, [override])
    assert words in exc.value.message and exc.value.message.startswith("--set: ")


def test_a_bound_error_hints_what_the_field_does():
    with pytest.raises(TrtragError) as exc:
        load_recipe(None, ["answer.sampling.seed=-1"])
    assert "null = a fresh seed" in exc.value.hint  # the old -1 sentinel is now null


def test_nulls_replace_sentinels():
    r = load_recipe(None, ["answer.sampling.seed=null", "index.pq_m=null", "encoder.threads=4"])
    assert r.answer.sampling.seed is None and r.index.pq_m is None and r.encoder.threads == 4
    with pytest.raises(TrtragError, match="index.gpus must be greater than or equal to 1"):
        load_recipe(None, ["index.gpus=0"])


def test_generator_union_rejects_a_key_of_another_backend(tmp_path):
    err = _fails(tmp_path, "answer:\n  generator:\n    backend: transformers\n    model: m\n"
                           "    base_urls: [http://127.0.0.1:8000/v1]\n")
    assert f"{tmp_path / 'r.yaml'}:5: unknown recipe key 'answer.generator.base_urls'" == err.message
    assert "setting of the openai generator" in err.hint and "backend is transformers" in err.hint
    err = _fails(tmp_path, "answer:\n  generator:\n    backend: openai\n    model: m\n    base_urls: [u]\n"
                           "    pack_weights: true\n")
    assert "'answer.generator.pack_weights'" in err.message and "transformers generator" in err.hint


def test_generator_union_needs_a_known_backend_and_its_required_keys(tmp_path):
    err = _fails(tmp_path, "answer:\n  generator:\n    backend: vllm\n")
    assert ":3: answer.generator.backend: expected one of 'extractive', 'transformers'" in err.message
    err = _fails(tmp_path, "answer:\n  generator:\n    model: m\n")
    assert ":2: answer.generator needs a backend" in err.message and "transformers" in err.hint
    err = _fails(tmp_path, "answer:\n  generator:\n    backend: openai\n    model: m\n")
    assert ":2: answer.generator.base_urls is required here" in err.message
    err = _fails(tmp_path, "answer:\n  generator: transformers\n")  # the old flat key
    assert "answer.generator: expected a mapping of settings" in err.message and "backend:" in err.hint


def test_encoder_backend_specific_keys_are_validated():
    with pytest.raises(TrtragError, match="the torch encoder has no int8 engine"):
        load_recipe(None, ["encoder.backend=torch", "encoder.precision=int8"])
    with pytest.raises(TrtragError, match="the tensorrt encoder does not use it"):
        load_recipe(None, ["encoder.backend=tensorrt", "encoder.threads=4"])
    assert load_recipe(None, ["encoder.precision=int8"]).encoder.backend == "auto"  # auto resolves later


def test_encoder_precision_table_matches_the_backends():
    """The recipe layer sits below encode and keeps its own copy for validation; the two must agree."""
    from trtrag_cli.encode.registry import PRECISIONS

    assert set(ENCODER_PRECISIONS) == set(PRECISIONS)
    for backend, offered in PRECISIONS.items():
        assert set(ENCODER_PRECISIONS[backend]) == set(offered), backend


def test_overrides_are_yaml_scalars_checked_like_the_file(tmp_path):
    r = load_recipe(None, ["retrieve.top_k=9", "retrieve.dense_weight=1", "index.kind=hnsw",
                           "answer.sampling.stop=[END, '###']", "calibrate.eval="])
    assert r.retrieve.top_k == 9 and r.retrieve.dense_weight == 1.0 and r.index.kind == "hnsw"
    assert r.answer.sampling.stop == ["END", "###"] and r.calibrate.eval == ""
    with pytest.raises(TrtragError, match="^--set: retrieve.top_k: expected an integer"):
        load_recipe(None, ["retrieve.top_k=nine"])
    with pytest.raises(TrtragError, match="unknown recipe key 'retrieve.topk'") as exc:
        load_recipe(None, ["retrieve.topk=3"])
    assert exc.value.hint == "did you mean 'top_k'?"
    with pytest.raises(TrtragError, match="key.path=value"):
        parse_overrides(["retrieve.top_k"])
    # Switching the generator by --set: the file's extractive section takes the new backend's keys.
    p = tmp_path / "r.yaml"
    p.write_text("answer:\n  generator:\n    backend: extractive\n")
    r = load_recipe(p, ["answer.generator.backend=transformers", "answer.generator.model=m",
                        "answer.generator.device=cpu"])
    assert (r.answer.generator.backend, r.answer.generator.device) == ("transformers", "cpu")
    with pytest.raises(TrtragError, match="^--set: answer.generator.model is required"):
        load_recipe(p, ["answer.generator.backend=transformers"])


def test_fields_set_tell_explicit_values_from_defaults(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("encoder:\n  backend: auto\n")
    r = load_recipe(p)
    assert "precision" not in r.encoder.model_fields_set and "backend" in r.encoder.model_fields_set
    assert "precision" in load_recipe(p, ["encoder.precision=fp32"]).encoder.model_fields_set


def test_malformed_yaml_is_one_line(tmp_path):
    err = _fails(tmp_path, "retrieve:\n  top_k: [1, 2\n  mode: dense\n")
    assert "malformed YAML" in err.message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(TrtragError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path):
    r = load_recipe(None, ["answer.generator.backend=openai", "answer.generator.model=m",
                           "answer.generator.base_urls=[http://h:1/v1]", "answer.sampling.seed=null"])
    p = tmp_path / "dumped.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p).to_dict() == r.to_dict()


def test_recipe_show_and_schema(cli, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: shown\nretrieve:\n  top_k: 7\n")
    shown = yaml.safe_load(cli("recipe", "show", "--recipe", p, "--set", "answer.sampling.seed=null").stdout)
    assert shown["name"] == "shown" and shown["retrieve"]["top_k"] == 7 and shown["answer"]["sampling"]["seed"] is None
    assert shown["encoder"]["precision"] == "fp32"  # the resolved recipe: defaults filled in
    as_json = json.loads(cli("recipe", "show", "--recipe", p, "--json").stdout)
    assert as_json["retrieve"] == shown["retrieve"]
    bad = cli("recipe", "show", "--recipe", p, "--set", "retrieve.top_kk=3", ok=False)
    assert bad.exit_code == 1 and "did you mean 'top_k'?" in bad.output
    schema = json.loads(cli("recipe", "schema").stdout)
    assert schema["additionalProperties"] is False and "answer" in schema["properties"]
    generator = schema["$defs"]["AnswerConfig"]["properties"]["generator"]
    assert generator["discriminator"]["propertyName"] == "backend" and len(generator["oneOf"]) == 4
    assert "0.2%" in schema["$defs"]["TransformersGenerator"]["properties"]["deterministic"]["description"]
