"""Corpus folders -> files -> documents.

`scan` walks the corpus roots and decides which files are worth reading; `load_documents` turns one
accepted file into documents. Everything skipped is counted in a `ScanReport` under a short reason
("binary", "too-large", ...) and, where a person would want to know, named in a one-line warning.
Chunking documents into passages lives in `chunking.py`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from trtrag_cli.corpus.streams import CELL as _CELL
from trtrag_cli.corpus.streams import HTML_BLOCK as _HTML_BLOCK
from trtrag_cli.corpus.streams import HTML_DROP as _HTML_DROP
from trtrag_cli.corpus.streams import STREAM_BYTES, StreamedDocument, markdown_title, stream_document, text_lines, utf8_error
from trtrag_cli.util.errors import TrtragError

DEFAULT_EXTENSIONS = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl")
DEFAULT_MAX_FILE_BYTES = 20 * 1024 * 1024

_SNIFF_BYTES = 8192  # the same window git uses to call a file binary
_HASH_BLOCK = 1 << 20
_WARN_LIMIT = 50  # per reason; a corpus with 10k bad lines should not print 10k lines


@dataclass(frozen=True)
class FileEntry:
    """One accepted corpus file."""

    key: str  # stable source name: POSIX path under its root, prefixed with the root's name if several
    path: Path  # absolute
    size: int
    sha256: str


@dataclass
class ScanReport:
    """What `scan` and `load_documents` saw, accepted and skipped (reason -> count)."""

    files_seen: int = 0
    files_accepted: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Document sources handed out so far; an id seen twice across files is reported, first one wins.
    seen_sources: set[str] = field(default_factory=set, repr=False, compare=False)

    def skip(self, reason: str, warning: str | None = None) -> None:
        """Count one skipped file or record under `reason`, with an optional one-line warning."""
        count = self.skipped.get(reason, 0) + 1
        self.skipped[reason] = count
        if warning is None:
            return
        if count <= _WARN_LIMIT:
            self.warnings.append(warning)
        elif count == _WARN_LIMIT + 1:
            self.warnings.append(f"more '{reason}' warnings suppressed; see the counts")

    def summary(self) -> str:
        """One line: files seen/accepted, documents, and skip counts."""
        skips = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.files_seen} files seen, {self.files_accepted} accepted, "
            f"{self.documents} documents; skipped: {skips}"
        )


@dataclass(frozen=True)
class Document:
    """A unit of text with a stable source name (file key, or the record id for .jsonl); a .jsonl record may
    bring its own vector (`embedding`), made by the recipe's encoder.model."""

    source: str
    title: str
    text: str
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)


def _normalize_extensions(extensions) -> tuple[str, ...]:
    return tuple(sorted({e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}))


def _root_prefixes(roots: list[Path]) -> list[str]:
    # Two roots with the same folder name ("a/docs", "b/docs") would give colliding keys.
    seen: Counter[str] = Counter()
    prefixes = []
    for name in (r.name or "root" for r in roots):
        seen[name] += 1
        prefixes.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return prefixes


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _walk(root: Path, root_real: str, prefix: str, visited: set[str], report: ScanReport):
    """Yield (key, path) of candidate files under `root`.

    Real folders are walked first and symlinked ones afterwards, so a folder reachable both ways is
    named by its real path, and a symlink to a folder already walked adds nothing. `visited` holds
    the real paths of walked folders, which is also what stops symlink loops.
    """
    stack: list[tuple[str, Path, str]] = [("", root, root_real)]  # (relative key, path, real path)
    deferred: list[tuple[str, Path, str]] = []  # symlinked folders: (relative key, path, real parent)
    while stack or deferred:
        if not stack:
            rel, path, parent_real = deferred.pop(0)
            real = os.path.realpath(path)
            if not _inside(real, root_real):
                report.skip("outside-root", f"{prefix}{rel}: symlink leads outside the corpus root; "
                                            "not followed")
                continue
            if _inside(parent_real, real):
                report.skip("symlink-loop", f"{prefix}{rel}: symlink points back to a parent folder; "
                                            "not followed")
                continue
            if real in visited:
                report.skip("symlink-duplicate")
                continue
            stack.append((rel, path, real))
        rel, path, real = stack.pop()
        if real in visited:
            continue  # walked already, under an earlier corpus root
        visited.add(real)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)  # warnings in a stable order
        except OSError as exc:
            report.skip("unreadable", f"{prefix}{rel or '.'}: cannot list folder ({exc.strerror})")
            continue
        dirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .git, .trtrag, editor droppings: never corpus content
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks; a broken link is neither dir nor file
            except OSError:
                is_dir = False
            if is_dir and entry.is_symlink():
                deferred.append((child_rel, Path(entry.path), real))
            elif is_dir:
                dirs.append((child_rel, Path(entry.path), os.path.join(real, entry.name)))
            else:
                yield prefix + child_rel, Path(entry.path)
        stack.extend(reversed(dirs))


def _check_file(rel: str, path: Path, root_real: str, extensions, max_file_bytes: int,
                report: ScanReport) -> tuple[int, str] | None:
    """Return (size, sha256) for an acceptable file, else count why not and return None."""
    if path.suffix.lower() not in extensions:
        report.skip("unsupported-type")
        return None
    if path.is_symlink() and not _inside(os.path.realpath(path), root_real):
        report.skip("outside-root", f"{rel}: symlink leads outside the corpus root; not followed")
        return None
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a.txt -> b.txt -> a.txt
            report.skip("symlink-loop", f"{rel}: symlinks point at each other; skipped")
        else:
            report.skip("unreadable", f"{rel}: cannot read ({exc.strerror or exc})")
        return None
    if not stat.S_ISREG(st.st_mode):  # a FIFO named x.txt would block the read forever
        report.skip("unsupported-type", f"{rel}: not a regular file; skipped")
        return None
    if st.st_size > max_file_bytes:
        report.skip("too-large", f"{rel}: {st.st_size / 2**20:.1f} MiB is above the "
                                 f"{max_file_bytes / 2**20:.1f} MiB limit; skipped")
        return None
    if st.st_size == 0:
        report.skip("empty")
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
            if b"\0" in head:
                report.skip("binary", f"{rel}: looks binary (NUL bytes); skipped")
                return None
            digest.update(head)
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    except OSError as exc:
        report.skip("unreadable", f"{rel}: cannot read ({exc.strerror or exc})")
        return None
    return st.st_size, digest.hexdigest()


def scan(roots: list[Path], extensions=DEFAULT_EXTENSIONS,
         max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[list[FileEntry], ScanReport]:
    """Walk corpus folders (or single files) and return the accepted files, in a stable order."""
    roots = [Path(r) for r in roots]
    exts = _normalize_extensions(extensions)
    for root in roots:
        if not root.exists():
            raise TrtragError(f"corpus path '{root}' does not exist",
                              "check the path, or point the recipe's corpus at a folder of documents")
    report = ScanReport()
    entries: list[FileEntry] = []
    first_by_hash: dict[str, str] = {}
    visited: set[str] = set()
    prefixes = _root_prefixes([r.resolve() for r in roots])
    for root, prefix in zip(roots, prefixes):
        root_real = os.path.realpath(root)
        if root.is_dir():
            if root_real in visited:
                report.warnings.append(f"{root}: inside a corpus path given earlier; not scanned twice")
                continue
            # Sorted by key, so "first one wins" among duplicates means the first in plain path order.
            keyed = sorted(_walk(root, root_real, f"{prefix}/" if len(roots) > 1 else "", visited,
                                 report), key=lambda kp: kp[0])
        else:
            # A single file is its own root; its name is its key.
            root_real = os.path.dirname(root_real)
            keyed = [(root.name, root)]
        for key, path in keyed:
            report.files_seen += 1
            checked = _check_file(key, path, root_real, exts, max_file_bytes, report)
            if checked is None:
                continue
            size, sha = checked
            if sha in first_by_hash:
                report.skip("duplicate-content", f"{key}: same content as {first_by_hash[sha]}; skipped")
                continue
            first_by_hash[sha] = key
            entries.append(FileEntry(key=key, path=Path(os.path.abspath(path)), size=size, sha256=sha))
            report.files_accepted += 1
    if not entries:
        where = ", ".join(f"'{r}'" for r in roots)
        skips = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped.items()))
        raise TrtragError(
            f"corpus {where} is empty: no usable files"
            + (f" ({report.files_seen} seen; skipped: {skips})" if report.files_seen else ""),
            f"add files with one of the supported extensions: {' '.join(exts)}",
        )
    return entries, report


# --- loaders ------------------------------------------------------------------------------------

def _markdown_title(text: str) -> str:
    return markdown_title(text.split("\n"))


_END, _PRE_END = object(), object()  # stack markers: a block / a <pre> closes


def _html_document(source: str, markup: str) -> Document:
    """Visible text of an HTML page: one line per block, cells joined by ' | ', whitespace collapsed."""
    from trtrag_cli.util.deps import require

    bs4 = require("bs4", "HTML corpus files")
    # html.parser is the stdlib parser: nothing is fetched or executed, and no lxml is needed.
    soup = bs4.BeautifulSoup(markup, "html.parser")
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text().split()) if title_tag else ""
    text_types = (bs4.element.NavigableString, bs4.element.CData)
    skip_types = (bs4.element.Comment, bs4.element.Doctype, bs4.element.Declaration,
                  bs4.element.ProcessingInstruction)
    parts: list[str] = []
    pre_depth = 0
    # An explicit stack rather than recursion: deeply nested pages must not hit the recursion limit.
    stack: list = list(reversed(soup.contents))
    while stack:
        node = stack.pop()
        if node is _END or node is _PRE_END:
            pre_depth -= node is _PRE_END
            parts.append("\n")
            continue
        if isinstance(node, bs4.element.Tag):
            name = node.name
            if name in _HTML_DROP:
                continue
            if name == "br":
                parts.append("\n")
                continue
            if name in ("td", "th"):
                parts.append(_CELL)
            elif name == "pre" or name in _HTML_BLOCK:
                pre_depth += name == "pre"
                parts.append("\n")
                stack.append(_PRE_END if name == "pre" else _END)
            stack.extend(reversed(node.contents))
        elif isinstance(node, text_types) and not isinstance(node, skip_types):
            # Outside <pre>, a newline in the markup is just a space.
            parts.append(str(node) if pre_depth else str(node).replace("\n", " "))
    lines = []
    for line in "".join(parts).split("\n"):
        cells = [" ".join(c.split()) for c in line.split(_CELL)]
        line = " | ".join(c for c in cells if c)
        if line:
            lines.append(line)
    if not title and (h1 := soup.find("h1")):
        title = " ".join(h1.get_text().split())
    return Document(source=source, title=title, text="\n".join(lines))


def _unix_newlines(text: str) -> str:
    # One line-ending convention, so sentence boundaries and offsets look the same on every platform.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _embedding(value) -> np.ndarray | None:
    """A record's own vector as float32, L2-normalised like the encoder's; None when it is not one."""
    if not isinstance(value, list) or not value or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        return None
    vec = np.asarray(value, dtype=np.float32)
    norm = float(np.linalg.norm(vec))
    return vec / norm if np.isfinite(norm) and norm > 0 else None


def _jsonl_documents(entry: FileEntry, lines, report: ScanReport) -> Iterator[Document]:
    # Lines split on "\n" only (after \r\n and \r became \n), not splitlines(): U+2028 is legal inside a
    # JSON string and must not end a record.
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        where = f"{entry.key}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report.skip("malformed-jsonl", f"{where}: not valid JSON ({exc.msg}); line skipped")
            continue
        if not isinstance(record, dict):
            report.skip("malformed-jsonl", f"{where}: expected a JSON object; line skipped")
            continue
        rid, body, title = record.get("id"), record.get("text"), record.get("title", "")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
            report.skip("malformed-jsonl", f"{where}: missing or invalid \"id\"; line skipped")
            continue
        if not isinstance(body, str):
            report.skip("malformed-jsonl", f"{where}: missing or non-string \"text\"; line skipped")
            continue
        rid = str(rid)
        embedding = None
        if record.get("embedding") is not None:
            embedding = _embedding(record["embedding"])
            if embedding is None:
                report.skip("malformed-jsonl", f"{where}: \"embedding\" must be a non-empty list of finite "
                                               "numbers; line skipped")
                continue
        if not body.strip():
            report.skip("empty")
            continue
        if rid in report.seen_sources:
            report.skip("duplicate-id", f"{where}: id '{rid}' already used; first one kept")
            continue
        report.seen_sources.add(rid)
        title = "" if title is None else str(title)
        report.documents += 1
        yield Document(source=rid, title=title, text=_unix_newlines(body), embedding=embedding)


def _streamed(entry: FileEntry, report: ScanReport) -> Iterator[Document | StreamedDocument]:
    """A large file read as a stream (a .jsonl record by record); bounded memory whatever its size."""
    try:
        bad = utf8_error(entry.path)
    except OSError as exc:
        report.skip("unreadable", f"{entry.key}: cannot read ({exc.strerror or exc})")
        return
    if bad is not None:
        report.skip("not-utf8", f"{entry.key}: not valid UTF-8 (byte {bad}); skipped, re-save it as UTF-8")
        return
    suffix = entry.path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(entry, (line.rstrip("\n") for line in text_lines(entry.path)), report)
        return
    doc = stream_document(entry.key, entry.path, suffix)
    if doc is None:
        report.skip("empty")
        return
    if doc.source in report.seen_sources:
        report.skip("duplicate-id", f"{entry.key}: source name already used; skipped")
        return
    report.seen_sources.add(doc.source)
    report.documents += 1
    yield doc


def iter_documents(entry: FileEntry, report: ScanReport) -> Iterator[Document | StreamedDocument]:
    """The documents of one accepted file, in order; a file above streams.STREAM_BYTES is read as a stream
    (a StreamedDocument, or .jsonl records one line at a time). Problems are counted, never raised."""
    if entry.size > STREAM_BYTES:
        yield from _streamed(entry, report)
    else:
        yield from load_documents(entry, report)


def load_documents(entry: FileEntry, report: ScanReport) -> list[Document]:
    """Read one accepted file into documents; problems are counted in `report`, never raised."""
    try:
        data = entry.path.read_bytes()
    except OSError as exc:
        report.skip("unreadable", f"{entry.key}: cannot read ({exc.strerror or exc})")
        return []
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading BOM is dropped, not indexed
    except UnicodeDecodeError as exc:
        report.skip("not-utf8", f"{entry.key}: not valid UTF-8 (byte {exc.start}); skipped, "
                                "re-save it as UTF-8")
        return []
    del data  # a 20 MB file should not be held as bytes and as text at once
    text = _unix_newlines(text)
    suffix = entry.path.suffix.lower()
    if suffix == ".jsonl":
        return list(_jsonl_documents(entry, text.split("\n"), report))
    if suffix in (".html", ".htm"):
        doc = _html_document(entry.key, text)
    elif suffix in (".md", ".markdown"):
        doc = Document(source=entry.key, title=_markdown_title(text), text=text)
    else:
        doc = Document(source=entry.key, title="", text=text)
    if not doc.text.strip():
        report.skip("empty")
        return []
    if doc.source in report.seen_sources:  # a .jsonl id that happens to equal a file key
        report.skip("duplicate-id", f"{entry.key}: source name already used; skipped")
        return []
    report.seen_sources.add(doc.source)
    report.documents += 1
    return [doc]


def load_corpus(roots: list[Path], extensions=DEFAULT_EXTENSIONS,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[list[Document], ScanReport]:
    """Scan the roots and load every accepted file; raise if no document survives."""
    entries, report = scan(roots, extensions, max_file_bytes)
    docs = [doc for entry in entries for doc in load_documents(entry, report)]
    if not docs:
        raise TrtragError(
            f"corpus is empty: {report.files_accepted} files accepted but none held usable text "
            f"({report.summary()})",
            "corpus files must be UTF-8 text; the scan warnings name each skipped file",
        )
    return docs, report
