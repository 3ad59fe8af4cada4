"""ONNX Runtime encoder: export a sentence-transformers model once, then embed text on the CPU.

The exported graph holds the whole encoder (BERT, masked pooling, L2 normalisation), so one
`session.run` returns finished embeddings. Two files are kept in the cache folder:

  model.onnx        plain export (torch.onnx, TorchScript exporter)
  model.fused.onnx  the same after ORT's transformer optimizer fused attention, LayerNorm and GELU
  manifest.json     model id, weight sha256, library versions, sha256/size of both files

The fused graph is the default: on a 2-core AMD EPYC (AVX2, no AVX-512) it matched the plain graph's
throughput (ORT fuses LayerNorm and GELU itself at load time) and was faster for single queries and to
load (p50 3.6-4.8 vs 4.6-5.7 ms; 0.49 vs 0.59 s). FP32 throughput is bound by GEMM speed there
(~150 GFLOP/s for 2 cores, ~1.9 GFLOP per 82-token paragraph): ORT reached 58-72 docs/s against
sentence-transformers' 52-61, about 1.15x; more needs int8. Numbers: benchmarks/encode_vs_st.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trtrag_cli.encode.models import ModelInfo, load_tokenizer, model_info
from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import atomic_path, sha256_file

if TYPE_CHECKING:
    import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "embeddings"
OPSET = 17
VARIANTS = {"fused": "model.fused.onnx", "plain": "model.onnx"}
DEFAULT_VARIANT = "fused"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: SkipLayerNormalization split into Add + LayerNormalization (split_skip_layernorm)
VERSIONED = ("torch", "transformers", "onnx", "onnxruntime")
# Padded tokens per session.run. Smaller runs keep the FFN activations (tokens x 1536 floats) near
# cache size: runs of ~12 x 82-token paragraphs gave 70 docs/s where runs of 64 gave 56 (2-core EPYC).
RUN_TOKENS = 1024
# Spinning intra-op threads: +10% docs/s and lower query latency on an idle machine; pass spin=False
# where other processes compete for the cores (there it is the other way round).
SPIN = True
# ORT fusions every session here leaves off. SkipLayerNormFusion would put back the SkipLayerNormalization
# ops that split_skip_layernorm takes apart.
UNFUSED = ["SkipLayerNormFusion"]


# ---------------------------------------------------------------------------------------------- files

def _file_record(path: Path) -> dict:
    st = path.stat()
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _file_matches(path: Path, record: dict | None) -> bool:
    """Whether path still has the recorded content; rehash only when size or mtime moved."""
    if not record or not path.is_file():
        return False
    st = path.stat()
    if st.st_size != record.get("size"):
        return False
    if st.st_mtime_ns == record.get("mtime_ns"):
        return True
    return sha256_file(path) == record.get("sha256")


# --------------------------------------------------------------------------------------------- export

def _export_module(info: ModelInfo):
    """torch module: (input_ids, attention_mask, token_type_ids) -> L2-normalised pooled embeddings."""
    torch = deps.require("torch", "exporting the encoder to ONNX")
    transformers = deps.require("transformers", "exporting the encoder to ONNX")

    transformers.utils.logging.disable_progress_bar()  # its weight-loading bar would break Rich's output
    # Eager attention traces into MatMul/Softmax patterns that ORT's optimizer fuses into one
    # Attention op; the SDPA path does not fuse.
    bert = transformers.AutoModel.from_pretrained(str(info.dir), attn_implementation="eager").float().eval()
    pooling = info.pooling

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            if pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            elif pooling == "cls":
                pooled = hidden[:, 0]
            else:  # max, as sentence-transformers: padded positions set to -1e9
                pooled = (hidden + (mask - 1.0) * 1e9).max(1).values
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Encoder().eval()


@dataclass(frozen=True)
class Exported:
    """Files written by export_onnx and the operator fusions the optimizer reported."""

    plain: Path
    fused: Path
    fusions: dict[str, int]


def export_onnx(model_dir: Path, out_path: Path) -> Exported:
    """Export model_dir to out_path (plain graph) and a fused copy beside it (<stem>.fused.onnx)."""
    torch = deps.require("torch", "exporting the encoder to ONNX")
    info = model_info(str(model_dir))
    module = _export_module(info)
    out_path = Path(out_path)
    fused_path = out_path.with_name(out_path.stem + ".fused.onnx")
    ids, mask = _sample_batch(info)
    sample = (torch.from_numpy(ids), torch.from_numpy(mask), torch.zeros_like(torch.from_numpy(ids)))
    axes = {0: "batch", 1: "sequence"}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; failures still raise
        expected = module(*sample).numpy()
        with atomic_path(out_path) as tmp:
            # dynamo=False: the TorchScript exporter's graph is the one ORT's BERT fusions recognise
            # (the dynamo export fuses no Attention and no EmbedLayerNormalization).
            torch.onnx.export(
                module, sample, str(tmp), dynamo=False, input_names=list(INPUTS), output_names=[OUTPUT],
                opset_version=OPSET, dynamic_axes={**{name: axes for name in INPUTS}, OUTPUT: {0: "batch"}},
            )
    fusions = _fuse(out_path, fused_path, info)
    for path in (out_path, fused_path):
        _check_against_torch(path, ids, mask, expected)
    return Exported(out_path, fused_path, fusions)


def _sample_batch(info: ModelInfo):
    """A padded batch of real token ids: traced with padding so the mask arithmetic stays general."""
    texts = ["Hello world.", "",
             "A longer sentence, so that the other rows of this batch are padded: " + "vectors " * 20]
    ids = [e.ids for e in load_tokenizer(info.dir, info.max_seq_length).encode_batch(texts)]
    from trtrag_cli.encode.batching import pad

    return pad(ids, max(map(len, ids)))


def _check_against_torch(path: Path, ids, mask, expected) -> None:
    """Fail the export if ONNX Runtime's embeddings of the sample batch drift from torch's."""
    import numpy as np

    session = new_session(path, session_options(1))
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = session.run([OUTPUT], {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    worst = float((got * expected).sum(1).min())
    if worst < 0.99999:
        raise TrtragError(f"exported {path.name} disagrees with torch (cosine {worst:.6f})",
                          "check the torch/transformers/onnxruntime versions; report it with manifest.json")


def _fuse(src: Path, dst: Path, info: ModelInfo) -> dict[str, int]:
    """Run ORT's transformer optimizer (attention, LayerNorm, GELU fusions) from src into dst."""
    import logging

    deps.require("onnx", "optimizing the exported encoder")
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(str(src), model_type="bert", num_heads=info.num_heads,
                               hidden_size=info.hidden_size)
    stats = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    split_skip_layernorm(optimized.model)
    with atomic_path(dst) as tmp:
        optimized.save_model_to_file(str(tmp))
    return stats


def split_skip_layernorm(model) -> int:
    """Replace each SkipLayerNormalization(x, skip, gamma, beta, bias) by (x + bias) + skip, LayerNormalization.

    The same arithmetic, faster: ORT 1.32's CPU kernel for the fused op took 3.5 ns per element at
    8 x 128 x 384 where Add and LayerNormalization apart took 0.6 (2-core EPYC; 1.5 ms of a 95-token
    passage's 18.5 ms). The bias is added first so that the INT8 engine can fold it into the MatMul
    before it (quantize/cpu.py). Sessions must then leave SkipLayerNormFusion off (UNFUSED).
    Returns how many ops were split.
    """
    from onnx import helper

    nodes, split = [], 0
    for node in model.graph.node:
        if node.op_type != "SkipLayerNormalization":
            nodes.append(node)
            continue
        outputs = list(node.output) + [""] * 4
        if outputs[1] or outputs[2]:
            raise TrtragError(f"{node.name} exports its mean or variance, which a split LayerNorm cannot give",
                              "report it with the encoder's manifest.json")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        x, skip, gamma, beta = node.input[:4]
        bias = node.input[4] if len(node.input) > 4 else ""
        total = outputs[3] or f"{node.name}/sum"
        if bias:
            nodes.append(helper.make_node("Add", [x, bias], [f"{node.name}/biased"], name=f"{node.name}/bias"))
            x = f"{node.name}/biased"
        nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{node.name}/skip"))
        nodes.append(helper.make_node("LayerNormalization", [total, gamma, beta], [outputs[0]], name=node.name,
                                      axis=-1, epsilon=eps))
        split += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return split


def new_session(model, options):
    """A CPU InferenceSession of model (a path or serialized bytes) that keeps UNFUSED off."""
    ort = deps.require("onnxruntime", "the onnxruntime encoder")
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                providers=["CPUExecutionProvider"], disabled_optimizers=UNFUSED)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """ORT's quantization package calls logging.basicConfig on import and logs advice through the root
    logger; undo both, so the rest of the process logs as it did before."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


# ---------------------------------------------------------------------------------------------- cache

def _wanted(info: ModelInfo) -> dict:
    """Manifest fields that must match for a cached export to be reused."""
    return {
        "format": MANIFEST_FORMAT,
        "model_id": info.id,
        "model_dir": str(info.dir),
        "opset": OPSET,
        "versions": {name: deps.version(name) for name in VERSIONED},
    }


def _cache_is_valid(cache_dir: Path, info: ModelInfo, variant: str) -> bool:
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        return False  # valid JSON of another shape: a damaged cache, exported again
    if any(manifest.get(key) != value for key, value in _wanted(info).items()):
        return False
    return (_file_matches(info.weights, manifest.get("weights"))
            and _file_matches(cache_dir / VARIANTS[variant], manifest.get("files", {}).get(variant)))


@contextlib.contextmanager
def _export_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise exports into one cache folder across processes (POSIX); elsewhere no-op."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    with open(cache_dir / ".export.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def ensure_onnx(model_id: str, cache_dir: Path, variant: str = DEFAULT_VARIANT) -> Path:
    """Path of the cached ONNX export of model_id in cache_dir, exporting (again) if absent or stale."""
    if variant not in VARIANTS:
        raise TrtragError(f"unknown ONNX variant {variant!r}", f"use one of: {', '.join(VARIANTS)}")
    info = model_info(model_id)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if _cache_is_valid(cache_dir, info, variant):
        return cache_dir / VARIANTS[variant]
    with _export_lock(cache_dir):
        if _cache_is_valid(cache_dir, info, variant):  # another process exported while we waited
            return cache_dir / VARIANTS[variant]
        if not info.weights.is_file():
            raise TrtragError(f"{info.dir} has no model.safetensors", "re-save the model with safetensors")
        started = time.perf_counter()
        with quiet_root_logger():
            exported = export_onnx(info.dir, cache_dir / VARIANTS["plain"])
        manifest = {
            **_wanted(info),
            "weights": _file_record(info.weights),
            "files": {"plain": _file_record(exported.plain), "fused": _file_record(exported.fused)},
            "fusions": exported.fusions,
            "default": DEFAULT_VARIANT,
            "export_seconds": round(time.perf_counter() - started, 2),
        }
        with atomic_path(cache_dir / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return cache_dir / VARIANTS[variant]


def cache_folder(cache_dir: Path, model_id: str) -> Path:
    """Per-model subfolder of a shared cache dir: cache_dir/onnx/<model name>[-<path hash>]."""
    info = model_info(model_id)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(info.id).name) or "model"
    if Path(info.id).name != info.id:  # a filesystem path: two folders may share a basename
        name += "-" + hashlib.sha256(str(info.dir).encode()).hexdigest()[:8]
    return Path(cache_dir) / "onnx" / name


# -------------------------------------------------------------------------------------------- runtime

def physical_cores() -> int:
    """Physical cores this process may use: affinity, hyperthread siblings and cgroup quota applied."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    with contextlib.suppress(OSError, ValueError):
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in block.splitlines())}
            if "core id" in fields and int(fields.get("processor", -1)) in allowed:
                cores.add((fields.get("physical id"), fields["core id"]))
    count = len(cores) or len(allowed)
    # A container limited to N CPUs by quota still sees every host CPU in its affinity mask.
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, -(-int(quota) // int(period)))
    return max(1, count)


def session_options(threads: int = 0, spin: bool = SPIN):
    """ORT session options tuned for batch-of-texts inference on a few CPU cores."""
    ort = deps.require("onnxruntime", "the onnxruntime encoder")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads if threads > 0 else physical_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtEncoder:
    """Texts -> float32 L2-normalised embeddings with one ONNX Runtime CPU session."""

    def __init__(self, onnx_path: Path, info: ModelInfo, *, threads: int = 0, max_tokens: int = 256,
                 label: str = "onnxruntime-fp32", spin: bool = SPIN, run_tokens: int = RUN_TOKENS):
        if not 2 <= max_tokens <= info.max_position_embeddings:
            raise TrtragError(f"max_tokens={max_tokens} is out of range for {info.id}",
                              f"use 2..{info.max_position_embeddings} (trained with {info.max_seq_length})")
        self.name = f"{label}/{Path(info.id).name}"
        self.dim = info.dim
        self.max_tokens = max_tokens
        self.path = Path(onnx_path)
        self.run_tokens = run_tokens
        self._tokenizer = load_tokenizer(info.dir, max_tokens)
        try:
            self._session = new_session(self.path, session_options(threads, spin))
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types for a bad file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrtragError(f"cannot load ONNX model {self.path}: {first}",
                              f"delete {self.path.parent} and run again to re-export") from exc
        self._inputs = [i.name for i in self._session.get_inputs()]

    def encode(self, texts: list[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed texts in input order as float32 [len(texts), dim], batching texts of similar length."""
        import numpy as np

        if self._session is None:
            raise RuntimeError(f"{self.name} is closed")
        from trtrag_cli.encode.batching import encode_sorted

        def embed(ids: list) -> np.ndarray:
            # Split the batch so one run's activations stay cache-sized (see RUN_TOKENS).
            per_run = max(1, self.run_tokens // len(ids[0]))
            return np.concatenate([self._run(ids[sub:sub + per_run], len(ids[sub]))
                                   for sub in range(0, len(ids), per_run)])

        return encode_sorted(self._tokenizer, texts, batch_size, self.dim, embed, progress)

    def _run(self, ids: list[list[int]], width: int) -> np.ndarray:
        import numpy as np

        from trtrag_cli.encode.batching import pad

        input_ids, attention_mask = pad(ids, width)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": np.zeros_like(input_ids)}
        return self._session.run([OUTPUT], {name: feeds[name] for name in self._inputs})[0]

    def close(self) -> None:
        """Release the ONNX Runtime session (its weights and arenas)."""
        self._session = None

    def __enter__(self) -> OrtEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_encoder(model_id: str, cache_dir: Path, threads: int = 0, max_tokens: int = 256,
                 variant: str = DEFAULT_VARIANT, spin: bool = SPIN) -> OrtEncoder:
    """OrtEncoder for model_id, exporting into cache_dir/onnx/<model> on first use."""
    path = ensure_onnx(model_id, cache_folder(cache_dir, model_id), variant)
    labels = {DEFAULT_VARIANT: "onnxruntime-fp32"}
    label = labels.get(variant, f"onnxruntime-fp32-{variant}")
    return OrtEncoder(path, model_info(model_id), threads=threads, max_tokens=max_tokens, label=label,
                      spin=spin)
