"""BM25 side of hybrid retrieval, over the same chunks as the vector index (row i = chunk i)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from trtrag_cli.recipe.schema import LexicalConfig
from trtrag_cli.util.deps import require
from trtrag_cli.util.errors import TrtragError

_WORD = re.compile(r"(?u)\b\w\w+\b")


class Analyzer:
    """Lower-case, split into words, drop stop words, stem; the same for documents and queries."""

    def __init__(self, cfg: LexicalConfig):
        self.stopwords: frozenset[str] = frozenset()
        if cfg.stopwords:
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


class LexicalIndex:
    """bm25s over chunk texts; `scores(query)` gives one BM25 score per chunk row."""

    def __init__(self, cfg: LexicalConfig, bm25=None):
        self.cfg = cfg
        self.analyzer = Analyzer(cfg)
        self._bm25 = bm25

    def build(self, texts: list[str]) -> None:
        """Index the chunk texts in row order."""
        bm25s = require("bm25s", "BM25")
        self._bm25 = bm25s.BM25(k1=self.cfg.k1, b=self.cfg.b)
        # bm25s rejects an all-empty corpus; a placeholder term keeps row numbering intact.
        tokens = [self.analyzer.terms(t) or ["\x00empty"] for t in texts]
        self._bm25.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk for the query (zeros when no query term is known)."""
        terms = [t for t in self.analyzer.terms(query) if t in self._bm25.vocab_dict]
        if not terms:
            return np.zeros(self._bm25.scores["num_docs"], dtype=np.float32)
        return self._bm25.get_scores(terms)

    def scores_many(self, queries: list[str | None]) -> list[np.ndarray | None]:
        """scores() of each query (None for None). bm25s's batch API, `retrieve`, loops over get_scores
        and keeps only each query's top-k; hybrid fusion needs the score of every dense candidate too."""
        return [None if q is None else self.scores(q) for q in queries]

    def idf(self, term: str) -> float:
        """BM25 inverse document frequency of an analysed term (0 when unknown)."""
        tid = self._bm25.vocab_dict.get(term)
        if tid is None:
            return 0.0
        indptr = self._bm25.scores["indptr"]
        df = float(indptr[tid + 1] - indptr[tid])
        n = float(self._bm25.scores["num_docs"])
        return float(np.log(1.0 + (n - df + 0.5) / (df + 0.5)))

    def save(self, folder: Path) -> None:
        """Persist the index (no corpus copy: the chunk store has the texts)."""
        self._bm25.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path, cfg: LexicalConfig) -> "LexicalIndex":
        """Load a saved BM25 index."""
        bm25s = require("bm25s", "BM25")
        try:
            bm25 = bm25s.BM25.load(str(folder), mmap=False, show_progress=False)
        except (OSError, ValueError) as exc:
            raise TrtragError(f"cannot read BM25 index '{folder}': {exc}",
                              "rebuild it: trtrag index <corpus> --rebuild (calibration and engines are kept)") from None
        return cls(cfg, bm25)
