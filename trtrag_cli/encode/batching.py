"""Length-sorted batching shared by the encoder backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from trtrag_cli.util.errors import TrtragError

TOKENIZE_CHUNK = 8192  # texts tokenized and length-sorted together; bounds memory for huge lists


def length_sorted_batches(tokenizer, texts: Sequence[str], batch_size: int) -> Iterator[tuple[np.ndarray, list]]:
    """Yield (row indices into texts, token id lists), longest first, at most batch_size rows each.

    Longest first: each batch pads only to its own longest text, and the largest buffers are allocated
    on the first batch instead of growing later.
    """
    if batch_size < 1:
        raise TrtragError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start:start + TOKENIZE_CHUNK])
        # encode_batch fans out over threads; for one text that costs more than it saves.
        encodings = [tokenizer.encode(chunk[0])] if len(chunk) == 1 else tokenizer.encode_batch(chunk)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        order = np.argsort(-lengths, kind="stable")
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            yield start + rows, [encodings[i].ids for i in rows]


def encode_sorted(tokenizer, texts: Sequence[str], batch_size: int, dim: int,
                  embed: Callable[[list], np.ndarray], progress: Callable[[int], None] | None = None) -> np.ndarray:
    """float32 [len(texts), dim] in input order, embed(token id lists) run over length-sorted batches."""
    out = np.empty((len(texts), dim), dtype=np.float32)
    done = 0
    for rows, ids in length_sorted_batches(tokenizer, texts, batch_size):
        out[rows] = embed(ids)
        done += len(rows)
        if progress is not None:
            progress(done)
    return out


def pad(ids: list[list[int]], width: int):
    """Right-padded int64 input_ids and attention_mask for token id lists no longer than width."""
    import numpy as np

    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    attention_mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, :len(seq)] = seq
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask
