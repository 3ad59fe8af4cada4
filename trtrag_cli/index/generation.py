"""Index generations made of segments: what a generation's folder holds, and writing a new segment.

A generation folder (`index/gen-*`) holds `manifest.json` (what was indexed and how; `segments` lists
the segments in row order with their row and dead counts), `dead-<segment>.npy` (the dead local rows of
a segment, sorted), `SEGMENTS` (the segment names, one per line, read by the workspace's garbage
collection) and `recipe.yaml`. Segments live in `index/segments/`, shared by the generations that list
them, so publishing a re-index copies nothing it did not change.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from trtrag_cli.index.bm25 import POSTINGS_FILES
from trtrag_cli.index.chunks import (CHUNKS_DB, FAISS_FILE, IDS, ORDER, REBUILD_HINT, SEGMENT_META, VECTORS, ChunkRecord,
                                     ChunkStore, Segment, damaged, finish_segment, int_id, segment_meta,
                                     write_records)
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import read_json, write_json
from trtrag_cli.util.workspace import SEGMENT_LIST, SEGMENTS_DIR

MANIFEST = "manifest.json"
LAYOUT = 2  # 2: segments + tombstones; 1 (single chunks.jsonl + vectors.npy) is rebuilt, not read
_FINGERPRINTED = (CHUNKS_DB, VECTORS, IDS, ORDER, FAISS_FILE, *POSTINGS_FILES)


def load_index_manifest(gen: Path) -> dict:
    """An index generation's manifest.json (what was indexed, with which encoder and settings), refusing
    one that this version cannot read: damaged, of another layout, or without the encoder's name and dim."""
    try:
        manifest = read_json(gen / MANIFEST)
    except TrtragError as exc:
        raise TrtragError(f"the index in '{gen}' is damaged: {exc.message}", REBUILD_HINT) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("encoder"), dict):
        raise TrtragError(f"the index in '{gen}' is damaged: {MANIFEST} is not an index manifest", REBUILD_HINT)
    layout = manifest.get("layout")
    if layout != LAYOUT:
        what = "records no layout" if layout is None else f"has layout {layout!r}"
        raise TrtragError(f"the index in '{gen}' was written by another trtrag version: its {MANIFEST} {what}, "
                          f"this version reads layout {LAYOUT}", REBUILD_HINT)
    enc = manifest["encoder"]
    if not isinstance(enc.get("name"), str) or not isinstance(enc.get("dim"), int):
        raise TrtragError(f"the index in '{gen}' was written by another trtrag version: its {MANIFEST} records "
                          "no encoder name and dimension", REBUILD_HINT)
    segs = manifest.get("segments")
    if not isinstance(segs, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in segs):
        raise damaged(gen, f"{MANIFEST} lists no segments")
    for s in segs:  # a name is one folder in index/segments/: never a path that leads elsewhere
        if not s["name"].startswith("seg-") or "/" in s["name"] or "\\" in s["name"]:
            raise damaged(gen, f"{MANIFEST} lists a segment named {s['name']!r}")
    return manifest


def _fingerprint(path: Path) -> list:
    """[size, hash of the first and last 64 KiB]: cheap at any size, and a truncated, replaced or garbled
    file no longer matches (a full hash of a 1M-chunk segment would cost seconds on every open)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
        fh.seek(max(0, size - (1 << 16)))
        tail = fh.read(1 << 16)
    return [size, hashlib.blake2b(head + tail, digest_size=8).hexdigest()]


def verify_segment(seg: Segment) -> None:
    """Compare a segment's files with the fingerprints it was written with; raise `damaged` on a mismatch."""
    files = seg.meta.get("files") or {}
    if not isinstance(files, dict):
        raise damaged(seg.folder, "its segment.json lists no file fingerprints")
    for name, want in files.items():
        path = seg.folder / name
        try:
            got = _fingerprint(path)
        except OSError as exc:
            raise damaged(seg.folder, str(exc)) from None
        if got != want:
            raise damaged(seg.folder, f"{name} changed since it was written ({got[0]} bytes, {want[0]} expected)")


def open_store(gen: Path, manifest: dict, verify: bool = True) -> ChunkStore:
    """The chunk store of a generation: its segments (fingerprints checked) and their dead rows."""
    root = gen.parent / SEGMENTS_DIR
    segments, dead = [], []
    try:
        for entry in manifest["segments"]:
            seg = Segment(root / entry["name"])
            if verify:
                verify_segment(seg)
            if seg.rows != entry.get("rows"):
                raise damaged(gen, f"segment {seg.name} holds {seg.rows} rows, the manifest says {entry.get('rows')}")
            mask = np.zeros(seg.rows, dtype=bool)
            path = gen / f"dead-{seg.name}.npy"
            if path.exists():
                try:
                    rows = np.load(path, allow_pickle=False)
                except (OSError, ValueError, EOFError) as exc:
                    raise damaged(gen, f"{path.name}: {exc}") from None
                if rows.dtype != np.int64 or (len(rows) and (rows.min() < 0 or rows.max() >= seg.rows)):
                    raise damaged(gen, f"{path.name} names rows that segment {seg.name} does not have")
                mask[rows] = True
            if int(mask.sum()) != entry.get("dead", 0):
                raise damaged(gen, f"{path.name} holds {int(mask.sum())} dead rows, the manifest says {entry.get('dead')}")
            segments.append(seg)
            dead.append(mask)
    except BaseException:
        for seg in segments:
            seg.close()
        raise
    return ChunkStore(segments, dead)


def write_generation_files(gen: Path, store_segments: list[tuple[str, int, np.ndarray]]) -> list[dict]:
    """Write the dead-row files and SEGMENTS of a new generation folder; returns the manifest's list.
    store_segments: (segment name, rows, dead mask) in row order."""
    out = []
    for name, rows, mask in store_segments:
        if mask.any():
            np.save(gen / f"dead-{name}.npy", np.flatnonzero(mask).astype(np.int64))
        out.append({"name": name, "rows": int(rows), "dead": int(mask.sum())})
    (gen / SEGMENT_LIST).write_text("".join(f"{e['name']}\n" for e in out), encoding="utf-8")
    return out


class SegmentWriter:
    """A segment being written under a temporary name in index/segments/; `publish` names it for good."""

    def __init__(self, index_root: Path):
        self.root = index_root / SEGMENTS_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".tmp-seg-", dir=self.root))

    def __enter__(self) -> "SegmentWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def publish(self, meta: dict) -> str:
        """Fingerprint the files, write segment.json, rename the folder into place; returns its name."""
        files = {name: _fingerprint(self.tmp / name) for name in _FINGERPRINTED if (self.tmp / name).is_file()}
        name = f"seg-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self.tmp.name[-6:]}"
        meta_path = self.tmp / SEGMENT_META
        current = read_json(meta_path)
        write_json(meta_path, {**current, **meta, "files": files})
        os.rename(self.tmp, self.root / name)
        return name


def write_faiss(folder: Path, vectors: np.ndarray, ids: np.ndarray, index_cfg) -> dict:
    """The recipe's faiss index (ivf/ivfpq/hnsw) over a base segment's vectors, saved in its folder;
    returns what segment.json records of it (nothing to build for no vectors)."""
    from trtrag_cli.index.vectors import VectorIndex

    if not len(ids):
        return {"nlist_built": None}
    vindex = VectorIndex(index_cfg, vectors.shape[1])
    vindex.build(np.asarray(vectors), ids)
    vindex.save(folder / FAISS_FILE)
    return {"nlist_built": vindex.nlist(), "kind": vindex.kind()}


def write_segment(index_root: Path, records: list[ChunkRecord], vectors: np.ndarray, analyzer, index_cfg,
                  faiss_base: bool, texts=None) -> tuple[str, dict]:
    """Write records (row order), their vectors and BM25 postings as a new segment; faiss_base: also the
    recipe's faiss index (ivf/ivfpq/hnsw) over them. Returns (name, segment meta)."""
    from trtrag_cli.corpus.chunking import index_text
    from trtrag_cli.index.bm25 import BM25_DIR, Postings
    ids = np.array([int_id(r.id) for r in records], dtype=np.int64)
    with SegmentWriter(index_root) as w:
        write_records(w.tmp / CHUNKS_DB, records)
        texts = texts if texts is not None else (index_text(r.title, r.text) for r in records)
        Postings.build(analyzer.terms(t) for t in texts).save(w.tmp / BM25_DIR)
        meta = write_faiss(w.tmp, vectors, ids, index_cfg) if faiss_base else {"nlist_built": None}
        finish_segment(w.tmp, ids, vectors, meta)
        name = w.publish({})
    return name, segment_meta(index_root / SEGMENTS_DIR / name)
