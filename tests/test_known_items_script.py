"""scripts/make_known_items.py: parsing, masking, dedupe, sampling, and the missing-source error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_known_items.py"

LONG = " ".join(f"word{i}" for i in range(30))
INDEX = f"""Package: foo
Description-md5: 0
Description-en: Frobnicates widgets
 Foo is a tool. {LONG}
 .
 Use FOO daily; foobar is unrelated.

Package: foo-doc
Description-en: Frobnicates widgets
 Shared text {LONG}

Package: foo-dev
Description-en: Frobnicates widgets (headers)
 Shared text {LONG}

Package: tiny
Description-en: Too short
 Only a few words here.
"""


@pytest.fixture(scope="module")
def mki():
    """Import the script as a module."""
    spec = importlib.util.spec_from_file_location("make_known_items", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_mask_and_filter(mki):
    """Records parse, the name is masked whole-token only, short and duplicated texts are dropped."""
    recs = list(mki.parse_translation(INDEX))
    assert [r[0] for r in recs] == ["foo", "foo-doc", "foo-dev", "tiny"]
    text = mki.mask_name(mki.join_description(recs[0][2]), "foo")
    assert text.startswith("this package is a tool.")
    assert "\n\nUse this package daily; foobar is unrelated." in text
    items = [(p, s, mki.mask_name(mki.join_description(b), p)) for p, s, b in recs]
    assert [it[0] for it in mki.filter_items(items, 25)] == ["foo"]


def test_sampling_is_seeded_prefix(mki):
    """Smaller doc samples are prefixes of larger ones; queries are seeded and skip shared synopses."""
    pool = [(f"p{i:03d}", f"syn {i // 2 if i < 10 else i}", f"text {i}") for i in range(100)]
    big, small = mki.sample_docs(pool, 60, 0), mki.sample_docs(pool, 20, 0)
    assert big[:20] == small
    q1 = mki.sample_queries(pool, big, 10, 0)
    assert q1 == mki.sample_queries(pool, big, 10, 0)
    assert len({q[0] for q in q1}) == 10 and all(int(q[0][1:]) >= 10 for q in q1)


def test_writes_files_and_fails_cleanly(mki, tmp_path, monkeypatch, capsys):
    """End to end on a fake apt lists dir; an empty dir gives a one-line apt-get hint."""
    lists = tmp_path / "lists"
    lists.mkdir()
    monkeypatch.setattr(mki, "APT_LISTS", str(lists))
    assert mki.main(["--out", str(tmp_path / "o"), "--docs", "1", "--queries", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "apt-get -o Acquire::Languages=en update" in err
    (lists / "x_main_i18n_Translation-en").write_text(INDEX)
    assert mki.main(["--out", str(tmp_path / "o"), "--docs", "1", "--queries", "1"]) == 0
    docs = [json.loads(x) for x in (tmp_path / "o" / "corpus" / "docs.jsonl").read_text().splitlines()]
    queries = [json.loads(x) for x in (tmp_path / "o" / "queries.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == ["foo"]
    assert queries == [{"query": "Frobnicates widgets", "relevant": ["foo"]}]
