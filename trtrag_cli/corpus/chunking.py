"""Documents -> chunks: token-bounded windows with overlap and stable ids.

Windows are measured in the encoder's own word-piece tokens (a `tokenizers.Tokenizer`), so a chunk
never exceeds what the encoder will see. Cuts fall between words, and where a sentence ends in the
last quarter of a window the window ends there instead, so chunks rarely stop mid-sentence.
Chunk ids are `"{source}#{ordinal}"`: the same document always gives the same ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

if TYPE_CHECKING:  # tokenizers is a compiled extension; keep it off the import path of `--help`
    from tokenizers import Tokenizer

    from trtrag_cli.corpus.loaders import Document

_SENTENCE_END = frozenset(".!?。！？\n")
_CLOSERS = frozenset("\"')]}»”’")  # `He said "stop."` ends a sentence after the quote
_BOUNDARY_ZONE = 0.25  # look for a sentence end in the last quarter of a window
_BATCH = 2048  # documents per encode_batch call: bounds memory on very large corpora


@dataclass(frozen=True)
class Chunk:
    """A passage of a document, with character offsets into the document's text."""

    id: str
    source: str
    ordinal: int
    title: str
    text: str
    start: int
    end: int
    content_hash: str


def _check_sizes(max_tokens: int, overlap: int) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if overlap < 0 or overlap >= max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got overlap={overlap}, "
                         f"max_tokens={max_tokens}")


_prepared: tuple[object, object] | None = None  # (caller's tokenizer, our copy); see prepare_tokenizer


def prepare_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """Return the tokenizer, or a copy of it with truncation and padding turned off.

    Model tokenizers ship truncating at 128 or 256 tokens and padding to a fixed length; either would
    make a long document look short. The caller's object is left as it is.
    """
    global _prepared
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    if _prepared is not None and _prepared[0] is tokenizer:
        return _prepared[1]  # copying costs tens of ms; chunk_document is called once per document
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    _prepared = (tokenizer, copy)
    return copy


def _is_sentence_end(text: str, offsets: list, k: int) -> bool:
    """Whether the text may be cut right after token k (a newline or a sentence-final mark)."""
    end = offsets[k][1]
    nxt = offsets[k + 1][0]
    if "\n" in text[end:nxt]:
        return True
    if nxt == end:  # "3.14", "e.g.x": punctuation glued to the next token is not a sentence end
        return False
    c = end - 1
    while c > offsets[k][0] and text[c] in _CLOSERS:
        c -= 1
    return text[c] in _SENTENCE_END


def _windows(text: str, offsets: list, words: list, max_tokens: int, overlap: int):
    """Yield (first token, end token) pairs covering all tokens, each at most max_tokens long."""
    n = len(offsets)
    i = 0
    while True:
        j = min(i + max_tokens, n)
        if j < n:
            # Never split a word into word-pieces across chunks: re-tokenizing "##ing" alone would
            # give different (and more) tokens. A single word longer than a window is cut anyway.
            k = j
            while k > i + 1 and words[k] is not None and words[k] == words[k - 1]:
                k -= 1
            if k > i + 1 or words[k] != words[k - 1]:
                j = k
            lowest = i + max(1, int((j - i) * (1 - _BOUNDARY_ZONE)))
            for k in range(j - 1, lowest - 1, -1):
                if words[k] != words[k + 1] and _is_sentence_end(text, offsets, k):
                    j = k + 1
                    break
        yield i, j
        if j >= n:
            return
        nxt = max(j - overlap, i + 1)
        # Start on a word's first piece, widening the overlap rather than narrowing it.
        back = nxt
        while back > i + 1 and words[back] is not None and words[back] == words[back - 1]:
            back -= 1
        i = back if words[back] != words[back - 1] else nxt


def _chunks_from_encoding(doc: Document, encoding, max_tokens: int, overlap: int) -> list[Chunk]:
    text = doc.text
    if len(encoding) <= max_tokens:
        stripped = text.strip()
        if not stripped:
            return []
        start = len(text) - len(text.lstrip())
        spans = [(start, start + len(stripped))]
    else:
        offsets = encoding.offsets
        spans = [(offsets[i][0], offsets[j - 1][1])
                 for i, j in _windows(text, offsets, encoding.word_ids, max_tokens, overlap)]
    chunks = []
    for ordinal, (start, end) in enumerate(spans):
        piece = text[start:end]
        chunks.append(Chunk(
            id=f"{doc.source}#{ordinal}",
            source=doc.source,
            ordinal=ordinal,
            title=doc.title,
            text=piece,
            start=start,
            end=end,
            content_hash=hashlib.sha256(piece.encode("utf-8")).hexdigest()[:16],
        ))
    return chunks


def chunk_documents(docs: Sequence[Document], tokenizer: Tokenizer, max_tokens: int = 200,
                    overlap: int = 32) -> list[Chunk]:
    """Chunk many documents, tokenizing them in batches (the fast path for a whole corpus)."""
    _check_sizes(max_tokens, overlap)
    tokenizer = prepare_tokenizer(tokenizer)
    chunks: list[Chunk] = []
    for b in range(0, len(docs), _BATCH):
        batch = docs[b:b + _BATCH]
        # No special tokens: [CLS]/[SEP] are added by the encoder, and max_tokens counts text only.
        encodings = tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
        for doc, encoding in zip(batch, encodings):
            chunks.extend(_chunks_from_encoding(doc, encoding, max_tokens, overlap))
    return chunks


STREAM_WINDOW = 1 << 18  # characters tokenized at once when chunking a streamed document


def chunk_stream(source: str, title: str, lines: Iterable[str], tokenizer: Tokenizer, max_tokens: int = 200,
                 overlap: int = 32) -> Iterator[Chunk]:
    """Chunk a long text given as lines, tokenizing about STREAM_WINDOW characters at a time.

    The chunks are those chunk_documents gives the whole text (ids, spans, texts): each window of text is
    cut after a newline, only the chunks that end before its last one are emitted (their cut saw the
    tokens after them), and the text from the last chunk's start is carried into the next window.
    """
    _check_sizes(max_tokens, overlap)
    tokenizer = prepare_tokenizer(tokenizer)
    it = iter(lines)
    carry, base, ordinal, done = "", 0, 0, False
    while not done:
        parts, size = [carry], len(carry)
        want = size + STREAM_WINDOW
        while size < want:
            line = next(it, None)
            if line is None:
                done = True
                break
            parts.append(line)
            size += len(line)
        text = "".join(parts)
        rest = ""
        if not done:
            cut = text.rfind("\n") + 1 or len(text)  # lines end in \n; this guards other iterables
            text, rest = text[:cut], text[cut:]
        encoding = tokenizer.encode(text, add_special_tokens=False)
        offsets = encoding.offsets  # a property that builds a new list: read it once
        spans = list(_windows(text, offsets, encoding.word_ids, max_tokens, overlap)) if offsets else []
        keep = spans if done else spans[:-1]
        for i, j in keep:
            start, end = offsets[i][0], offsets[j - 1][1]
            piece = text[start:end]
            yield Chunk(id=f"{source}#{ordinal}", source=source, ordinal=ordinal, title=title, text=piece,
                        start=base + start, end=base + end,
                        content_hash=hashlib.sha256(piece.encode("utf-8")).hexdigest()[:16])
            ordinal += 1
        if done:
            return
        # Carry the last (unfinished) window; a text without tokens is dropped whole.
        start = offsets[spans[-1][0]][0] if spans else len(text)
        carry, base = text[start:] + rest, base + start


def chunk_document(doc: Document, tokenizer: Tokenizer, max_tokens: int = 200,
                   overlap: int = 32) -> list[Chunk]:
    """Split one document into chunks of at most `max_tokens` word-piece tokens, `overlap` shared."""
    return chunk_documents([doc], tokenizer, max_tokens, overlap)


def index_text(title: str, text: str) -> str:
    """What is embedded and BM25-indexed: the text, led by its title when the text does not already
    start with it (a .jsonl title field, an HTML <title>), so a title's words find its chunks."""
    if title and title.strip().lower() not in text[: len(title) + 40].lower():
        return f"{title.strip()}\n{text}"
    return text
