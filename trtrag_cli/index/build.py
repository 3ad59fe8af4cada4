"""`trtrag index`: corpus folders -> chunks -> vectors + BM25, incrementally, in a new generation.

A re-run embeds only chunks of new or changed files (and reuses vectors of chunk texts already seen),
drops chunks of deleted files, and publishes the result atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from trtrag_cli.corpus.chunking import index_text
from trtrag_cli.encode.artifacts import open_recipe_encoder, resolve_recipe_backend
from trtrag_cli.encode.models import chunk_tokenizer
from trtrag_cli.recipe.schema import Recipe, dump_recipe
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import library_versions, read_json, write_json
from trtrag_cli.util.workspace import Workspace

MANIFEST = "manifest.json"
LAYOUT = 1  # the files of a generation and what its manifest records; another number is not read
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def load_index_manifest(gen: Path) -> dict:
    """An index generation's manifest.json (what was indexed, with which encoder and settings), refusing
    one that this version cannot read: damaged, of another layout, or without the encoder's name and dim."""
    from trtrag_cli.index.chunks import REBUILD_HINT

    try:
        manifest = read_json(gen / MANIFEST)
    except TrtragError as exc:
        raise TrtragError(f"the index in '{gen}' is damaged: {exc.message}", REBUILD_HINT) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("encoder"), dict):
        raise TrtragError(f"the index in '{gen}' is damaged: {MANIFEST} is not an index manifest", REBUILD_HINT)
    layout = manifest.get("layout")
    if layout != LAYOUT:
        what = "records no layout" if layout is None else f"has layout {layout!r}"
        raise TrtragError(f"the index in '{gen}' was written by another trtrag version: its {MANIFEST} {what}, "
                          f"this version reads layout {LAYOUT}", REBUILD_HINT)
    enc = manifest["encoder"]
    if not isinstance(enc.get("name"), str) or not isinstance(enc.get("dim"), int):
        raise TrtragError(f"the index in '{gen}' was written by another trtrag version: its {MANIFEST} records "
                          "no encoder name and dimension", REBUILD_HINT)
    return manifest


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


def _compatible(manifest: dict, recipe: Recipe, encoder_name: str) -> str | None:
    """Why an earlier generation cannot be reused incrementally, or None when it can."""
    if manifest.get("encoder", {}).get("name") != encoder_name:
        return f"encoder changed ({manifest.get('encoder', {}).get('name')} -> {encoder_name})"
    if manifest.get("chunking") != recipe.chunking.model_dump():
        return "chunking settings changed"
    return None


def _previous(ws: Workspace, recipe: Recipe, encoder_name: str, dim: int, notes: list[str], rebuild: bool):
    """(generation, chunk store, files) to update incrementally, or Nones when building from scratch: none
    published, --rebuild, other settings, or a generation that cannot be read (damaged files)."""
    from trtrag_cli.index.chunks import ChunkStore

    gen = ws.current_index()
    if gen is None:
        return None, None, {}
    if rebuild:
        notes.append("full rebuild: --rebuild")
        return None, None, {}
    try:
        manifest = load_index_manifest(gen)
        why = _compatible(manifest, recipe, encoder_name)
        if why:
            notes.append(f"full rebuild: {why}")
            return None, None, {}
        store = ChunkStore.load(gen)
        if store.vectors.shape[1:] != (dim,) or not np.isfinite(store.vectors).all():
            raise TrtragError(f"the index in '{gen}' is damaged: vectors.npy holds no {dim}-d vectors")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise TrtragError(f"the index in '{gen}' is damaged: {MANIFEST} lists no files")
    except TrtragError as exc:
        notes.append(f"full rebuild: the previous index {gen.name} cannot be read ({exc.message})")
        return None, None, {}
    return gen, store, files


def _chunk_new_files(entries, report, recipe: Recipe, tokenizer, dim: int):
    """Load and chunk the given files, large ones as streams. Returns chunk records (without vectors),
    sources per file, and {record index: vector} for records whose document brought its own embedding."""
    from trtrag_cli.corpus.chunking import chunk_documents, chunk_stream
    from trtrag_cli.corpus.loaders import iter_documents
    from trtrag_cli.corpus.streams import StreamedDocument
    from trtrag_cli.index.chunks import ChunkRecord

    size, overlap = recipe.chunking.max_tokens, recipe.chunking.overlap
    records, sources, given = [], {}, {}
    pending, pending_chars, file_of = [], 0, {}

    def add(chunks, embedded: dict) -> None:
        for ch in chunks:
            vec = embedded.get(ch.source)
            text_hash = _hash(index_text(ch.title, ch.text))
            if vec is not None:
                if ch.ordinal:
                    raise TrtragError(f"{ch.source}: documents with embeddings must fit one chunk (this one "
                                      f"is longer than chunking.max_tokens {size})",
                                      "raise chunking.max_tokens or split them")
                given[len(records)] = vec
                text_hash = _hash(text_hash + vec.tobytes().hex())  # another vector, another hash
            records.append(ChunkRecord(id=ch.id, source=ch.source, file=file_of[ch.source], ordinal=ch.ordinal,
                                       title=ch.title, text=ch.text, hash=text_hash))

    def flush() -> None:
        nonlocal pending, pending_chars
        # Many small documents in one call, so the tokenizer batches across files.
        add(chunk_documents(pending, tokenizer, size, overlap),
            {d.source: d.embedding for d in pending if d.embedding is not None})
        pending, pending_chars = [], 0

    for entry in entries:
        sources[entry.key] = []
        for doc in iter_documents(entry, report):
            sources[entry.key].append(doc.source)
            file_of[doc.source] = entry.key
            if isinstance(doc, StreamedDocument):
                add(chunk_stream(doc.source, doc.title, doc.lines(), tokenizer, size, overlap), {})
                continue
            if doc.embedding is not None and len(doc.embedding) != dim:
                raise TrtragError(f"{doc.source}: its embedding has {len(doc.embedding)} values but encoder.model "
                                  f"{recipe.encoder.model} makes {dim}",
                                  "set encoder.model to the model that made the embeddings, or drop the "
                                  "embedding field to have the text encoded")
            pending.append(doc)
            pending_chars += len(doc.text)
            if len(pending) >= 2048 or pending_chars >= 8 << 20:
                flush()
    flush()
    return records, sources, given


def _hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _embed(encoder, recipe: Recipe, records, todo: list[int], vectors: np.ndarray, checkpoint,
           progress: Progress | None) -> int:
    """Embed records[todo] into vectors[todo], saving each CHECKPOINT_BATCHES batches to the checkpoint;
    rows the checkpoint already holds (a killed run's) are filled from it. Returns how many were resumed."""
    from trtrag_cli.index.checkpoint import CHECKPOINT_BATCHES

    saved = checkpoint.load()
    resumed = [i for i in todo if records[i].hash in saved]
    for i in resumed:
        vectors[i] = saved[records[i].hash]
    rest = [i for i in todo if records[i].hash not in saved]
    del saved
    step = recipe.encoder.batch_size * CHECKPOINT_BATCHES
    for at in range(0, len(rest), step):
        part = rest[at:at + step]
        texts = [index_text(records[i].title, records[i].text) for i in part]
        cb = (lambda n, at=at: progress("embed", at + n, len(rest))) if progress else None
        vectors[part] = encoder.encode(texts, batch_size=recipe.encoder.batch_size, progress=cb)
        checkpoint.save([records[i].hash for i in part], vectors[part])
    return len(resumed)


def run_index(recipe: Recipe, paths: list[Path], progress: Progress | None = None, rebuild: bool = False) -> dict:
    """Index the given corpus paths into the recipe's workspace and return a report.

    rebuild: ignore the published generation and the checkpoint of a killed run, and build from scratch
    (the workspace's calibration and engines are kept). A published generation that cannot be read is
    rebuilt from scratch anyway, with a note.
    """
    from trtrag_cli.corpus.loaders import scan
    from trtrag_cli.index.bm25 import LexicalIndex
    from trtrag_cli.index.checkpoint import EmbedCheckpoint
    from trtrag_cli.index.chunks import ChunkStore

    ws = Workspace(recipe.workspace_dir())
    t0 = time.perf_counter()
    notes: list[str] = []
    entries, report = scan([Path(p) for p in paths], tuple(recipe.corpus.extensions),
                           int(recipe.corpus.max_file_mb * 1024 * 1024))
    choice = resolve_recipe_backend(recipe)
    backend = choice.backend
    if recipe.index.backend == "milvus":  # before any embedding: a missing client is a one-line error now
        from trtrag_cli.index.milvus import require_client

        require_client(recipe.index)
    with ws.lock(), open_recipe_encoder(recipe, ws, choice=choice) as encoder:
        dim = encoder.dim
        prev_gen, prev_store, prev_files = _previous(ws, recipe, encoder.name, dim, notes, rebuild)
        current = {e.key: e for e in entries}
        unchanged = {k for k, e in current.items()
                     if isinstance(prev_files.get(k), dict) and prev_files[k].get("sha256") == e.sha256}
        changed = [e for k, e in current.items() if k in prev_files and k not in unchanged]
        added = [e for k, e in current.items() if k not in prev_files]
        removed = [k for k in prev_files if k not in current]

        tokenizer = chunk_tokenizer(recipe)
        # Ids of unchanged files count as taken, so a new file cannot silently reuse one.
        report.seen_sources.update(src for k in unchanged for src in prev_files[k].get("sources", []))
        new_records, new_sources, given = _chunk_new_files(changed + added, report, recipe, tokenizer, dim)
        # A file that yielded no document (undecodable, empty) is skipped and counted by the loader, not
        # recorded, so the next run looks at it again.
        changed = [e for e in changed if new_sources.get(e.key)]
        added = [e for e in added if new_sources.get(e.key)]
        if not current:
            raise TrtragError("the corpus has no indexable documents", "add .txt, .md, .html or .jsonl files")

        kept_rows = [] if prev_store is None else [
            i for i, r in enumerate(prev_store.records) if r.file in unchanged]
        # Vectors of identical chunk texts are reused, so an edit re-embeds only the chunks it touched.
        known = {} if prev_store is None else {r.hash: i for i, r in enumerate(prev_store.records)}
        new_vectors = np.zeros((len(new_records), dim), dtype=np.float32)
        todo = []
        for i, r in enumerate(new_records):
            if i in given:
                new_vectors[i] = given[i]
            elif r.hash in known:
                new_vectors[i] = prev_store.vectors[known[r.hash]]
            else:
                todo.append(i)
        checkpoint = EmbedCheckpoint(ws.root, encoder.name, dim, encoder.max_tokens)
        if rebuild:
            checkpoint.clear()
        t_embed = time.perf_counter()
        resumed = _embed(encoder, recipe, new_records, todo, new_vectors, checkpoint, progress)
        embed_s = time.perf_counter() - t_embed
        embedded = len(todo) - resumed

        records = [prev_store.records[i] for i in kept_rows] + new_records
        vectors = np.concatenate([prev_store.vectors[kept_rows] if kept_rows else np.zeros((0, dim), np.float32),
                                  new_vectors])
        store = ChunkStore(records, vectors)
        if not len(store):
            raise TrtragError("the corpus produced no text to index", "check that the files are not empty")

        if progress:
            progress("index", 0, 1)
        # bm25s is built for either backend: the extractive answer weighs words by its idf, and with
        # milvus its analyser makes the terms Milvus indexes (see index/milvus.py).
        lexical = LexicalIndex(recipe.lexical)
        lexical.build([index_text(r.title, r.text) for r in store.records])
        vindex, milvus = None, None
        if recipe.index.backend == "milvus":
            milvus = _update_milvus(recipe, encoder.name, dim, prev_gen, prev_store, kept_rows, store,
                                    len(new_records), lexical.analyzer, notes)
        else:
            vindex = _update_vectors(recipe, dim, prev_gen, prev_store, kept_rows, store, len(new_records),
                                     notes)
        if progress:
            progress("index", 1, 1)

        files = {k: prev_files[k] for k in unchanged}
        for e in changed + added:
            files[e.key] = {"sha256": e.sha256, "size": e.size, "sources": new_sources.get(e.key, [])}
        counts = {"files_added": len(added), "files_changed": len(changed), "files_removed": len(removed),
                  "files_unchanged": len(unchanged), "chunks_total": len(store), "chunks_new": len(new_records),
                  "chunks_embedded": embedded, "chunks_resumed": resumed, "chunks_with_embeddings": len(given),
                  "chunks_dropped": 0 if prev_store is None else len(prev_store) - len(kept_rows)}
        manifest = {
            "layout": LAYOUT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "recipe": recipe.name,
            # backend and precision let later commands follow this index (follow_index).
            "encoder": {"name": encoder.name, "dim": dim, "model": recipe.encoder.model, "backend": backend,
                        "precision": recipe.encoder.precision, "max_tokens": encoder.max_tokens},
            "chunking": recipe.chunking.model_dump(),
            # nlist_built: the clusters of an ivf/ivfpq index (index.nlist null: about 4 sqrt(chunks)).
            "index": {**recipe.index.model_dump(), "nlist_built": vindex.nlist() if vindex is not None else None},
            "lexical": recipe.lexical.model_dump(),
            "versions": library_versions(), "counts": counts, "files": files,
        }
        if milvus is not None:
            manifest["milvus"] = milvus
        with ws.new_generation() as gen:
            store.save(gen)
            if vindex is not None:
                vindex.save(gen / "vectors.faiss")
            lexical.save(gen / "bm25")
            (gen / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
            write_json(gen / MANIFEST, manifest)
        checkpoint.clear()
    total_s = time.perf_counter() - t0
    docs = sum(len(new_sources.get(e.key, [])) for e in changed + added)
    return {
        "workspace": str(ws.root), "counts": counts, "skipped": dict(report.skipped),
        "warnings": list(report.warnings), "notes": notes, "files_seen": report.files_seen,
        "seconds": round(total_s, 3), "embed_seconds": round(embed_s, 3),
        "embed_chunks_per_s": round(embedded / embed_s, 1) if embedded and embed_s > 0 else None,
        "documents_indexed": docs, "docs_per_s": round(docs / total_s, 1) if docs else None,
        "encoder": encoder.name, **({"milvus": milvus} if milvus is not None else {}),
    }


def _update_vectors(recipe: Recipe, dim: int, prev_gen, prev_store, kept_rows, store, n_new: int, notes: list[str]):
    """Update the previous faiss index in place (delete + add) when possible, else build anew (also when the
    previous one cannot be read, with a note)."""
    from trtrag_cli.index.vectors import BUILD_FIELDS, VectorIndex

    def shape(cfg: dict) -> dict:  # the settings that change what is built; search-time ones do not
        return {k: cfg.get(k) for k in BUILD_FIELDS}

    same_cfg = prev_gen is not None and shape(load_index_manifest(prev_gen).get("index") or {}) == shape(recipe.index.model_dump())
    vindex = None
    if same_cfg and recipe.index.kind != "hnsw" and (prev_gen / "vectors.faiss").is_file():
        try:
            vindex = VectorIndex.load(prev_gen / "vectors.faiss", recipe.index, dim, device=False)
        except TrtragError as exc:
            notes.append(f"vector index rebuilt: {exc.message}")
        else:
            if vindex.ntotal != len(prev_store):
                notes.append(f"vector index rebuilt: it holds {vindex.ntotal} vectors for {len(prev_store)} chunks")
                vindex = None
    if vindex is not None and vindex.supports_remove():
        kept = np.zeros(len(prev_store), dtype=bool)
        kept[kept_rows] = True
        if (~kept).any():
            vindex.remove(prev_store.ids[~kept])
        if n_new:
            vindex.add(store.vectors[-n_new:], store.ids[-n_new:])
        return vindex
    vindex = VectorIndex(recipe.index, dim)
    vindex.build(store.vectors, store.ids)
    return vindex


def _update_milvus(recipe: Recipe, encoder_name: str, dim: int, prev_gen, prev_store, kept_rows, store,
                   n_new: int, analyzer, notes: list[str]) -> dict:
    """Bring the recipe's Milvus collection in step with the new chunk store; returns the manifest's record.

    In place when the collection is the one the previous generation wrote (its trtrag.sync token) with the
    same chain: chunks of removed files and chunks whose text changed are deleted or replaced by id, and
    only new or changed chunks are upserted. Otherwise the collection is made anew from every chunk.
    """
    import json
    import uuid

    from trtrag_cli.index.milvus import SYNC, MilvusIndex, dense_index

    cfg = recipe.index
    with MilvusIndex(cfg, recipe.workspace_dir(), recipe.name) as mv:
        kind, params = dense_index(cfg, mv.lite)
        lex = recipe.lexical.model_dump()
        chain = {"trtrag.encoder": encoder_name, "trtrag.dim": str(dim),
                 "trtrag.lexical": json.dumps(lex, sort_keys=True),
                 "trtrag.index": json.dumps({"type": kind, **params}, sort_keys=True)}
        props = mv.properties()
        why = None
        if prev_store is not None:
            prev_sync = (load_index_manifest(prev_gen).get("milvus") or {}).get("sync")
            changed = [k.split(".", 1)[1] for k, v in chain.items() if props.get(k) != v]
            if not prev_sync:
                why = "the previous index did not use Milvus"
            elif props.get(SYNC) != prev_sync:
                why = f"collection '{mv.name}' is not the one the previous index wrote"
            elif changed:
                why = "collection settings changed (" + ", ".join(changed) + ")"
            if why:
                notes.append(f"milvus: collection rebuilt: {why}")
        new_rows = np.arange(len(store) - n_new, len(store))
        if prev_store is not None and why is None:
            mv.set_sync("")  # a run that dies from here on leaves a collection the next run rebuilds
            gone = np.ones(len(prev_store), dtype=bool)
            gone[kept_rows] = False
            before = {int(prev_store.ids[i]): (prev_store.records[i].hash, prev_store.records[i].file)
                      for i in np.flatnonzero(gone)}
            upsert = np.array([r for r in new_rows.tolist() if before.get(int(store.ids[r]))
                               != (store.records[r].hash, store.records[r].file)], dtype=np.int64)
            delete = np.array(sorted(set(before) - {int(i) for i in store.ids[new_rows]}), dtype=np.int64)
        else:
            mv.create(chain, lex)
            upsert, delete = np.arange(len(store)), np.zeros(0, dtype=np.int64)
        if len(delete):
            mv.delete(delete)
        if len(upsert):
            recs = [store.records[i] for i in upsert.tolist()]
            mv.upsert(store.ids[upsert], [r.id for r in recs], [r.file for r in recs],
                      [" ".join(analyzer.terms(index_text(r.title, r.text))) for r in recs], store.vectors[upsert])
        rows = mv.count()
        if rows != len(store):
            raise TrtragError(f"Milvus collection '{mv.name}' holds {rows} rows after indexing, the chunk store "
                              f"{len(store)}", "re-run trtrag index (the collection will be rebuilt)")
        token = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        mv.set_sync(token)
        return {"uri": cfg.uri, "collection": mv.name, "index_type": kind, "sync": token,
                "rebuilt": bool(prev_store is None or why), "upserted": int(len(upsert)),
                "deleted": int(len(delete)), "rows": rows}
