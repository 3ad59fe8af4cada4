"""Compaction: the live rows of several segments merged into one new base segment.

Nothing is re-read as Python objects or re-tokenised: SQLite copies the live records between files,
vectors are streamed into the new `vectors.npy` a block at a time, and BM25 postings are merged as arrays
(bm25.Postings.merge). The recipe's faiss index (ivf/ivfpq/hnsw) is trained anew over the merged vectors,
which is what costs time at scale (k-means); flat needs none. The old segments stay untouched until no
generation lists them, so a compaction killed at any point leaves the live index as it was.
"""

from __future__ import annotations

import sqlite3

import numpy as np

from trtrag_cli.index.bm25 import BM25_DIR, Postings
from trtrag_cli.index.chunks import CHUNKS_DB, SCHEMA, VECTORS, Segment, finish_segment
from trtrag_cli.index.generation import SegmentWriter, write_faiss
from trtrag_cli.util.workspace import SEGMENTS_DIR

_BLOCK = 1 << 16


def _copy_records(db, parts: list[tuple[Segment, np.ndarray]]) -> None:
    """Live rows of each segment's chunks.sqlite, in order, into a new file; row numbers run on."""
    conn = sqlite3.connect(f"file:{db}", uri=True)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute(SCHEMA)
        for seg, dead in parts:
            conn.execute("ATTACH DATABASE ? AS src", (f"file:{seg.folder / CHUNKS_DB}?mode=ro&immutable=1",))
            conn.execute("CREATE TEMP TABLE dead (row INTEGER PRIMARY KEY)")
            conn.executemany("INSERT INTO temp.dead VALUES (?)", ((int(r) + 1,) for r in np.flatnonzero(dead)))
            conn.execute("INSERT INTO chunks SELECT NULL, id, source, file, ordinal, title, text, hash FROM src.chunks "
                         "WHERE row NOT IN (SELECT row FROM temp.dead) ORDER BY row")
            conn.execute("DROP TABLE temp.dead")
            conn.commit()
            conn.execute("DETACH DATABASE src")
        conn.execute("CREATE INDEX chunks_file ON chunks (file)")
        conn.commit()
    finally:
        conn.close()


def compact_segments(index_root, segments: list[tuple[str, int, np.ndarray]], index_cfg, faiss_base: bool,
                     progress=None) -> tuple[str, int, np.ndarray]:
    """Merge (segment name, rows, dead mask) in row order into a new segment; returns its entry, no row dead."""
    parts = [(Segment(index_root / SEGMENTS_DIR / name), dead) for name, _, dead in segments]
    live = sum(int((~dead).sum()) for _, dead in parts)
    dim = next((seg.dim for seg, _ in parts if seg.rows), 0)
    try:
        with SegmentWriter(index_root) as w:
            _copy_records(w.tmp / CHUNKS_DB, parts)
            vectors = np.lib.format.open_memmap(w.tmp / VECTORS, mode="w+", dtype=np.float32, shape=(live, dim))
            ids, at = [], 0
            for n, (seg, dead) in enumerate(parts):
                for lo in range(0, seg.rows, _BLOCK):
                    keep = ~dead[lo:lo + _BLOCK]
                    block = np.asarray(seg.vectors[lo:lo + _BLOCK])[keep]
                    vectors[at:at + len(block)] = block
                    at += len(block)
                ids.append(np.asarray(seg.ids)[~dead])
                if progress:
                    progress("compact", n + 1, len(parts) + 1)
            vectors.flush()
            ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
            Postings.merge([(Postings.load(seg.folder / BM25_DIR), dead) for seg, dead in parts]).save(
                w.tmp / BM25_DIR)
            meta = write_faiss(w.tmp, vectors, ids, index_cfg) if faiss_base else {"nlist_built": None}
            del vectors
            finish_segment(w.tmp, ids, None, meta)
            name = w.publish({})
        if progress:
            progress("compact", len(parts) + 1, len(parts) + 1)
    finally:
        for seg, _ in parts:
            seg.close()
    return name, live, np.zeros(live, dtype=bool)
