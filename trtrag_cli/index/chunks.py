"""The chunk store: immutable segments of chunk records and vectors, read from disk rather than loaded.

A segment is a folder under `<workspace>/index/segments/`: `chunks.sqlite` (one row per chunk, keyed by
row number), `vectors.npy` and `ids.npy` (memory-mapped, row-aligned), `order.npy` (ids sorted, for id
lookups) and its BM25 postings (index/bm25.py). A generation lists the segments it reads and, per
segment, the dead rows (tombstones) of chunks that were removed or replaced later. Nothing in a segment
changes after it is written, so a re-index writes only a segment of what changed, and compaction
(index/compact.py) writes one segment of the live rows and drops the rest once no generation uses them.

Rows: the store numbers the rows of its segments one after another (global rows); ranking, BM25 and
faiss results are global rows, and a dead row is never returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import atomic_path
from trtrag_cli.util.workspace import REBUILD_HINT

CHUNKS_DB = "chunks.sqlite"
VECTORS = "vectors.npy"
IDS = "ids.npy"
ORDER = "order.npy"
SEGMENT_META = "segment.json"
FAISS_FILE = "vectors.faiss"  # a base segment's faiss index (ivf/ivfpq/hnsw; flat searches the vectors)
_FIELDS = ("id", "source", "file", "ordinal", "title", "text", "hash")
SCHEMA = ("CREATE TABLE chunks (row INTEGER PRIMARY KEY, id TEXT, source TEXT, file TEXT, ordinal INTEGER, "
          "title TEXT, text TEXT, hash TEXT)")  # row = local row + 1 (SQLite's rowid counts from 1)


@dataclass
class ChunkRecord:
    """One retrievable passage and where it came from."""

    id: str
    source: str
    file: str
    ordinal: int
    title: str
    text: str
    hash: str


def int_id(chunk_id: str) -> int:
    """Stable non-negative int64 id of a chunk id string (faiss ids must be int64)."""
    return int.from_bytes(hashlib.blake2b(chunk_id.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def damaged(folder: Path, what: str) -> TrtragError:
    """The one error of an index whose files cannot be read, with the command that rebuilds it."""
    return TrtragError(f"the index in '{folder}' is damaged: {what}", REBUILD_HINT)


def write_records(db_path: Path, records: Iterable[ChunkRecord]) -> int:
    """Write chunk records to a new SQLite file in row order (row 0 first); returns the row count."""
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute(SCHEMA)
        conn.executemany("INSERT INTO chunks VALUES (NULL, ?, ?, ?, ?, ?, ?, ?)",
                         ((r.id, r.source, r.file, r.ordinal, r.title, r.text, r.hash) for r in records))
        conn.execute("CREATE INDEX chunks_file ON chunks (file)")
        conn.commit()
        return conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    finally:
        conn.close()


def segment_meta(folder: Path) -> dict:
    """A segment's segment.json (rows, index kind, nlist_built, file fingerprints)."""
    return json.loads((Path(folder) / SEGMENT_META).read_text(encoding="utf-8"))


def finish_segment(folder: Path, ids: np.ndarray, vectors: np.ndarray | None, meta: dict) -> None:
    """Write a segment's row-aligned arrays and its segment.json (last: a folder without it is unfinished).
    vectors None: the caller wrote vectors.npy itself (compaction streams it)."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    if len(ids) and np.any(np.diff(ids[order]) == 0):
        raise TrtragError("two chunks share an id", "make document ids unique and re-run trtrag index")
    if vectors is not None:
        np.save(folder / VECTORS, np.ascontiguousarray(vectors, dtype=np.float32))
    np.save(folder / IDS, ids)
    np.save(folder / ORDER, order)
    with atomic_path(folder / SEGMENT_META) as tmp:
        tmp.write_text(json.dumps({**meta, "rows": int(len(ids))}), encoding="utf-8")


class Segment:
    """One segment, read-only: records through SQLite, vectors and ids memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.name = self.folder.name
        try:
            self.meta = json.loads((self.folder / SEGMENT_META).read_text(encoding="utf-8"))
            self.vectors = np.load(self.folder / VECTORS, mmap_mode="r", allow_pickle=False)
            self.ids = np.load(self.folder / IDS, mmap_mode="r", allow_pickle=False)
            self._order = np.load(self.folder / ORDER, mmap_mode="r", allow_pickle=False)
            if not (self.folder / CHUNKS_DB).is_file():
                raise FileNotFoundError(f"No such file: {self.folder / CHUNKS_DB}")
        except (OSError, ValueError, TypeError, EOFError) as exc:  # EOFError: an empty .npy
            raise damaged(self.folder, str(exc)) from None
        if not isinstance(self.meta, dict) or not isinstance(self.meta.get("rows"), int):
            raise damaged(self.folder, f"{SEGMENT_META} is not a segment's description")
        self.rows = self.meta["rows"]
        if (self.vectors.ndim != 2 or self.vectors.dtype != np.float32 or self.ids.dtype != np.int64
                or not (len(self.vectors) == len(self.ids) == len(self._order) == self.rows)):
            raise damaged(self.folder, f"{VECTORS}, {IDS} or {ORDER} do not match its {self.rows} rows")
        self._lock = threading.Lock()
        # Vectors of a few rows are read with pread, not through the memory map: a fault on a mapped page
        # maps its cached neighbours too, so reranking 200 random rows a question grew a 1M-chunk server by
        # 1.7 GB of mapped pages in 200 questions; read() leaves them in the page cache, outside the process.
        self._vec_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        try:
            self._vec_fd = os.open(self.folder / VECTORS, os.O_RDONLY)
        except OSError as exc:
            raise damaged(self.folder, str(exc)) from None
        # Opened now, not at the first read: an open file outlives its folder, so a store that is open keeps
        # answering even when a later index run prunes its generation.
        uri = f"file:{self.folder / CHUNKS_DB}?mode=ro&immutable=1"  # immutable: nothing rewrites a segment
        try:
            self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise damaged(self.folder, f"{CHUNKS_DB}: {exc}") from None

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a segment dropped without close() still gives its descriptors back
        self.close()

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def _query(self, sql: str, args=()) -> list[tuple]:
        """Run a read query; SQLite connections are not shared between threads, so one lock serialises them."""
        with self._lock:
            if self._conn is None:
                raise TrtragError(f"segment {self.name} was closed", "open the index again")
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise damaged(self.folder, f"{CHUNKS_DB}: {exc}") from None

    def check(self) -> None:
        """Read the record table's last row (one b-tree descent, not a scan): a damaged or short
        chunks.sqlite is an error here, not at a query."""
        (n,) = self._query("SELECT coalesce(max(row), 0) FROM chunks")[0]
        if n != self.rows:
            raise damaged(self.folder, f"{CHUNKS_DB} holds {n} rows, the segment {self.rows}")

    def select(self, fields: tuple[str, ...], rows: Iterable[int]) -> list[tuple]:
        """The given fields of local rows, in the order given."""
        rows = [int(r) for r in rows]
        found: dict[int, tuple] = {}
        for at in range(0, len(rows), 500):  # SQLite limits the parameters of one statement
            part = rows[at:at + 500]
            sql = f"SELECT row, {', '.join(fields)} FROM chunks WHERE row IN ({','.join('?' * len(part))})"
            found.update((row - 1, tuple(values)) for row, *values in self._query(sql, [r + 1 for r in part]))
        missing = [r for r in rows if r not in found]
        if missing:
            raise damaged(self.folder, f"{CHUNKS_DB} has no row {missing[0]}")
        return [found[r] for r in rows]

    def read_vectors(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), dim] float32 vectors of local rows, in the order given, read from the file."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        if self._vec_fd is None:
            raise TrtragError(f"segment {self.name} was closed", "open the index again")
        width = self.dim * 4
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) > 1) + 1  # runs of consecutive rows: one read each
        got = np.empty((len(rows), self.dim), dtype=np.float32)
        at = 0
        for run in np.split(sorted_rows, breaks):
            first, n = int(run[0]), int(run[-1] - run[0] + 1)
            data = os.pread(self._vec_fd, n * width, self.vectors.offset + first * width)
            if len(data) != n * width:
                raise damaged(self.folder, f"{VECTORS} ends before row {first + n}")
            block = np.frombuffer(data, dtype=np.float32).reshape(n, self.dim)
            got[at:at + len(run)] = block[run - first]
            at += len(run)
        out[order] = got
        return out

    def scan(self, fields: tuple[str, ...] = _FIELDS, batch: int = 10_000) -> Iterator[tuple[int, tuple]]:
        """(local row, field values) of every row in order, read a batch at a time."""
        cols = ", ".join(fields)
        at = 0
        while True:
            part = self._query(f"SELECT row, {cols} FROM chunks WHERE row > ? ORDER BY row LIMIT ?", (at, batch))
            if not part:
                return
            for row, *values in part:
                yield row - 1, tuple(values)
            at = part[-1][0]

    def rows_of_files(self, files: list[str]) -> list[tuple[int, str, str]]:
        """(local row, file, hash) of every row of the given files."""
        out = []
        for at in range(0, len(files), 500):
            part = files[at:at + 500]
            out += [(row - 1, f, h) for row, f, h in self._query(
                f"SELECT row, file, hash FROM chunks WHERE file IN ({','.join('?' * len(part))})", part)]
        return out

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Local rows of int64 ids (-1 where absent, e.g. faiss's empty slots)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.rows:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids, sorter=self._order), 0, self.rows - 1)
        rows = np.asarray(self._order[pos])
        return np.where(self.ids[rows] == ids, rows, -1)

    def close(self) -> None:
        """Close the SQLite connection and the vectors file (the memory maps go with the object)."""
        if not hasattr(self, "_lock"):  # __init__ failed before there was anything to close
            return
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._vec_fd is not None:
                os.close(self._vec_fd)
                self._vec_fd = None


class ChunkStore:
    """The segments of one generation and their dead rows; global row = segment offset + local row."""

    def __init__(self, segments: list[Segment], dead: list[np.ndarray] | None = None):
        self.segments = segments
        self.dead = dead if dead is not None else [np.zeros(s.rows, dtype=bool) for s in segments]
        self.offsets = np.cumsum([0] + [s.rows for s in segments]).astype(np.int64)
        dims = {s.dim for s in segments if s.rows}
        if len(dims) > 1:
            raise damaged(segments[0].folder.parent, f"its segments hold vectors of dimensions {sorted(dims)}")
        self.dim = dims.pop() if dims else 0
        self._live = int(sum(s.rows - int(d.sum()) for s, d in zip(segments, self.dead)))

    def __len__(self) -> int:
        """Live chunks."""
        return self._live

    @property
    def total_rows(self) -> int:
        """Rows of all segments, dead ones included (the global row numbering's size)."""
        return int(self.offsets[-1])

    def _split(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(segment number, positions in rows, local rows) for each segment that rows touch."""
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which).tolist():
            at = np.flatnonzero(which == s)
            yield s, at, rows[at] - self.offsets[s]

    def alive(self, rows: np.ndarray) -> np.ndarray:
        """Which of the global rows are live."""
        out = np.zeros(len(rows), dtype=bool)
        for s, at, local in self._split(rows):
            out[at] = ~self.dead[s][local]
        return out

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), dim] float32 vectors of global rows (read from the memory maps)."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for s, at, local in self._split(rows):
            out[at] = self.segments[s].read_vectors(local)
        return out

    def select(self, fields: tuple[str, ...], rows: Iterable[int]) -> list[tuple]:
        """The given fields of global rows, in the order given."""
        rows = np.fromiter((int(r) for r in rows), dtype=np.int64)
        out: list = [None] * len(rows)
        for s, at, local in self._split(rows):
            for i, values in zip(at.tolist(), self.segments[s].select(fields, local.tolist())):
                out[i] = values
        return out

    def records_of(self, rows: Iterable[int]) -> list[ChunkRecord]:
        """Records of global rows, in the order given."""
        return [ChunkRecord(*values) for values in self.select(_FIELDS, rows)]

    def sources_of(self, rows: Iterable[int]) -> list[str]:
        """The source (document) of each global row, in the order given."""
        return [values[0] for values in self.select(("source",), rows)]

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Global rows of the live chunks with these int64 ids (-1 where none)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(ids.shape, -1, dtype=np.int64)
        for s, seg in enumerate(self.segments):
            local = seg.rows_of(ids)
            hit = local >= 0
            hit[hit] = ~self.dead[s][local[hit]]
            out[hit] = local[hit] + self.offsets[s]
        return out

    def iter_records(self, fields: tuple[str, ...] = _FIELDS) -> Iterator[tuple[int, tuple]]:
        """(global row, field values) of every live chunk, segment by segment."""
        for s, seg in enumerate(self.segments):
            dead, base = self.dead[s], int(self.offsets[s])
            for row, values in seg.scan(fields):
                if not dead[row]:
                    yield base + row, values

    def live_rows(self) -> np.ndarray:
        """Every live global row, ascending."""
        return np.concatenate([np.flatnonzero(~d) + self.offsets[s] for s, d in enumerate(self.dead)]
                              or [np.zeros(0, dtype=np.int64)]).astype(np.int64)

    def sources(self) -> set[str]:
        """The distinct sources (documents) of the live chunks."""
        return {values[0] for _, values in self.iter_records(("source",))}

    def close(self) -> None:
        """Close every segment's SQLite connection."""
        for seg in self.segments:
            seg.close()
