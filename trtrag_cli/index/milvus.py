"""A Milvus collection as the recall stage: dense ANN search and BM25 full-text search, both in Milvus.

One collection per recipe holds, per chunk: `id` (the chunk store's int64 id), `chunk` and `file` (for
reading the collection on its own), `vector` (the L2-normalised embedding, metric IP = cosine, as faiss)
and `terms`, a VARCHAR with `enable_analyzer` whose BM25 `Function` fills the sparse field `sparse`
(SPARSE_INVERTED_INDEX, metric BM25, k1/b from the recipe's lexical section).

`terms` holds our analyser's output (lower-cased, stop words dropped, stemmed: index/bm25.py's Analyzer,
applied by the caller), not the raw text: Milvus Lite 3.2 accepts analyzer filters (stemmer, stop) but
silently ignores them, so raw text would give word-for-word BM25 there and another ranking on a server.
Pre-analysed terms give the same terms everywhere, queries included. Milvus Lite also reports BM25 as a
negative distance (a server as a positive score); both are read as the score |distance|.

The chain (encoder name, dimension, lexical settings, index shape) is stored in the collection's
properties and checked on open; `trtrag.sync` names the workspace generation the collection matches, so
`trtrag index` updates it in place only when it is in step. pymilvus is imported inside functions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trtrag_cli.recipe.schema import IndexConfig
from trtrag_cli.recipe.sections import milvus_is_remote
from trtrag_cli.util.deps import require
from trtrag_cli.util.errors import TrtragError

LITE_INDEXES = ("FLAT", "IVF_FLAT", "HNSW")  # what Milvus Lite 3.2.2 loads (IVF_PQ, GPU_*: "reserved")
BATCH = 512          # rows per upsert call
MAX_TERMS = 65535    # VARCHAR max_length of `terms`
SYNC = "trtrag.sync"


def collection_name(cfg: IndexConfig, recipe_name: str) -> str:
    """index.collection, or trtrag_<recipe name> with characters Milvus refuses turned into _."""
    if cfg.collection:
        return cfg.collection
    return "trtrag_" + "".join(c if c.isalnum() or c == "_" else "_" for c in recipe_name)


def resolve_uri(cfg: IndexConfig, workspace_dir: Path) -> str:
    """The server address, or the Lite file (a relative path is under the recipe's workspace folder)."""
    if milvus_is_remote(cfg.uri):
        return cfg.uri
    path = Path(cfg.uri).expanduser()
    return str(path if path.is_absolute() else Path(workspace_dir) / path)


def require_client(cfg: IndexConfig):
    """pymilvus (and milvus-lite for a Lite file), or the one-line MissingDependency; returns pymilvus."""
    pymilvus = require("pymilvus", "index.backend: milvus")
    if not milvus_is_remote(cfg.uri):
        require("milvus_lite", "a Milvus Lite file (index.uri)")
    return pymilvus


def dense_index(cfg: IndexConfig, lite: bool) -> tuple[str, dict]:
    """(Milvus index type, build params) for the recipe: auto is HNSW (Lite loads it; GPU is never guessed)."""
    kind = "HNSW" if cfg.milvus_index == "auto" else cfg.milvus_index
    if lite and kind not in LITE_INDEXES:
        raise TrtragError(f"Milvus Lite cannot load a {kind} index", "use index.milvus_index: auto, HNSW, "
                          "IVF_FLAT or FLAT, or a Milvus server (index.uri: http://<host>:19530)")
    params = {"HNSW": {"M": cfg.hnsw_m, "efConstruction": cfg.ef_construction},
              "IVF_FLAT": {"nlist": cfg.nlist},
              "GPU_IVF_PQ": {"nlist": cfg.nlist, "m": cfg.pq_m or 0, "nbits": cfg.pq_bits},
              }.get(kind, {})
    if kind == "GPU_IVF_PQ" and not cfg.pq_m:
        params.pop("m")  # Milvus picks dim / 2 (its own default) when m is left out
    return kind, params


def search_params(kind: str, cfg: IndexConfig, k: int) -> dict:
    """Search-time parameters: ef / itopk_size at least k (Milvus refuses less), nprobe for IVF kinds."""
    if kind == "HNSW":
        return {"ef": max(cfg.ef_search, k)}
    if kind in ("IVF_FLAT", "GPU_IVF_PQ"):
        return {"nprobe": cfg.nprobe}
    if kind == "GPU_CAGRA":
        return {"itopk_size": max(cfg.ef_search, k)}
    return {}


def _err(exc: Exception) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    return msg.splitlines()[0] if msg else type(exc).__name__


class MilvusIndex:
    """One recipe's collection: search (dense), text_search (BM25), upsert/delete by chunk id; a context
    manager. `placement` says where searches run (e.g. "milvus lite: HNSW ef=128, BM25 in Milvus")."""

    def __init__(self, cfg: IndexConfig, workspace_dir: Path, recipe_name: str):
        """Connect (a Lite file is created on first use); the collection is checked by open() or made by create()."""
        pymilvus = require_client(cfg)
        self.cfg = cfg
        self.uri = resolve_uri(cfg, workspace_dir)
        self.lite = not milvus_is_remote(cfg.uri)
        self.name = collection_name(cfg, recipe_name)
        if self.lite:
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        token = os.environ.get(cfg.token_env, "") if not self.lite else ""
        try:
            self.client = pymilvus.MilvusClient(uri=self.uri, token=token) if token else \
                pymilvus.MilvusClient(uri=self.uri)
        except Exception as exc:  # pymilvus raises its own hierarchy, and grpc/OS errors below it
            raise TrtragError(f"cannot connect to Milvus at {self.uri}: {_err(exc)}",
                              "start the Milvus server, or set index.uri to a Lite file such as milvus.db") from None
        self.kind, _ = dense_index(cfg, self.lite)
        self.placement = f"milvus {'lite' if self.lite else 'server'}: {self.kind}, BM25 in Milvus"

    def __enter__(self) -> "MilvusIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection."""
        if self.client is not None:
            self.client.close()
            self.client = None

    # ------------------------------------------------------------------------------------ state

    def exists(self) -> bool:
        """Whether the collection is there."""
        return bool(self.client.has_collection(self.name))

    def properties(self) -> dict:
        """The collection's trtrag.* properties ({} when there is no collection)."""
        if not self.exists():
            return {}
        props = self.client.describe_collection(self.name).get("properties") or {}
        return {k: v for k, v in props.items() if k.startswith("trtrag.")}

    def count(self) -> int:
        """Rows in the collection."""
        rows = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def check_chain(self, encoder_name: str, dim: int, fix: str) -> None:
        """Refuse a collection missing or made by another encoder or dimension; one line with `fix`."""
        props = self.properties()
        if not props:
            raise TrtragError(f"Milvus collection '{self.name}' is missing at {self.uri}", fix)
        built = (props.get("trtrag.encoder"), props.get("trtrag.dim"))
        if built != (encoder_name, str(dim)):
            raise TrtragError(f"Milvus collection '{self.name}' at {self.uri} holds vectors of encoder "
                              f"{built[0]} (dim {built[1]}), but this index uses {encoder_name} (dim {dim})", fix)

    def open(self, encoder_name: str, dim: int, fix: str) -> "MilvusIndex":
        """Check the chain and load the collection for searching."""
        self.check_chain(encoder_name, dim, fix)
        try:
            self.client.load_collection(self.name)
        except Exception as exc:
            raise TrtragError(f"cannot load Milvus collection '{self.name}': {_err(exc)}", fix) from None
        return self

    def create(self, chain: dict, lexical: dict) -> None:
        """Drop any collection of this name and make an empty one with the schema, indexes and chain."""
        from pymilvus import DataType, Function, FunctionType

        if self.exists():
            self.client.drop_collection(self.name)
        dim = int(chain["trtrag.dim"])
        schema = self.client.create_schema(auto_id=False, description="trtrag chunks: dense + BM25")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("chunk", DataType.VARCHAR, max_length=1024)
        schema.add_field("file", DataType.VARCHAR, max_length=4096)
        schema.add_field("terms", DataType.VARCHAR, max_length=MAX_TERMS, enable_analyzer=True,
                         analyzer_params={"tokenizer": "standard", "filter": ["lowercase"]})
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25,
                                     input_field_names=["terms"], output_field_names=["sparse"]))
        kind, params = dense_index(self.cfg, self.lite)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=kind, metric_type="IP", params=params)
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                        params={"bm25_k1": lexical["k1"], "bm25_b": lexical["b"]})
        props = {**chain, SYNC: ""}
        try:
            self.client.create_collection(self.name, schema=schema, index_params=index, properties=props)
        except Exception as exc:
            raise TrtragError(f"cannot create Milvus collection '{self.name}' ({kind}): {_err(exc)}",
                              "check index.milvus_index and its parameters against docs/milvus.md") from None
        self.kind = kind

    def set_sync(self, token: str) -> None:
        """Record which workspace generation the collection now matches ('' while it is being changed)."""
        self.client.alter_collection_properties(self.name, properties={SYNC: token})

    # ------------------------------------------------------------------------------------ writes

    def upsert(self, ids: np.ndarray, chunks: list[str], files: list[str], terms: list[str],
               vectors: np.ndarray) -> None:
        """Insert or replace rows by id, in batches."""
        for at in range(0, len(ids), BATCH):
            end = min(at + BATCH, len(ids))
            rows = [{"id": int(ids[i]), "chunk": chunks[i][:1024], "file": files[i][:4096],
                     "terms": terms[i][:MAX_TERMS], "vector": vectors[i].tolist()} for i in range(at, end)]
            self.client.upsert(self.name, rows)

    def delete(self, ids: np.ndarray) -> None:
        """Delete rows by id."""
        ids = [int(i) for i in ids]
        for at in range(0, len(ids), BATCH * 8):
            self.client.delete(self.name, ids=ids[at:at + BATCH * 8])

    # ------------------------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense top-k inner products per query row, as VectorIndex.search: (scores, ids), -1 ids past the end."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        hits = self.client.search(self.name, data=q.tolist(), anns_field="vector", limit=k, output_fields=["id"],
                                  search_params={"metric_type": "IP", "params": search_params(self.kind, self.cfg, k)})
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for i, row in enumerate(hits):
            for j, hit in enumerate(row[:k]):
                ids[i, j], scores[i, j] = hit["id"], hit["distance"]
        return scores, ids

    def text_search(self, terms: list[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """BM25 top-k per analysed query (terms joined by spaces): (ids, scores) best first; empty for ''."""
        out: list = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(terms)
        asked = [i for i, t in enumerate(terms) if t.strip()]
        if not asked:
            return out
        hits = self.client.search(self.name, data=[terms[i] for i in asked], anns_field="sparse", limit=k,
                                  output_fields=["id"], search_params={"metric_type": "BM25"})
        for i, row in zip(asked, hits):
            out[i] = (np.array([h["id"] for h in row], dtype=np.int64),
                      np.abs(np.array([h["distance"] for h in row], dtype=np.float32)))
        return out

