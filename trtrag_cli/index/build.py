"""`trtrag index`: corpus folders -> chunks -> vectors + BM25, in segments, published as a new generation.

A first run writes one base segment. A re-run writes a delta segment holding only the chunks of new and
changed files (embedding only chunk texts that the chunks they replace did not have), marks the rows of
changed and removed files dead, and publishes a generation that lists the old segments with the new one:
work and disk in proportion to the change. Compaction (`--compact`, or automatically once rows outside
the base plus dead rows pass index.compact_above of all rows) merges the live rows into a new base.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from trtrag_cli.encode.artifacts import open_recipe_encoder, resolve_recipe_backend
from trtrag_cli.encode.models import chunk_tokenizer
from trtrag_cli.recipe.schema import Recipe, dump_recipe
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.index.generation import LAYOUT, MANIFEST, load_index_manifest
from trtrag_cli.util.files import library_versions, write_json
from trtrag_cli.util.workspace import Workspace

__all__ = ["LAYOUT", "MANIFEST", "load_index_manifest", "run_index", "follow_index", "reindex_command"]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def reindex_command(recipe: Recipe, extra: str = "") -> str:
    """The `trtrag index` command line that rebuilds this recipe's index (with extra --set flags)."""
    flag = f" --recipe {recipe.source}" if recipe.source != "<defaults>" else ""
    return f"trtrag index <corpus>{flag}{extra}"


def follow_index(recipe: Recipe, gen: Path | None = None) -> str | None:
    """Query the current index with the encoder it was built with, unless the recipe insists on another.

    `encoder.precision` left out of the recipe (and of --set) takes the index's precision, and
    `encoder.backend: auto` its backend, so `trtrag index --set encoder.precision=int8` followed by a plain
    `ask` just works. A value the recipe set explicitly that differs is a one-line error. Returns what was
    followed (for doctor), or None when there is nothing to follow (no index, one older than this record, or
    one this version cannot read).
    gen: the generation to follow (default: the live one).
    """
    gen = gen or Workspace(recipe.workspace_dir()).current_index()
    if gen is None or not (gen / MANIFEST).is_file():
        return None
    try:
        built = load_index_manifest(gen)["encoder"]
    except TrtragError:
        return None  # a manifest this version cannot read: opening the index says so, with the fix
    backend, precision = built.get("backend"), built.get("precision")
    if backend is None or precision is None:
        return None
    enc = recipe.encoder
    asked = {"precision": enc.precision} if "precision" in enc.model_fields_set else {}
    if enc.backend != "auto":
        asked["backend"] = enc.backend
    wrong = {k: v for k, v in asked.items() if v != {"backend": backend, "precision": precision}[k]}
    if wrong:
        sets = "".join(f" --set encoder.{k}={v}" for k, v in wrong.items())
        raise TrtragError(f"the index in {gen} was built with the {backend} {precision} encoder, but the recipe "
                          "asks for " + " and ".join(f"encoder.{k} {v}" for k, v in wrong.items()),
                          "remove " + " and ".join(f"encoder.{k}" for k in wrong) + " from the recipe (or --set) "
                          f"to query this index, or re-index: {reindex_command(recipe, sets)}")
    followed = {k: v for k, v in (("backend", backend), ("precision", precision)) if k not in asked}
    for key, value in followed.items():
        setattr(enc, key, value)
    return ("encoder follows the index: " + ", ".join(f"{k} {v}" for k, v in followed.items())) if followed else None


def _compare(manifest: dict, recipe: Recipe, encoder_name: str) -> tuple[str | None, bool, str | None]:
    """(why the index must be built anew, whether its vectors can be reused then, why its segments must be
    merged anew). New vectors only for another encoder or chunking; other BM25 terms need new postings,
    and other index settings (backend, kind, nlist, ...) only a new base segment."""
    if manifest.get("encoder", {}).get("name") != encoder_name:
        return f"encoder changed ({manifest.get('encoder', {}).get('name')} -> {encoder_name})", False, None
    if manifest.get("chunking") != recipe.chunking.model_dump():
        return "chunking settings changed", False, None
    if manifest.get("lexical") != recipe.lexical.model_dump():
        return "lexical settings changed (BM25 terms are made at indexing); vectors reused", True, None
    built, want = manifest.get("index") or {}, _build_shape(recipe.index.model_dump())
    moved = [k for k, v in want.items() if built.get(k, "faiss" if k == "backend" else None) != v]
    return None, True, ("index settings changed (" + ", ".join(moved) + ")") if moved else None


def _build_shape(cfg: dict) -> dict:
    """The index settings that change what is written (the rest apply when searching)."""
    from trtrag_cli.index.vectors import BUILD_FIELDS

    return {k: cfg.get(k) for k in ("backend", *BUILD_FIELDS)}


class _Previous:
    """The published generation a run updates (or, reuse_only, only takes vectors from)."""

    def __init__(self, gen: Path, manifest: dict, store, reuse_only: bool = False, recompact: str | None = None):
        self.gen, self.manifest, self.store = gen, manifest, store
        self.reuse_only, self.recompact = reuse_only, recompact


def _previous(ws: Workspace, recipe: Recipe, encoder_name: str, dim: int, notes: list[str],
              rebuild: bool) -> _Previous | None:
    """The generation to update incrementally, or None to build from scratch: none published, --rebuild,
    another encoder or chunking, or a generation that cannot be read (every fingerprint is checked)."""
    from trtrag_cli.index.bm25 import LexicalIndex
    from trtrag_cli.index.generation import open_store

    gen = ws.current_index()
    if gen is None:
        return None
    if rebuild:
        notes.append("full rebuild: --rebuild")
        return None
    try:
        manifest = load_index_manifest(gen)
        why, reusable, recompact = _compare(manifest, recipe, encoder_name)
        if why and not reusable:
            notes.append(f"full rebuild: {why}")
            return None
        store = open_store(gen, manifest)
        if store.dim not in (0, dim):
            raise TrtragError(f"the index in '{gen}' is damaged: its vectors are not {dim}-d")
        for seg in store.segments:
            seg.check()
        LexicalIndex.open(recipe.lexical, [s.folder for s in store.segments], store.offsets, store.dead)
        if not isinstance(manifest.get("files"), dict):
            raise TrtragError(f"the index in '{gen}' is damaged: {MANIFEST} lists no files")
    except TrtragError as exc:
        notes.append(f"full rebuild: the previous index {gen.name} cannot be read ({exc.message})")
        return None
    if why:
        notes.append(f"full rebuild: {why}")
    return _Previous(gen, manifest, store, reuse_only=bool(why), recompact=recompact)


def _gone_rows(store, files: list[str]) -> list[tuple[int, int, str, str]]:
    """(segment number, local row, file, hash) of the live rows of the given files."""
    out = []
    if not files:
        return out
    for s, seg in enumerate(store.segments):
        out += [(s, row, f, h) for row, f, h in seg.rows_of_files(files) if not store.dead[s][row]]
    return out


def _wants_compaction(recipe: Recipe, segments: list[tuple[str, int, np.ndarray]]) -> str | None:
    """Why the segments should be merged now (index.compact_above, index.max_segments), or None."""
    total = sum(rows for _, rows, _ in segments)
    dead = sum(int(mask.sum()) for _, _, mask in segments)
    outside = total - segments[0][1] if segments else 0
    limit = recipe.index.compact_above
    if len(segments) > recipe.index.max_segments:
        return f"{len(segments)} segments (index.max_segments {recipe.index.max_segments})"
    if limit is not None and total and (dead + outside) / total > limit:
        return (f"dead rows and rows outside the base are {(dead + outside) / total:.0%} of all rows "
                f"(index.compact_above {limit:g})")
    return None


def publish_generation(ws: Workspace, recipe: Recipe, encoder, backend: str, segments: list, counts: dict,
                       files: dict, milvus: dict | None = None) -> Path:
    """Write the manifest, dead rows and segment list of a new generation over `segments` ((name, rows, dead
    mask), base first) and make it the live one; returns its folder."""
    from trtrag_cli.index.chunks import segment_meta
    from trtrag_cli.index.generation import write_generation_files
    from trtrag_cli.util.workspace import SEGMENTS_DIR

    base_meta = segment_meta(ws.index_root / SEGMENTS_DIR / segments[0][0])
    manifest = {
        "layout": LAYOUT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "recipe": recipe.name,
        # backend and precision let later commands follow this index (follow_index).
        "encoder": {"name": encoder.name, "dim": encoder.dim, "model": recipe.encoder.model, "backend": backend,
                    "precision": recipe.encoder.precision, "max_tokens": encoder.max_tokens},
        "chunking": recipe.chunking.model_dump(),
        # nlist_built: the clusters of the base segment's ivf/ivfpq index (index.nlist null: ~4 sqrt(chunks)).
        "index": {**recipe.index.model_dump(), "nlist_built": base_meta.get("nlist_built")},
        "lexical": recipe.lexical.model_dump(),
        "versions": library_versions(), "counts": counts, "files": files,
    }
    if milvus is not None:
        manifest["milvus"] = milvus
    with ws.new_generation() as gen:
        manifest["segments"] = write_generation_files(gen, segments)
        (gen / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
        write_json(gen / MANIFEST, manifest)
    return ws.current_index()


def run_index(recipe: Recipe, paths: list[Path], progress: Progress | None = None, rebuild: bool = False,
              compact: bool = False) -> dict:
    """Index the given corpus paths into the recipe's workspace and return a report.

    rebuild: ignore the published generation and the checkpoint of a killed run, and build from scratch
    (the workspace's calibration and engines are kept). A published generation that cannot be read is
    rebuilt from scratch anyway, with a note. compact: merge the segments into one after updating.
    """
    from trtrag_cli.corpus.loaders import scan
    from trtrag_cli.index.bm25 import Analyzer
    from trtrag_cli.index.checkpoint import EmbedCheckpoint
    from trtrag_cli.index.generation import write_segment
    from trtrag_cli.index.ingest import chunk_files, embed

    ws = Workspace(recipe.workspace_dir())
    t0 = time.perf_counter()
    notes: list[str] = []
    entries, report = scan([Path(p) for p in paths], tuple(recipe.corpus.extensions),
                           int(recipe.corpus.max_file_mb * 1024 * 1024))
    choice = resolve_recipe_backend(recipe)
    milvus_backend = recipe.index.backend == "milvus"
    if milvus_backend:  # before any embedding: a missing client is a one-line error now
        from trtrag_cli.index.milvus import require_client

        require_client(recipe.index)
    with ws.lock(), open_recipe_encoder(recipe, ws, choice=choice) as encoder:
        dim = encoder.dim
        prev = _previous(ws, recipe, encoder.name, dim, notes, rebuild)
        reuse = prev.store if prev is not None else None  # vectors of chunk texts it holds are not re-embedded
        if prev is not None and prev.reuse_only:
            prev = None
        prev_files = prev.manifest["files"] if prev else {}
        current = {e.key: e for e in entries}
        unchanged = {k for k, e in current.items()
                     if isinstance(prev_files.get(k), dict) and prev_files[k].get("sha256") == e.sha256}
        changed = [e for k, e in current.items() if k in prev_files and k not in unchanged]
        added = [e for k, e in current.items() if k not in prev_files]
        removed = [k for k in prev_files if k not in current]

        tokenizer = chunk_tokenizer(recipe)
        # Ids of unchanged files count as taken, so a new file cannot silently reuse one.
        report.seen_sources.update(src for k in unchanged for src in prev_files[k].get("sources", []))
        new_records, new_sources, given = chunk_files(changed + added, report, recipe, tokenizer, dim)
        # A file that yielded no document (undecodable, empty) is skipped and counted by the loader, not
        # recorded, so the next run looks at it again.
        changed = [e for e in changed if new_sources.get(e.key)]
        added = [e for e in added if new_sources.get(e.key)]
        if not current:
            raise TrtragError("the corpus has no indexable documents", "add .txt, .md, .html or .jsonl files")

        # Rows of changed and removed files die; a chunk text that comes back unchanged keeps its vector.
        gone = _gone_rows(prev.store, [e.key for e in changed] + removed) if prev else []
        if reuse is not None and prev is None:  # rebuilt for other BM25 settings: every vector can be reused
            known = {values[0]: row for row, values in reuse.iter_records(("hash",))}
        else:
            known = {h: int(reuse.offsets[s]) + row for s, row, _, h in gone}
        new_vectors = np.zeros((len(new_records), dim), dtype=np.float32)
        todo, again, again_rows = [], [], []
        for i, r in enumerate(new_records):
            if i in given:
                new_vectors[i] = given[i]
            elif r.hash in known:
                again.append(i)
                again_rows.append(known[r.hash])
            else:
                todo.append(i)
        if again:
            new_vectors[again] = reuse.vectors_of(np.array(again_rows, dtype=np.int64))
        checkpoint = EmbedCheckpoint(ws.root, encoder.name, dim, encoder.max_tokens)
        if rebuild:
            checkpoint.clear()
        t_embed = time.perf_counter()
        resumed = embed(encoder, recipe, new_records, todo, new_vectors, checkpoint, progress)
        embed_s = time.perf_counter() - t_embed
        embedded = len(todo) - resumed

        if progress:
            progress("index", 0, 1)
        analyzer = Analyzer(recipe.lexical)
        faiss_base = not milvus_backend and recipe.index.kind != "flat"
        segments: list[tuple[str, int, np.ndarray]] = []
        if prev is not None:
            for s, seg in enumerate(prev.store.segments):
                segments.append((seg.name, seg.rows, prev.store.dead[s].copy()))
            for s, row, _, _ in gone:
                segments[s][2][row] = True
        if new_records:
            name, _ = write_segment(ws.index_root, new_records, new_vectors, analyzer, recipe.index,
                                    faiss_base=faiss_base and prev is None)
            segments.append((name, len(new_records), np.zeros(len(new_records), dtype=bool)))
        # A delta segment with nothing live left is dropped (the base stays: it carries the faiss index).
        segments = [seg for i, seg in enumerate(segments) if i == 0 or not seg[2].all()]
        live = sum(rows - int(mask.sum()) for _, rows, mask in segments)
        if not live:
            raise TrtragError("the corpus produced no text to index", "check that the files are not empty")
        milvus = None
        if milvus_backend:
            from trtrag_cli.index.milvus_sync import sync_collection

            milvus = sync_collection(recipe, encoder.name, dim, prev, gone, new_records, new_vectors, segments,
                                     ws.index_root, analyzer, notes)
        why = "--compact" if compact else (prev.recompact if prev else None) or _wants_compaction(recipe, segments)
        compacted = None
        if why and (len(segments) > 1 or segments[0][2].any()):
            from trtrag_cli.index.compact import compact_segments

            t_compact = time.perf_counter()
            segments = [compact_segments(ws.index_root, segments, recipe.index, faiss_base, progress)]
            compacted = {"why": why, "seconds": round(time.perf_counter() - t_compact, 3)}
            notes.append(f"compacted: {why}")
        if progress:
            progress("index", 1, 1)

        files = {k: prev_files[k] for k in unchanged}
        for e in changed + added:
            files[e.key] = {"sha256": e.sha256, "size": e.size, "sources": new_sources.get(e.key, [])}
        counts = {"files_added": len(added), "files_changed": len(changed), "files_removed": len(removed),
                  "files_unchanged": len(unchanged), "chunks_total": live, "chunks_new": len(new_records),
                  "chunks_embedded": embedded, "chunks_resumed": resumed, "chunks_with_embeddings": len(given),
                  "chunks_dropped": len(gone), "segments": len(segments),
                  "dead_rows": sum(int(m.sum()) for _, _, m in segments)}
        publish_generation(ws, recipe, encoder, choice.backend, segments, counts, files, milvus)
        checkpoint.clear()
        if reuse is not None:
            reuse.close()
    total_s = time.perf_counter() - t0
    docs = sum(len(new_sources.get(e.key, [])) for e in changed + added)
    return {
        "workspace": str(ws.root), "counts": counts, "skipped": dict(report.skipped),
        "warnings": list(report.warnings), "notes": notes, "files_seen": report.files_seen,
        "seconds": round(total_s, 3), "embed_seconds": round(embed_s, 3),
        "embed_chunks_per_s": round(embedded / embed_s, 1) if embedded and embed_s > 0 else None,
        "documents_indexed": docs, "docs_per_s": round(docs / total_s, 1) if docs else None,
        "encoder": encoder.name, "compacted": compacted, **({"milvus": milvus} if milvus is not None else {}),
    }
