"""Typed, strict recipes: one YAML file drives every stage.

Unknown keys fail with the file, the line and the nearest valid key; wrong types fail with the dotted
path and the expected type. `--set a.b=value` overrides are parsed as YAML scalars and checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trtrag_cli.util.errors import TrtragError

DEFAULT_RECIPE = Path("recipes/default.yaml")


@dataclass
class EncoderConfig:
    model: str = "all-MiniLM-L6-v2"
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch"] = "auto"
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    max_tokens: int = 256
    batch_size: int = 64
    threads: int = 0


@dataclass
class CorpusConfig:
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".markdown", ".html", ".htm", ".jsonl"])
    max_file_mb: float = 20.0


@dataclass
class ChunkingConfig:
    max_tokens: int = 200
    overlap: int = 32


@dataclass
class IndexConfig:
    kind: Literal["flat", "ivf", "ivfpq", "hnsw"] = "flat"
    nlist: int = 256
    nprobe: int = 16
    pq_m: int = 0                         # ivfpq sub-quantizers; 0 = dim / 8
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    device: Literal["auto", "cpu", "gpu"] = "auto"      # where searches run; auto = a GPU when one is usable
    exact: Literal["auto", "torch", "faiss"] = "auto"   # GPU engine for flat; auto = measured at load
    fp16: bool = True                     # GPU: fp16 flat vectors, fp16 ivfpq lookup tables
    gpus: int = 0                         # GPUs to use; 0 = all visible
    multi_gpu: Literal["shard", "replicate"] = "shard"


@dataclass
class LexicalConfig:
    stemmer: str = "english"
    stopwords: str = "en"
    k1: float = 1.2
    b: float = 0.75


@dataclass
class RetrieveConfig:
    mode: Literal["hybrid", "rrf", "bm25", "dense"] = "hybrid"
    top_n: int = 100
    top_k: int = 5
    rrf_k: int = 60
    dense_weight: float = 0.5


@dataclass
class AnswerConfig:
    generator: Literal["extractive", "transformers", "openai", "tensorrt-llm"] = "extractive"
    max_sentences: int = 3                # extractive: sentences in the answer
    passages: int = 3                     # passages handed to the generator
    model: str = ""                       # transformers / tensorrt-llm: local model folder; openai: its tokenizer
    max_new_tokens: int = 256
    temperature: float = 0.0              # 0 = greedy
    top_k: int = 0                        # 0 = off
    top_p: float = 1.0
    seed: int = 0                         # -1 = unseeded
    stop: list[str] = field(default_factory=list)
    context: int = 0                      # tokens the prompt plus answer may use; 0 = the model's own limit
    device: str = "auto"                  # transformers: auto | cpu | cuda[:n]
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    compile: bool = True                  # transformers on a GPU: compile the layer functions (or the step)
    decode: Literal["auto", "graph", "transformers"] = "auto"  # transformers: auto = our CUDA-graph loop for
                                          # Llama-family models on a GPU, transformers' generate otherwise
    kernels: bool = True                  # our loop on a GPU: its Triton decode kernels for one-row steps
                                          # when triton is installed, else the torch layer functions
    deterministic: bool = False           # our loop's kernels: no atomic K splits, so that a GPU decodes the
                                          # same tokens every time (0.2% slower a step on an H200)
    pack_weights: bool = True             # our loop's kernels: read bf16 matrices from lossless 12-bit copies
                                          # (0.75 times their memory more, when the GPU has room for it)
    base_urls: list[str] = field(default_factory=list)  # openai: the nodes, balanced with failover
    served_model: str = ""                # openai: the model name the nodes serve
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    fallback: Literal["none", "extractive"] = "none"   # when the generator fails at answer time
    tensor_parallel: int = 1              # tensorrt-llm
    kv_cache_reuse: bool = True           # tensorrt-llm: KV cache block reuse across requests
    gpu_memory_fraction: float = 0.9      # tensorrt-llm: share of free GPU memory for the KV cache


@dataclass
class CalibrateConfig:
    queries: str = "calibration"          # file or folder of domain queries (txt, or jsonl with "query")
    method: Literal["entropy", "percentile", "max"] = "percentile"
    percentile: float = 99.99
    smooth_alpha: float = 0.8             # SmoothQuant migration strength; 0 turns smoothing off
    tune: bool = True                     # per MatMul input: alpha and range percentile by INT8 product error
    batch_size: int = 1024                # queries per calibration batch (at least 1024)
    min_iterations: int = 5
    max_iterations: int = 10
    tolerance: float = 0.01               # stop once no range moves more than this (relative) in a batch
    holdout: int = 256                    # domain queries kept out of calibration for the accuracy gate
    min_mean_cosine: float = 0.99         # gate: INT8 vs FP32 embeddings
    max_recall_drop: float = 0.005        # gate: recall@10 on `eval` queries, when given
    max_float_layers: int = 12            # most MatMuls the gate may keep in floating point
    eval: str = ""                        # queries.jsonl with relevant sources for the recall gate


@dataclass
class EngineConfig:
    min_batch: int = 1                    # TensorRT optimisation profile (batch x sequence length)
    opt_batch: int = 32
    max_batch: int = 256
    min_tokens: int = 1
    opt_tokens: int = 64
    workspace_mb: int = 4096
    timing_cache: str = ""                # default: <workspace>/_cache/tensorrt.timing


@dataclass
class Recipe:
    name: str = "default"
    workspace: str = ".trtrag"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    lexical: LexicalConfig = field(default_factory=LexicalConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    def workspace_dir(self) -> Path:
        """The folder that holds every artifact of this recipe."""
        return Path(self.workspace) / self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data, without internal fields."""
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _where(src: str, node) -> str:
    return f"{src}:{node.start_mark.line + 1}" if node is not None else src


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value, tp, path: str, where: str):
    """Check one scalar or list against its declared type; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    bad = TrtragError(f"{where}: {path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}",
                      "fix the value in the recipe or the --set override")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str) and isinstance(value, bool):
        raise bad
    if not isinstance(value, tp):
        raise bad
    return value


def _build(cls, data: dict, nodes: dict, path: str, src: str):
    """Build a config dataclass from a mapping, rejecting unknown keys with the nearest valid one."""
    known = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        node = nodes.get(key, (None, {}))[0]
        dotted = f"{path}.{key}" if path else str(key)
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(known)
            raise TrtragError(f"{_where(src, node)}: unknown recipe key '{dotted}'", hint)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise TrtragError(f"{_where(src, node)}: {dotted}: expected a mapping of settings, got {value!r}",
                                  "indent the settings under this key")
            kwargs[key] = _build(tp, value, nodes.get(key, (None, {}))[1], dotted, src)
        else:
            kwargs[key] = _coerce(value, tp, dotted, _where(src, node))
    obj = cls(**kwargs)
    _check_bounds(obj, path, src)
    return obj


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_POSITIVE = {"max_tokens", "batch_size", "top_n", "max_new_tokens", "timeout_s", "tensor_parallel",
             "nlist", "nprobe", "pq_bits", "hnsw_m", "ef_construction",
             "ef_search", "rrf_k", "max_sentences", "passages", "max_file_mb", "min_iterations",
             "max_iterations", "tolerance", "holdout", "min_batch", "opt_batch", "max_batch", "min_tokens",
             "opt_tokens", "workspace_mb"}


def _check_bounds(obj, path: str, src: str) -> None:
    for name in _fields(type(obj)):
        value = getattr(obj, name)
        if name in _POSITIVE and isinstance(value, (int, float)) and value <= 0:
            raise TrtragError(f"{src}: {path}.{name} must be positive, got {value}", "set a value above zero")
    if isinstance(obj, Recipe) and not _NAME.fullmatch(obj.name):
        raise TrtragError(f"{src}: name '{obj.name}' is not a plain folder name",
                          "use letters, digits, '-', '_' or '.', not starting with '_' or '.'")
    if isinstance(obj, ChunkingConfig) and obj.overlap >= obj.max_tokens:
        raise TrtragError(f"{src}: chunking.overlap ({obj.overlap}) must be smaller than chunking.max_tokens "
                          f"({obj.max_tokens})", "lower the overlap")
    if isinstance(obj, CalibrateConfig):
        if obj.min_iterations > obj.max_iterations:
            raise TrtragError(f"{src}: calibrate.min_iterations ({obj.min_iterations}) exceeds max_iterations "
                              f"({obj.max_iterations})", "the design's advice is 5 to 10 iterations")
        if not 0.0 <= obj.smooth_alpha < 1.0:
            raise TrtragError(f"{src}: calibrate.smooth_alpha must be within [0, 1), got {obj.smooth_alpha}",
                              "0.8 suits MiniLM; 0 turns smoothing off")
        if not 50.0 < obj.percentile <= 100.0:
            raise TrtragError(f"{src}: calibrate.percentile must be within (50, 100], got {obj.percentile}",
                              "99.99 suits transformer activations")
    if isinstance(obj, EngineConfig) and not (obj.min_batch <= obj.opt_batch <= obj.max_batch
                                              and obj.min_tokens <= obj.opt_tokens):
        raise TrtragError(f"{src}: engine profile must satisfy min <= opt <= max (batch {obj.min_batch}/"
                          f"{obj.opt_batch}/{obj.max_batch}, tokens {obj.min_tokens}/{obj.opt_tokens})",
                          "order the engine.* sizes; the largest sequence is encoder.max_tokens")
    if isinstance(obj, IndexConfig) and (obj.pq_m < 0 or obj.gpus < 0 or obj.pq_bits > 16):
        raise TrtragError(f"{src}: index.pq_m and index.gpus must be 0 or more and pq_bits at most 16 "
                          f"(got {obj.pq_m}, {obj.gpus}, {obj.pq_bits})", "0 means the default for pq_m and gpus")
    if isinstance(obj, RetrieveConfig) and obj.top_k <= 0:
        raise TrtragError(f"{src}: retrieve.top_k must be positive, got {obj.top_k}", "set a value above zero")
    if isinstance(obj, AnswerConfig) and not (obj.temperature >= 0 and obj.top_k >= 0 and 0 < obj.top_p <= 1
                                              and 0 < obj.gpu_memory_fraction <= 1 and obj.context >= 0):
        raise TrtragError(f"{src}: answer sampling settings out of range (temperature {obj.temperature}, top_k "
                          f"{obj.top_k}, top_p {obj.top_p}, gpu_memory_fraction {obj.gpu_memory_fraction}, "
                          f"context {obj.context})", "temperature >= 0, top_k >= 0, 0 < top_p <= 1, "
                          "0 < gpu_memory_fraction <= 1, context >= 0")
    if isinstance(obj, RetrieveConfig) and not 0.0 <= obj.dense_weight <= 1.0:
        raise TrtragError(f"{src}: retrieve.dense_weight must be within [0, 1], got {obj.dense_weight}",
                          "use 0 for lexical only, 1 for dense only")


def _node_map(node) -> dict:
    """key -> (key node, nested map) for a YAML mapping node, so errors can cite lines."""
    import yaml

    out = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[k.value] = (k, _node_map(v))
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


def load_recipe(path: Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load, validate and override a recipe; a missing default file means built-in defaults."""
    import yaml

    data: dict = {}
    nodes: dict = {}
    src = "<defaults>"
    if path is not None or DEFAULT_RECIPE.exists():
        path = Path(path) if path is not None else DEFAULT_RECIPE
        src = str(path)
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
        nodes = _node_map(root)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    recipe = _build(Recipe, data, nodes, "", src)
    recipe.source = src
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text, saved beside every artifact."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
