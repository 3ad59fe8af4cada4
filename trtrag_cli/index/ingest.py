"""Reading new and changed corpus files into chunk records, and embedding them with checkpoints."""

from __future__ import annotations

import hashlib

import numpy as np

from trtrag_cli.corpus.chunking import index_text
from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.errors import TrtragError


def chunk_files(entries, report, recipe: Recipe, tokenizer, dim: int):
    """Load and chunk the given files, large ones as streams. Returns chunk records (without vectors),
    sources per file, and {record index: vector} for records whose document brought its own embedding."""
    from trtrag_cli.corpus.chunking import chunk_documents, chunk_stream
    from trtrag_cli.corpus.loaders import iter_documents
    from trtrag_cli.corpus.streams import StreamedDocument
    from trtrag_cli.index.chunks import ChunkRecord

    size, overlap = recipe.chunking.max_tokens, recipe.chunking.overlap
    records, sources, given = [], {}, {}
    pending, pending_chars, file_of = [], 0, {}

    def add(chunks, embedded: dict) -> None:
        for ch in chunks:
            vec = embedded.get(ch.source)
            key = text_hash(index_text(ch.title, ch.text))
            if vec is not None:
                if ch.ordinal:
                    raise TrtragError(f"{ch.source}: documents with embeddings must fit one chunk (this one "
                                      f"is longer than chunking.max_tokens {size})",
                                      "raise chunking.max_tokens or split them")
                given[len(records)] = vec
                key = text_hash(key + vec.tobytes().hex())  # another vector, another hash
            records.append(ChunkRecord(id=ch.id, source=ch.source, file=file_of[ch.source], ordinal=ch.ordinal,
                                       title=ch.title, text=ch.text, hash=key))

    def flush() -> None:
        nonlocal pending, pending_chars
        # Many small documents in one call, so the tokenizer batches across files.
        add(chunk_documents(pending, tokenizer, size, overlap),
            {d.source: d.embedding for d in pending if d.embedding is not None})
        pending, pending_chars = [], 0

    for entry in entries:
        sources[entry.key] = []
        for doc in iter_documents(entry, report):
            sources[entry.key].append(doc.source)
            file_of[doc.source] = entry.key
            if isinstance(doc, StreamedDocument):
                add(chunk_stream(doc.source, doc.title, doc.lines(), tokenizer, size, overlap), {})
                continue
            if doc.embedding is not None and len(doc.embedding) != dim:
                raise TrtragError(f"{doc.source}: its embedding has {len(doc.embedding)} values but encoder.model "
                                  f"{recipe.encoder.model} makes {dim}",
                                  "set encoder.model to the model that made the embeddings, or drop the "
                                  "embedding field to have the text encoded")
            pending.append(doc)
            pending_chars += len(doc.text)
            if len(pending) >= 2048 or pending_chars >= 8 << 20:
                flush()
    flush()
    return records, sources, given


def text_hash(text: str) -> str:
    """A chunk text's key: identical texts share a vector (reuse across re-indexes, checkpoints)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def embed(encoder, recipe: Recipe, records, todo: list[int], vectors: np.ndarray, checkpoint, progress) -> int:
    """Embed records[todo] into vectors[todo], saving each CHECKPOINT_BATCHES batches to the checkpoint;
    rows the checkpoint already holds (a killed run's) are filled from it. Returns how many were resumed."""
    from trtrag_cli.index.checkpoint import CHECKPOINT_BATCHES

    saved = checkpoint.load()
    resumed = [i for i in todo if records[i].hash in saved]
    for i in resumed:
        vectors[i] = saved[records[i].hash]
    rest = [i for i in todo if records[i].hash not in saved]
    del saved
    step = recipe.encoder.batch_size * CHECKPOINT_BATCHES
    for at in range(0, len(rest), step):
        part = rest[at:at + step]
        texts = [index_text(records[i].title, records[i].text) for i in part]
        cb = (lambda n, at=at: progress("embed", at + n, len(rest))) if progress else None
        vectors[part] = encoder.encode(texts, batch_size=recipe.encoder.batch_size, progress=cb)
        checkpoint.save([records[i].hash for i in part], vectors[part])
    return len(resumed)
