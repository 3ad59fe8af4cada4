"""PyTorch encoder: a Hugging Face model in fp16/bf16 on a CUDA GPU, one CUDA graph per shape bucket.

Each batch is padded up to a bucket (batch in BATCH_BUCKETS, tokens in SEQ_BUCKETS) and, on CUDA, the
forward for that bucket (model, masked pooling, L2 normalisation) is captured once into a CUDA graph and
replayed: a small encoder is bound by kernel launches, not arithmetic (the issue's reference on an H200,
MiniLM-L6, 1 x 32 tokens: eager 4.04 ms, graph 0.28 ms). Padding rows and positions are masked, so a
text's embedding does not depend on its bucket. On the CPU the same code runs eagerly in fp32 (tests).

Capture forbids host synchronisation inside the forward. Some transformers versions inspect a 2D padding
mask on the host (`if mask.all(): skip it`), so the forward hands the model a ready additive mask
instead; `_mask_form` picks the form the installed version accepts and checks it against the 2D path.
Numbers: benchmarks/gpu_encoder.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtrag_cli.encode.models import load_tokenizer, model_info
from trtrag_cli.util import deps
from trtrag_cli.util.deps import torch_dtype_kwarg
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.gpu import graph_capture

if TYPE_CHECKING:
    import numpy as np

# precision -> torch dtype name (which precisions torch serves: encode/registry.py PRECISIONS)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SEQ_BUCKETS = (16, 32, 64, 128, 256)
WARMUP_RUNS = 3  # eager runs on a side stream before capture (cuBLAS handles, SDPA kernel choice)
# Ops that read tensor data on the host: each synchronises, so none may run inside a captured forward.
HOST_SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
                           "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"})


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n; past the largest, the next multiple of the largest."""
    for size in buckets:
        if n <= size:
            return size
    return -(-n // buckets[-1]) * buckets[-1]


def seq_buckets(max_tokens: int) -> tuple[int, ...]:
    """SEQ_BUCKETS cut at max_tokens, with max_tokens itself as the last bucket."""
    return tuple(b for b in SEQ_BUCKETS if b < max_tokens) + (max_tokens,)


@dataclass
class _Captured:
    """One bucket's graph: its static packed input [2, batch, seq] (ids, mask) and static output."""

    graph: Any
    inputs: Any
    output: Any


def _host_syncs(fn: Callable, *args) -> list[str]:
    """Names of host-synchronising ops that fn(*args) dispatches (capture-safety check that runs on CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in HOST_SYNC_OPS:
                found.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with Spy():
        fn(*args)
    return found


def load_model(model_dir: Path, dtype: Any = None):
    """The Hugging Face encoder in model_dir (AutoModel, SDPA attention where the architecture has it)."""
    transformers = deps.require("transformers", "the torch encoder")
    transformers.utils.logging.disable_progress_bar()  # its weight-loading bar would break Rich's output
    kwargs = {torch_dtype_kwarg(): dtype} if dtype is not None else {}
    try:
        return transformers.AutoModel.from_pretrained(str(model_dir), attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):  # an architecture without an SDPA path
        return transformers.AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", **kwargs)


def resolve_device(device: Any = None):
    """torch.device to run on: cuda when available unless given; TrtragError for an absent GPU."""
    torch = deps.require("torch", "the torch encoder")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrtragError("the torch encoder was asked for CUDA but no CUDA GPU is visible",
                              "install a CUDA build of torch, or use device cpu / --backend onnxruntime")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise TrtragError(f"the torch encoder does not run on {dev.type}", "use a CUDA GPU or the CPU")
    return dev


class TorchEncoder:
    """Texts -> float32 L2-normalised embeddings from a torch model, CUDA graphs per shape bucket."""

    def __init__(self, model, tokenizer, *, name: str, dim: int, pooling: str, max_tokens: int,
                 device: Any = None, variant: str = "fp16", graphs: bool = True,
                 batch_buckets: tuple[int, ...] = BATCH_BUCKETS):
        torch = deps.require("torch", "the torch encoder")
        if variant not in DTYPES:
            raise TrtragError(f"unknown torch precision {variant!r}", f"use one of: {', '.join(DTYPES)}")
        self.device = resolve_device(device)
        if self.device.type == "cpu" and variant != "fp32":
            raise TrtragError(f"the torch encoder computes in fp32 on the CPU, not {variant}",
                              "use encoder.precision: fp32 on the CPU, or run on a CUDA GPU")
        if variant == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrtragError(f"{torch.cuda.get_device_name(self.device)} has no bf16",
                              "use encoder.precision: fp16")
        if pooling not in ("mean", "cls", "max", "mean_sqrt_len"):
            raise TrtragError(f"unsupported pooling {pooling!r}", "use a model with mean, cls or max pooling")
        self._torch = torch
        self.name = name
        self.dim = dim
        self.max_tokens = max_tokens
        self.pooling = pooling
        self.variant = variant
        self.dtype = getattr(torch, DTYPES[variant])
        self.batch_buckets = tuple(batch_buckets)
        self.seq_buckets = seq_buckets(max_tokens)
        # graphs is read at each batch, so a caller can flip it to compare against eager runs.
        self.graphs = graphs and self.device.type == "cuda"
        self._tokenizer = tokenizer
        self._model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._pool = None
        self._stream = None
        self._lock = threading.Lock()  # static graph buffers are shared: one batch at a time
        self._mask_form = self._pick_mask_form()

    # ------------------------------------------------------------------------------------- forward

    def _model_mask(self, attention_mask, form: str):
        """attention_mask [b, s] (1 = token) as the model should receive it."""
        if form == "2d":
            return attention_mask
        keep = attention_mask[:, None, :].to(self.dtype)  # [b, 1, s]
        if form == "3d":  # older transformers turn [b, 1, s] into the additive mask themselves
            return keep
        # additive [b, 1, 1, s]: finfo.min, not -inf, so no softmax row can become NaN
        return ((1.0 - keep) * self._torch.finfo(self.dtype).min)[:, None]

    def _forward_ids(self, input_ids, attention_mask, form: str | None = None):
        """float32 [b, dim] L2-normalised embeddings of padded token ids (the forward a graph captures)."""
        torch = self._torch
        mask = self._model_mask(attention_mask, form or self._mask_form)
        hidden = self._model(input_ids=input_ids, attention_mask=mask)[0].float()
        keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":  # as sentence-transformers: padded positions set to -1e9
            pooled = (hidden + (keep - 1.0) * 1e9).max(1).values
        else:
            count = keep.sum(1).clamp(min=1e-9)
            pooled = (hidden * keep).sum(1) / (count.sqrt() if self.pooling == "mean_sqrt_len" else count)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    def _pick_mask_form(self) -> str:
        """The first mask form that the model accepts and that matches its own 2D-mask path."""
        torch = self._torch
        ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 0, 0]], device=self.device)
        ids = ids.clamp(max=self._model.config.vocab_size - 1)
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], device=self.device)
        with torch.inference_mode():
            ref = self._forward_ids(ids, mask, "2d")
            for form in ("4d", "3d"):
                try:
                    got = self._forward_ids(ids, mask, form)
                except (ValueError, RuntimeError, TypeError):
                    continue
                if float((got * ref).sum(1).min()) > 0.999:
                    return form
        return "2d"  # capture may then fail where transformers inspects the mask on the host

    # --------------------------------------------------------------------------------------- graphs

    def _capture(self, batch: int, seq: int) -> _Captured:
        """The graph for one bucket, capturing it on first use (PyTorch's side-stream warm-up recipe)."""
        entry = self._graphs.get((batch, seq))
        if entry is not None:
            return entry
        torch = self._torch
        with torch.cuda.device(self.device), torch.inference_mode():
            inputs = torch.zeros((2, batch, seq), dtype=torch.int64, device=self.device)
            inputs[1, :, 0] = 1
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one pool: buckets reuse each other's memory
                # Our own side stream, also used to capture: torch.cuda.graph's default capture stream
                # is one per process, made on whichever device was current first.
                self._stream = torch.cuda.Stream(self.device)
            side = self._stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._forward_ids(inputs[0], inputs[1])
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with graph_capture(torch, graph, pool=self._pool, stream=side):
                output = self._forward_ids(inputs[0], inputs[1])
        entry = self._graphs[(batch, seq)] = _Captured(graph, inputs, output)
        return entry

    def _run(self, packed):
        """Embeddings [batch, dim] for packed int64 [2, batch, seq] (ids, mask) at a bucket shape.

        With graphs on, the result is the graph's static output: read it before the next call (graphs
        share one memory pool, so another bucket's replay may overwrite it).
        """
        if self._model is None:
            raise RuntimeError(f"{self.name} is closed")
        with self._torch.inference_mode():  # the static buffers are inference tensors
            if not self.graphs:
                packed = packed.to(self.device)
                return self._forward_ids(packed[0], packed[1])
            entry = self._capture(packed.shape[1], packed.shape[2])
            entry.inputs.copy_(packed)
            entry.graph.replay()
            return entry.output

    def warmup(self, buckets: Iterable[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        """Capture the graphs for (batch, seq) buckets (default: all) ahead of serving; the captured list."""
        if not self.graphs:
            return []
        if self._model is None:
            raise RuntimeError(f"{self.name} is closed")
        if buckets is None:
            buckets = [(b, s) for s in self.seq_buckets for b in self.batch_buckets]
        todo = {(bucket(b, self.batch_buckets), bucket(s, self.seq_buckets)) for b, s in buckets}
        with self._lock:
            # Largest first: the shared pool grows once and smaller graphs fit in what it freed.
            for batch, seq in sorted(todo, key=lambda bs: (-bs[0] * bs[1], -bs[1])):
                self._capture(batch, seq)
        return self.captured

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(batch, seq) buckets that have a captured graph."""
        return sorted(self._graphs)

    # --------------------------------------------------------------------------------------- encode

    def _pack(self, ids: list[list[int]]):
        """CPU int64 [2, batch bucket, seq bucket]: ids and mask, right-padded; padding rows see token 0."""
        import numpy as np

        width = bucket(max(len(seq) for seq in ids), self.seq_buckets)
        packed = np.zeros((2, bucket(len(ids), self.batch_buckets), width), dtype=np.int64)
        packed[1, :, 0] = 1  # a row with nothing to attend to would be NaN in some kernels
        for row, seq in enumerate(ids):
            packed[0, row, :len(seq)] = seq
            packed[1, row, :len(seq)] = 1
        return self._torch.from_numpy(packed)

    def encode(self, texts: list[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed texts in input order as float32 [len(texts), dim], batching texts of similar length."""
        if self._model is None:
            raise RuntimeError(f"{self.name} is closed")
        if self._tokenizer is None:
            raise RuntimeError(f"{self.name} has no tokenizer; feed token ids to _run")
        from trtrag_cli.encode.batching import encode_sorted

        def embed(ids: list) -> np.ndarray:
            packed = self._pack(ids)  # each batch pads to its own bucket
            with self._lock, self._torch.inference_mode():
                return self._run(packed)[:len(ids)].cpu().numpy()

        return encode_sorted(self._tokenizer, texts, batch_size, self.dim, embed, progress)

    def close(self) -> None:
        """Free the model, the captured graphs and their memory pool, and empty the CUDA cache."""
        with self._lock:
            for entry in self._graphs.values():
                entry.graph.reset()
            self._graphs.clear()
            self._pool = self._stream = None
            self._model = None
            if self.device.type == "cuda":
                self._torch.cuda.synchronize(self.device)
                self._torch.cuda.empty_cache()

    def __enter__(self) -> TorchEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_encoder(model_id: str, cache_dir: Path, threads: int = 0, max_tokens: int = 256,
                 variant: str = "fp16", device: Any = None, graphs: bool = True) -> TorchEncoder:
    """TorchEncoder for model_id on device (cuda if available, else cpu); cache_dir is not used yet and
    threads applies on the CPU only."""
    torch = deps.require("torch", "the torch encoder")
    info = model_info(model_id)
    if not 2 <= max_tokens <= info.max_position_embeddings:
        raise TrtragError(f"max_tokens={max_tokens} is out of range for {info.id}",
                          f"use 2..{info.max_position_embeddings} (trained with {info.max_seq_length})")
    if variant not in DTYPES:
        raise TrtragError(f"unknown torch precision {variant!r}", f"use one of: {', '.join(DTYPES)}")
    dev = resolve_device(device)
    if dev.type == "cpu" and variant != "fp32":  # refuse before loading weights
        raise TrtragError(f"the torch encoder computes in fp32 on the CPU, not {variant}",
                          "use encoder.precision: fp32 on the CPU, or run on a CUDA GPU")
    if dev.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    model = load_model(info.dir, getattr(torch, DTYPES[variant]))
    return TorchEncoder(model, load_tokenizer(info.dir, max_tokens),
                        name=f"torch-{variant}/{Path(info.id).name}", dim=info.dim, pooling=info.pooling,
                        max_tokens=max_tokens, device=dev, variant=variant, graphs=graphs)
