#!/usr/bin/env python3
"""Build a known-item retrieval evaluation set from real third-party text.

Sources (no internet needed beyond the Debian package mirror):

* ``debian`` (default): Debian package descriptions from the apt
  ``Translation-en`` indexes. Query = the one-line synopsis, document = the
  long description with the package name replaced by "this package",
  id = the package name.
* ``man``: installed man pages. Query = the NAME line summary, document =
  the DESCRIPTION section (command name replaced likewise), id = the page name.

Writes ``OUT/corpus/docs.jsonl`` ({"id", "text"} per line) and
``OUT/queries.jsonl`` ({"query", "relevant": [id]} per line). Sampling is a
seeded shuffle of the sorted candidate pool, so a smaller ``--docs`` with the
same seed yields a prefix of a larger one.

Regenerate the default set::

    apt-get -o Acquire::Languages=en update
    python scripts/make_known_items.py --out data/known-items --docs 20000 --queries 1000 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import lzma
import os
import random
import re
import subprocess
import sys

APT_LISTS = "/var/lib/apt/lists"
APT_HELPER = "/usr/lib/apt/apt-helper"
MAN_ROOT = "/usr/share/man"
APT_HINT = "run: apt-get -o Acquire::Languages=en update"
MIN_WORDS = 25


class SourceMissing(Exception):
    """Raised when the raw source files are not present on this machine."""


def parse_args(argv=None):
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--docs", type=int, default=20000, help="number of documents")
    p.add_argument("--queries", type=int, default=1000, help="number of queries")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--calibration", type=int, default=11264,
                   help="synopses of other indexed packages written to calibration.txt (0: none)")
    p.add_argument("--source", choices=("debian", "man"), default="debian")
    p.add_argument("--min-words", type=int, default=MIN_WORDS,
                   help="skip documents shorter than this many words")
    return p.parse_args(argv)


def read_compressed(path):
    """Return the decoded text of a possibly compressed index file."""
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    if path.endswith(".xz"):
        with lzma.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    if path.endswith((".lz4", ".zst", ".bz2")):
        out = subprocess.run([APT_HELPER, "cat-file", path], check=True,
                             capture_output=True)
        return out.stdout.decode("utf-8", errors="replace")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def translation_files(lists_dir=None):
    """List Translation-en index files, one per distinct index, sorted."""
    lists_dir = lists_dir or APT_LISTS
    chosen = {}
    for path in sorted(glob.glob(os.path.join(lists_dir, "*_i18n_Translation-en*"))):
        base = re.sub(r"\.(gz|xz|lz4|zst|bz2)$", "", os.path.basename(path))
        chosen.setdefault(base, path)
    if not chosen:
        raise SourceMissing(f"no Translation-en index in {lists_dir}; {APT_HINT}")
    return [chosen[k] for k in sorted(chosen)]


def parse_translation(text):
    """Yield (package, synopsis, long-description lines) from an index text."""
    for record in re.split(r"\n\s*\n", text):
        pkg, synopsis, body, in_desc = None, None, [], False
        for line in record.split("\n"):
            if line.startswith("Package:"):
                pkg = line.split(":", 1)[1].strip()
            elif line.startswith("Description-en:"):
                synopsis, in_desc = line.split(":", 1)[1].strip(), True
            elif in_desc and line.startswith(" "):
                body.append(line[1:])
            else:
                in_desc = False
        if pkg and synopsis:
            yield pkg, synopsis, body


def join_description(lines):
    """Turn Debian long-description lines into paragraphs of plain text."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip() == ".":
            if current:
                paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if p)


def mask_name(text, name):
    """Replace whole-token occurrences of name (case-insensitive) with 'this package'."""
    pattern = r"(?<![A-Za-z0-9])" + re.escape(name) + r"(?![A-Za-z0-9])"
    return re.sub(pattern, "this package", text, flags=re.IGNORECASE)


def debian_items():
    """Collect (id, query, text) triples from all Translation-en indexes."""
    seen = {}
    for path in translation_files():
        for pkg, synopsis, body in parse_translation(read_compressed(path)):
            if pkg not in seen:
                text = mask_name(join_description(body), pkg)
                seen[pkg] = (pkg, synopsis, text)
    return list(seen.values())


def man_files(root=None):
    """List English section-1/8 man page files, sorted."""
    root = root or MAN_ROOT
    paths = sorted(glob.glob(os.path.join(root, "man[18]", "*")))
    if not paths:
        raise SourceMissing(f"no man pages under {root}; install some (apt-get install man-db manpages)")
    return paths


def roff_to_text(src):
    """Crudely strip roff markup, returning (section name, text line) pairs."""
    section, out = None, []
    for raw in src.split("\n"):
        if raw.startswith(('.\\"', "'\\\"")):
            continue
        m = re.match(r'^\.S[Hh]\s+"?([^"]*)"?', raw)
        if m:
            section = m.group(1).strip().upper()
            continue
        line = re.sub(r"^\.(B|I|BR|BI|IR|IB|RB|RI|SM|SB)\s+", "", raw)
        if line.startswith("."):
            continue
        line = re.sub(r"\\f[BIRPC]|\\f\(..|\\f\[[^]]*\]|\\s[-+]?\d", "", line)
        line = line.replace("\\-", "-").replace("\\(em", "-").replace("\\(en", "-")
        line = re.sub(r"\\\(..|\\\[[^]]*\]|\\[&e|^%]", "", line).replace('"', "")
        out.append((section, line.strip()))
    return out


def parse_man(path):
    """Return (name, summary, description) of one man page, or None."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            src = f.read()
    except (OSError, EOFError):
        return None
    lines = roff_to_text(src)
    name_line = " ".join(t for s, t in lines if s == "NAME" and t)
    desc = " ".join(t for s, t in lines if s == "DESCRIPTION" and t)
    m = re.match(r"^(.*?)\s+-+\s+(.*)$", name_line)
    if not m or not desc:
        return None
    name = os.path.basename(path).split(".")[0]
    return name, m.group(2).strip(), desc


def man_items():
    """Collect (id, query, text) triples from installed man pages."""
    seen = {}
    for path in man_files():
        parsed = parse_man(path)
        if parsed and parsed[0] not in seen:
            name, summary, desc = parsed
            seen[name] = (name, summary, mask_name(desc, name))
    return list(seen.values())


def filter_items(items, min_words):
    """Drop short documents and every document whose text is not unique."""
    long_enough = [it for it in items if len(it[2].split()) >= min_words]
    counts = collections.Counter(it[2] for it in long_enough)
    return sorted((it for it in long_enough if counts[it[2]] == 1), key=lambda it: it[0])


def sample_docs(items, n_docs, seed):
    """Return the first n_docs items of a seeded shuffle of the pool."""
    if n_docs > len(items):
        raise SystemExit(f"error: only {len(items)} usable documents, asked for {n_docs}")
    pool = list(items)
    random.Random(seed).shuffle(pool)
    return pool[:n_docs]


def sample_queries(pool, docs, n_queries, seed):
    """Pick n_queries docs whose synopsis is unique in the whole pool."""
    synopsis_counts = collections.Counter(it[1].lower() for it in pool)
    eligible = sorted((it for it in docs if synopsis_counts[it[1].lower()] == 1),
                      key=lambda it: it[0])
    if n_queries > len(eligible):
        raise SystemExit(f"error: only {len(eligible)} queryable documents, asked for {n_queries}")
    random.Random(seed + 1).shuffle(eligible)
    return eligible[:n_queries]


def sample_calibration(docs, queries, n, seed):
    """Synopses of indexed documents that are not queries: domain queries for `trtrag calibrate`."""
    asked = {it[0] for it in queries}
    rest = sorted((it for it in docs if it[0] not in asked), key=lambda it: it[0])
    random.Random(seed + 2).shuffle(rest)
    return [synopsis for _, synopsis, _ in rest[:n]]


def write_jsonl(path, rows):
    """Write rows as JSON lines, creating parent directories."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_outputs(out, docs, queries, calibration=()):
    """Write corpus/docs.jsonl (sorted by id), queries.jsonl and calibration.txt."""
    write_jsonl(os.path.join(out, "corpus", "docs.jsonl"),
                ({"id": i, "text": t} for i, _, t in sorted(docs, key=lambda it: it[0])))
    write_jsonl(os.path.join(out, "queries.jsonl"),
                ({"query": q, "relevant": [i]} for i, q, _ in queries))
    if calibration:
        with open(os.path.join(out, "calibration.txt"), "w", encoding="utf-8") as f:
            f.writelines(line.replace("\n", " ") + "\n" for line in calibration)


def main(argv=None):
    """Entry point: build and write the known-item set."""
    args = parse_args(argv)
    try:
        raw = debian_items() if args.source == "debian" else man_items()
    except SourceMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pool = filter_items(raw, args.min_words)
    docs = sample_docs(pool, args.docs, args.seed)
    queries = sample_queries(pool, docs, args.queries, args.seed)
    calibration = sample_calibration(docs, queries, args.calibration, args.seed)
    write_outputs(args.out, docs, queries, calibration)
    print(f"source={args.source} raw={len(raw)} usable={len(pool)} "
          f"docs={len(docs)} queries={len(queries)} calibration={len(calibration)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
