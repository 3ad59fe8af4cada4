"""Typed, strict recipes: one YAML file drives every stage.

The sections are pydantic models (sections.py). Loading keeps what a hand-written schema gave users: an
unknown key or a wrong value names the file and line (or the --set override), the dotted path, and the
nearest valid key. `--set a.b=value` overrides are parsed as YAML scalars and checked the same way, and
`Recipe.model_fields_set` (on each section) tells what the file or an override set explicitly.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator

from trtrag_cli.recipe.sections import (  # noqa: F401  (re-exported: callers import sections from here)
    ENCODER_PRECISIONS, GENERATOR_BACKENDS, AnswerConfig, CalibrateConfig, ChunkingConfig, CorpusConfig, EncoderConfig,
    EngineConfig, ExtractiveGenerator, IndexConfig, LexicalConfig, OpenAIGenerator, RetrieveConfig, Sampling, ServeConfig,
    Section, TensorRTLLMGenerator, TransformersGenerator,
)
from trtrag_cli.util.errors import TrtragError

DEFAULT_RECIPE = Path("recipes/default.yaml")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Recipe(Section):
    name: str = Field("default", description=(
        "The recipe's name: its artifacts live in <workspace>/<name>/, so recipes can share a workspace."))
    workspace: str = Field(".trtrag", min_length=1, description="Folder for every artifact (index, engines, caches).")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    lexical: LexicalConfig = Field(default_factory=LexicalConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    answer: AnswerConfig = Field(default_factory=AnswerConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    _source: str = PrivateAttr("<defaults>")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"name '{value}' is not a plain folder name: use letters, digits, '-', '_' or '.', "
                             "not starting with '_' or '.'")
        return value

    @property
    def source(self) -> str:
        """The file the recipe came from, or <defaults>."""
        return self._source

    def workspace_dir(self) -> Path:
        """The folder that holds every artifact of this recipe."""
        return Path(self.workspace) / self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data."""
        return self.model_dump(mode="json")


def _line_map(node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """(key, key, ...) -> 1-based line of that key (or list item) in a composed YAML tree."""
    import yaml

    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[path + (k.value,)] = k.start_mark.line + 1
            _line_map(v, path + (k.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _line_map(v, path + (i,), out)
    return out


def parse_overrides(items: list[str]) -> dict:
    """Turn ['a.b=1', 'c=x'] into a nested mapping; values are parsed as YAML scalars."""
    import yaml

    tree: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise TrtragError(f"--set '{item}' is not of the form key.path=value", "e.g. --set retrieve.top_k=10")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        cur = tree
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise TrtragError(f"--set '{item}' conflicts with another override", "set each key once")
        cur[parts[-1]] = value
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _leaves(tree: dict, path: tuple = ()) -> list[tuple]:
    return [p for k, v in tree.items()
            for p in (_leaves(v, path + (k,)) if isinstance(v, dict) and v else [path + (k,)])]


def _data_path(loc: tuple, data) -> tuple:
    """The error's location in the input, without the union tags pydantic inserts into `loc`."""
    path, cur = [], data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            path.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            path.append(part)
            cur = cur[part]
        elif not isinstance(cur, (dict, list)) or isinstance(part, int):
            break
        elif part not in GENERATOR_BACKENDS:  # a missing key or an unknown one: it is still the location
            path.append(part)
            cur = None
    return tuple(path)


def _model_at(path: tuple, data) -> type[BaseModel] | None:
    """The section model that holds the keys at `path`, following the generator's backend tag."""
    cls: type[BaseModel] = Recipe
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        data = data.get(part) if isinstance(data, dict) else None
        members = [a for a in typing.get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            cls = field.annotation
        elif members:
            tag = data.get("backend") if isinstance(data, dict) else None
            cls = next((m for m in members if m.model_fields["backend"].annotation == typing.Literal[tag]), None)
            if cls is None:
                return None
        else:
            return None
    return cls


def _generators() -> list[type[BaseModel]]:
    return [ExtractiveGenerator, TransformersGenerator, OpenAIGenerator, TensorRTLLMGenerator]


def _unknown_key_hint(key: str, parent: type[BaseModel] | None) -> str:
    known = list(parent.model_fields) if parent else []
    if parent in _generators():
        owners = [g.model_fields["backend"].annotation.__args__[0] for g in _generators() if key in g.model_fields]
        if owners:
            return (f"'{key}' is a setting of the {' / '.join(owners)} generator; this generator's backend is "
                    f"{parent.model_fields['backend'].annotation.__args__[0]} (its keys: {', '.join(known)})")
    near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    return f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(known)


_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
             "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
             "model_type": "a mapping of settings", "model_attributes_type": "a mapping of settings",
             "dict_type": "a mapping of settings"}


def _explain(exc: ValidationError, data: dict, lines: dict, set_paths: list[tuple], src: str) -> TrtragError:
    """One line for the first problem pydantic found: where, what, and the fix."""
    errors = exc.errors()
    err = errors[0]
    kind, path = err["type"], _data_path(err["loc"], data)
    if kind in ("union_tag_invalid",):
        path = path + ("backend",)
    dotted = ".".join(str(p) for p in path) or "recipe"
    # A missing key has no line of its own: it belongs to the mapping that lacks it.
    at = path[:-1] if kind == "missing" else path
    if at and any(p[:len(at)] == at or at[:len(p)] == p for p in set_paths):
        where = "--set"
    else:
        known = [lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines]
        where = f"{src}:{known[0]}" if known else src
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    got = err.get("input")
    field = None
    parent = _model_at(path[:-1], data)
    if parent is not None and path and path[-1] in parent.model_fields:
        field = parent.model_fields[path[-1]]
    about = field.description if field is not None and field.description else None
    fix = "fix the value in the recipe or the --set override"
    if kind == "extra_forbidden":
        return TrtragError(f"{where}: unknown recipe key '{dotted}'{more}", _unknown_key_hint(path[-1], parent))
    if kind == "missing":
        return TrtragError(f"{where}: {dotted} is required here{more}", f"add {path[-1]}: {about or 'a value'}")
    if kind == "union_tag_not_found":
        return TrtragError(f"{where}: {dotted} needs a backend{more}",
                           "add backend: " + " | ".join(GENERATOR_BACKENDS))
    if kind == "union_tag_invalid":
        return TrtragError(f"{where}: {dotted}: expected one of {err['ctx']['expected_tags']}, got {got!r}{more}", fix)
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
        hint = ("answer.generator is a mapping: generator: {backend: extractive}, or {backend: transformers, model: ...}"
                if expected.startswith("a mapping") and path == ("answer", "generator") else
                "indent the settings under this key" if expected.startswith("a mapping") else about or fix)
        return TrtragError(f"{where}: {dotted}: expected {expected}, got {type(got).__name__} {got!r}{more}", hint)
    if kind == "literal_error":
        return TrtragError(f"{where}: {dotted}: expected one of {err['ctx']['expected']}, got {got!r}{more}",
                           about or fix)
    if kind == "value_error":
        return TrtragError(f"{where}: {err['ctx']['error']}{more}", fix)
    text = err["msg"].replace("Input should be", "must be").replace("String should", "must")
    return TrtragError(f"{where}: {dotted} {text}, got {got!r}{more}", about or fix)


def _read_yaml(path: Path) -> tuple[dict, dict]:
    """The file's mapping and its key lines, or a one-line error."""
    import yaml

    if not path.is_file():
        raise TrtragError(f"recipe '{path}' does not exist", "pass --recipe with an existing YAML file")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TrtragError(f"{path}{line}: malformed YAML: {problem}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise TrtragError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}",
                          "see recipes/default.yaml")
    return data, _line_map(root)


def load_recipe(path: Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load, validate and override a recipe; a missing default file means built-in defaults."""
    data: dict = {}
    lines: dict = {}
    src = "<defaults>"
    if path is not None or DEFAULT_RECIPE.exists():
        path = Path(path) if path is not None else DEFAULT_RECIPE
        src = str(path)
        data, lines = _read_yaml(path)
    over = parse_overrides(overrides or [])
    data = _merge(data, over)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, data, lines, _leaves(over), src) from None
    recipe._source = src
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text, saved beside every artifact."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
