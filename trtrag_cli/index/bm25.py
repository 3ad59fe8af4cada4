"""BM25 side of hybrid retrieval: per-segment postings, scored with statistics shared by all segments.

Why not bm25s's index: bm25s stores scores precomputed with its corpus' idf, so segments indexed apart
could not be compared, and its query path fills a dense array of one score per document (a 1M-chunk
index: 4 MB written and an argpartition over 1M per query). Here each segment keeps raw postings (term
hash -> documents and term frequencies, memory-mapped), and a query reads only the postings of its
terms. Scores are bm25s's "lucene" BM25 (same k1, b, idf and length normalisation; a test checks they
agree) with N, document frequencies and the average length summed over every segment of the
generation, so a chunk scores the same whichever segment holds it. Dead rows (tombstones) still count
in those statistics until compaction drops them, as in Lucene: a re-index of 1% of the files moves idf
by about that much, and `trtrag index --compact` makes them exact again.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from trtrag_cli.recipe.schema import LexicalConfig
from trtrag_cli.util.deps import require
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.workspace import REBUILD_HINT

_WORD = re.compile(r"(?u)\b\w\w+\b")
BM25_DIR = "bm25"
_FILES = ("terms", "indptr", "docs", "tfs", "doclen")
POSTINGS_FILES = tuple(f"{BM25_DIR}/{name}.npy" for name in _FILES)  # a segment's postings, relative to it


class Analyzer:
    """Lower-case, split into words, drop stop words, stem; the same for documents and queries."""

    def __init__(self, cfg: LexicalConfig):
        self.stopwords: frozenset[str] = frozenset()
        if cfg.stopwords:
            # bm25s imports jax when it is installed (for a top-k we do not use), and jax claims 75% of the
            # GPU when it starts (seen: 58 GB of an H100, beside a 13B generator that then ran out of memory).
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            stop = require("bm25s", "BM25 stop words").stopwords
            table = {"en": "STOPWORDS_EN", "english": "STOPWORDS_EN"}
            name = table.get(cfg.stopwords, f"STOPWORDS_{cfg.stopwords.upper()}")
            if not hasattr(stop, name):
                raise TrtragError(f"unknown stop-word list '{cfg.stopwords}'", "use lexical.stopwords: en, or ''")
            self.stopwords = frozenset(getattr(stop, name))
        self._stem = None
        if cfg.stemmer:
            stemmer_mod = require("Stemmer", "BM25 stemming")
            try:
                self._stem = stemmer_mod.Stemmer(cfg.stemmer).stemWord
            except KeyError:
                raise TrtragError(f"unknown stemmer language '{cfg.stemmer}'",
                                  "use lexical.stemmer: english, or '' to disable") from None
        self._cache: dict[str, str] = {}

    def terms(self, text: str) -> list[str]:
        """Index terms of a text."""
        words = [w for w in _WORD.findall(text.lower()) if w not in self.stopwords]
        if self._stem is None:
            return words
        cache = self._cache
        out = []
        for w in words:
            s = cache.get(w)
            if s is None:
                s = cache[w] = self._stem(w)
            out.append(s)
        return out


def term_hash(term: str) -> int:
    """The int64 key a term is stored under (64-bit hashes: a collision is not expected below ~10^9 terms)."""
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=8).digest(), "little", signed=True)


class FileArray:
    """A 1-d array in a .npy file whose slices are read with pread: a query reads the postings of its few
    terms, and reading them through a memory map would map the neighbouring pages too (the serving
    process grows by what the page cache holds). np.asarray() gives the whole array, memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        whole = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if whole.ndim != 1:
            raise ValueError(f"{self.path.name} is not one-dimensional")
        self.dtype, self.offset, self.size = whole.dtype, whole.offset, len(whole)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> np.ndarray:
        lo, hi, _ = part.indices(self.size)
        n = max(0, hi - lo)
        data = os.pread(self._fd, n * self.dtype.itemsize, self.offset + lo * self.dtype.itemsize)
        if len(data) != n * self.dtype.itemsize:
            raise TrtragError(f"{self.path} ends early", REBUILD_HINT)
        return np.frombuffer(data, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


class Postings:
    """One segment's postings: for each term (sorted by hash) the documents holding it and how often."""

    def __init__(self, terms, indptr, docs, tfs, doclen):
        self.terms, self.indptr, self.docs, self.tfs, self.doclen = terms, indptr, docs, tfs, doclen
        self.length_sum = float(np.sum(doclen, dtype=np.float64))

    @classmethod
    def build(cls, term_lists: Iterable[list[str]]) -> "Postings":
        """Postings of documents given as analysed term lists, in row order."""
        vocab: dict[str, int] = {}
        term_ids, tf_parts, doc_parts, lengths = [], [], [], []
        for doc, terms in enumerate(term_lists):
            lengths.append(len(terms))
            if not terms:
                continue
            counts = Counter(terms)
            term_ids.append(np.fromiter((vocab.setdefault(t, len(vocab)) for t in counts), np.int64, len(counts)))
            tf_parts.append(np.fromiter(counts.values(), np.float32, len(counts)))
            doc_parts.append(np.full(len(counts), doc, dtype=np.int32))
        return cls.from_entries(np.array([term_hash(t) for t in vocab], dtype=np.int64),
                                _cat(term_ids, np.int64), _cat(doc_parts, np.int32), _cat(tf_parts, np.float32),
                                np.array(lengths, dtype=np.int32))

    @classmethod
    def from_entries(cls, hashes: np.ndarray, term_of: np.ndarray, docs: np.ndarray, tfs: np.ndarray,
                     doclen: np.ndarray) -> "Postings":
        """Postings from (term number, document, tf) entries listed in document order, where
        hashes[term number] is the term's key."""
        keys, rank = np.unique(hashes, return_inverse=True)  # sorted keys; equal keys (collisions) merge
        rank = rank[term_of] if len(term_of) else term_of
        order = np.argsort(rank, kind="stable")  # stable: documents stay ascending within each term
        indptr = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rank, minlength=len(keys)), out=indptr[1:])
        return cls(keys.astype(np.int64), indptr, docs[order].astype(np.int32), tfs[order].astype(np.float32),
                   doclen.astype(np.int32))

    @classmethod
    def merge(cls, parts: list[tuple["Postings", np.ndarray]]) -> "Postings":
        """One segment's postings from several (postings, dead rows mask), in row order: dead documents
        dropped, the rest renumbered one after another. Each part is sorted by (term, document) already,
        so a stable sort by term merges them without comparing documents."""
        hashes, docs, tfs, lengths, base = [], [], [], [], 0
        for p, dead in parts:
            new_row = np.cumsum(~dead) - 1 + base
            term = np.repeat(np.asarray(p.terms), np.diff(np.asarray(p.indptr)))
            d = np.asarray(p.docs)
            keep = ~dead[d]
            hashes.append(term[keep])
            docs.append(new_row[d[keep]].astype(np.int32))
            tfs.append(np.asarray(p.tfs)[keep])
            lengths.append(np.asarray(p.doclen)[~dead])
            base += int((~dead).sum())
        h = _cat(hashes, np.int64)
        order = np.argsort(h, kind="stable")  # timsort: linear-ish over a few sorted runs
        h = h[order]
        starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else np.zeros(0, dtype=np.int64)
        indptr = np.append(starts, len(h)).astype(np.int64)
        return cls(h[starts], indptr, _cat(docs, np.int32)[order], _cat(tfs, np.float32)[order],
                   _cat(lengths, np.int32))

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """Position of each term hash in this segment's vocabulary (-1 where absent)."""
        if not len(self.terms):
            return np.full(len(hashes), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.terms, hashes), 0, len(self.terms) - 1)
        return np.where(self.terms[pos] == hashes, pos, -1)

    def save(self, folder: Path) -> None:
        """Write the five arrays into folder."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in _FILES:
            np.save(folder / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, folder: Path) -> "Postings":
        """Memory-map a saved segment's postings."""
        try:
            arrays = [FileArray(folder / f"{name}.npy") if name in ("docs", "tfs")
                      else np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _FILES]
        except (OSError, ValueError, EOFError) as exc:
            raise TrtragError(f"cannot read BM25 postings '{folder}': {exc}",
                              REBUILD_HINT) from None
        terms, indptr, docs, tfs, _ = arrays
        if len(indptr) != len(terms) + 1 or len(docs) != len(tfs) or (len(indptr) and indptr[-1] != len(docs)):
            raise TrtragError(f"BM25 postings '{folder}' are inconsistent",
                              REBUILD_HINT)
        return cls(*arrays)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


@dataclass
class LexicalScores:
    """A query's BM25 scores of the rows that hold one of its terms: rows ascending, scores aligned."""

    rows: np.ndarray
    scores: np.ndarray

    def top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n best rows with a positive score, best first (ties: lower row first)."""
        keep = self.scores > 0
        rows, scores = self.rows[keep], self.scores[keep]
        if len(rows) > n:
            part = np.argpartition(-scores, n - 1)[:n]
            rows, scores = rows[part], scores[part]
        order = np.lexsort((rows, -scores))
        return rows[order], scores[order]

    def at(self, rows: np.ndarray) -> np.ndarray:
        """Scores of the given rows (0 for rows holding no query term)."""
        if not len(self.rows):
            return np.zeros(len(rows), dtype=np.float32)
        pos = np.clip(np.searchsorted(self.rows, rows), 0, len(self.rows) - 1)
        return np.where(self.rows[pos] == rows, self.scores[pos], 0.0).astype(np.float32)


class LexicalIndex:
    """BM25 over the segments of one generation (store.segments' postings), dead rows never returned."""

    def __init__(self, cfg: LexicalConfig, postings: list[Postings], offsets: np.ndarray,
                 dead: list[np.ndarray] | None = None):
        self.cfg = cfg
        self.analyzer = Analyzer(cfg)
        self.postings = postings
        self.offsets = offsets
        self.dead = dead or [np.zeros(len(p.doclen), dtype=bool) for p in postings]
        self.n_docs = sum(len(p.doclen) for p in postings)
        self.avgdl = max(sum(p.length_sum for p in postings) / max(self.n_docs, 1), 1e-9)
        # BM25's length normalisation of every document, k1 * (1 - b + b * dl / avgdl): 4 bytes a chunk,
        # computed once here rather than for each query term's postings.
        k1, b = cfg.k1, cfg.b
        self._norm = [(k1 * ((1 - b) + b * np.asarray(p.doclen, dtype=np.float32) / self.avgdl)).astype(np.float32)
                      for p in postings]

    def _df(self, hashes: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Documents holding each term over all segments, and each term's position per segment."""
        df = np.zeros(len(hashes), dtype=np.float64)
        where = []
        for p in self.postings:
            pos = p.find(hashes)
            found = pos >= 0
            df[found] += np.asarray(p.indptr)[pos[found] + 1] - np.asarray(p.indptr)[pos[found]]
            where.append(pos)
        return df, where

    def _idf(self, df: np.ndarray) -> np.ndarray:
        return np.log1p((self.n_docs - df + 0.5) / (df + 0.5))

    def idf(self, term: str) -> float:
        """BM25 inverse document frequency of an analysed term (0 when no chunk holds it)."""
        df, _ = self._df(np.array([term_hash(term)], dtype=np.int64))
        return float(self._idf(df)[0]) if df[0] else 0.0

    def match(self, query: str) -> LexicalScores:
        """BM25 scores of the live rows that hold a term of the query (a repeated term counts twice)."""
        hashes = np.array([term_hash(t) for t in self.analyzer.terms(query)], dtype=np.int64)
        df, where = self._df(hashes)
        idf = self._idf(df).astype(np.float32)
        all_rows, all_scores = [], []
        for s, (p, pos) in enumerate(zip(self.postings, where)):
            docs, contrib = [], []
            for i in np.flatnonzero(pos >= 0).tolist():
                lo, hi = int(p.indptr[pos[i]]), int(p.indptr[pos[i] + 1])
                d, tf = np.asarray(p.docs[lo:hi]), np.asarray(p.tfs[lo:hi])
                docs.append(d)
                contrib.append(idf[i] * tf / (self._norm[s][d] + tf))
            if not docs:
                continue
            d, c = np.concatenate(docs), np.concatenate(contrib)
            if len(docs) > 1:  # sum the terms of each document: sort by document, add up runs
                order = np.argsort(d, kind="stable")
                d, c = d[order], c[order]
                starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
                d, c = d[starts], np.add.reduceat(c, starts)
            live = ~self.dead[s][d]
            all_rows.append(d[live].astype(np.int64) + self.offsets[s])
            all_scores.append(c[live].astype(np.float32))
        if not all_rows:
            return LexicalScores(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        return LexicalScores(np.concatenate(all_rows), np.concatenate(all_scores))

    def match_many(self, queries: list[str | None]) -> list[LexicalScores | None]:
        """match() of each query (None for None)."""
        return [None if q is None else self.match(q) for q in queries]

    @classmethod
    def open(cls, cfg: LexicalConfig, folders: list[Path], offsets: np.ndarray,
             dead: list[np.ndarray] | None = None) -> "LexicalIndex":
        """The postings of each segment folder (their bm25/ subfolders), memory-mapped."""
        return cls(cfg, [Postings.load(Path(f) / BM25_DIR) for f in folders], offsets, dead)

    @classmethod
    def from_texts(cls, cfg: LexicalConfig, texts: list[str]) -> "LexicalIndex":
        """An in-memory index of one segment of texts (tests, the extractive answer's stand-alone use)."""
        analyzer = Analyzer(cfg)
        postings = Postings.build(analyzer.terms(t) for t in texts)
        return cls(cfg, [postings], np.array([0, len(texts)], dtype=np.int64))
