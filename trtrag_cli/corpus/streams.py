"""Large corpus files read as streams, so `trtrag index` holds a bounded window of them, not the whole file.

A file above STREAM_BYTES becomes a `StreamedDocument`: its text is never held at once but produced again
on demand as lines (`lines()`), which `chunking.chunk_stream` tokenizes about 256k characters at a time.
Text and Markdown are read line by line. HTML is parsed event by event with the stdlib HTMLParser (fed
64 KiB at a time) under the same rules as the DOM walk `loaders._html_document` applies to smaller pages:
dropped elements, one line per block, table cells joined by ' | ', whitespace collapsed. A DOM of a 19 MB
page costs gigabytes; the event parser holds one unfinished line.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

STREAM_BYTES = 1 << 20  # files larger than this are streamed
_BLOCK = 1 << 16

_MD_HEADING = re.compile(r"#\s+(.+?)(?:\s+#+)?\s*$")
HTML_DROP = frozenset({"script", "style", "noscript", "template", "head", "title", "svg", "iframe", "object",
                       "embed", "canvas"})
HTML_BLOCK = frozenset(
    "address article aside blockquote body caption dd details dialog div dl dt fieldset figcaption figure "
    "footer form h1 h2 h3 h4 h5 h6 header hr html legend li main nav ol p section summary table tbody "
    "tfoot thead tr ul".split())
CELL = "\ue000"  # private-use marker for a table cell boundary, replaced by " | " at the end
_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())


@dataclass(frozen=True)
class StreamedDocument:
    """A document too large to hold: `lines()` yields its text again, in order, each line ending in \\n."""

    source: str
    title: str
    lines: Callable[[], Iterator[str]]


def utf8_error(path: Path) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in a file, or None; reads 64 KiB at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_BLOCK)
            pending = len(decoder.getstate()[0])  # bytes of a sequence cut by the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                return done - pending + exc.start
            if not block:
                return None
            done += len(block)


def text_lines(path: Path) -> Iterator[str]:
    """A UTF-8 file's lines with one line-ending convention (\\n) and a leading BOM dropped."""
    with open(path, encoding="utf-8-sig", newline=None) as fh:
        yield from fh


def markdown_title(lines) -> str:
    """The first '# heading' outside a fenced code block."""
    in_fence = False
    for line in lines:
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence  # a "# comment" in a shell block is not a heading
            continue
        if not in_fence and (m := _MD_HEADING.match(line)):
            return m.group(1).strip()
    return ""


class _HtmlText(HTMLParser):
    """Visible text of HTML as events arrive; `parts` collects text, "\\n" at block edges, CELL at cells."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.open: list[str] = []  # element names, to close what a missing end tag left open
        self.drop = self.pre = 0
        self.title: list[str] | None = None
        self.h1: list[str] | None = None
        self.titles = {"title": "", "h1": ""}

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag == "br" and not self.drop:
                self.parts.append("\n")
            return
        self.open.append(tag)
        if tag == "title" and not self.titles["title"]:
            self.title = []
        if tag == "h1" and not self.titles["h1"]:
            self.h1 = []
        if tag in HTML_DROP:
            self.drop += 1
        elif not self.drop:
            if tag in ("td", "th"):
                self.parts.append(CELL)
            elif tag == "pre" or tag in HTML_BLOCK:
                self.pre += tag == "pre"
                self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag == "br" and not self.drop:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag not in self.open:
            return  # a stray end tag closes nothing
        while self.open:
            name = self.open.pop()
            self._close(name)
            if name == tag:
                return

    def _close(self, tag):
        if tag == "title" and self.title is not None:
            self.titles["title"] = " ".join("".join(self.title).split())
            self.title = None
        if tag == "h1" and self.h1 is not None:
            self.titles["h1"] = " ".join("".join(self.h1).split())
            self.h1 = None
        if tag in HTML_DROP:
            self.drop -= 1
        elif not self.drop and (tag == "pre" or tag in HTML_BLOCK):
            self.pre -= tag == "pre"
            self.parts.append("\n")

    def handle_data(self, data):
        if self.title is not None:
            self.title.append(data)
        if self.h1 is not None:
            self.h1.append(data)
        if not self.drop:
            self.parts.append(data if self.pre else data.replace("\n", " "))


def _clean(line: str) -> str:
    cells = [" ".join(c.split()) for c in line.split(CELL)]
    return " | ".join(c for c in cells if c)


def html_lines(path: Path, titles: dict | None = None) -> Iterator[str]:
    """The visible text lines of an HTML file (as loaders._html_document gives them), parsed in 64 KiB
    steps; titles, when given, receives the page's <title> and first <h1> text once the file is read."""
    parser = _HtmlText()
    with open(path, encoding="utf-8-sig", newline=None) as fh:
        while True:
            block = fh.read(_BLOCK)
            if block:
                parser.feed(block)
            else:
                parser.close()
                parser.parts.append("\n")
            text = "".join(parser.parts)
            cut = text.rfind("\n") + 1
            parser.parts = [text[cut:]] if cut < len(text) else []
            for line in text[:cut].split("\n"):
                if line := _clean(line):
                    yield line + "\n"
            if not block:
                break
    if titles is not None:
        titles.update(parser.titles)


def stream_document(source: str, path: Path, suffix: str) -> StreamedDocument | None:
    """A large file as a StreamedDocument (its title found in a first pass), or None when it holds no text."""
    if suffix in (".html", ".htm"):
        titles: dict = {}
        has_text = False
        for _ in html_lines(path, titles):  # read whole: the title may come late (an <h1>)
            has_text = True
        title = titles.get("title") or titles.get("h1") or ""
        return StreamedDocument(source, title, lambda: html_lines(path)) if has_text else None
    if not any(line.strip() for line in text_lines(path)):
        return None
    title = markdown_title(text_lines(path)) if suffix in (".md", ".markdown") else ""
    return StreamedDocument(source, title, lambda: text_lines(path))
