"""Keeping a Milvus collection in step with the index's segments: the glue between `trtrag index`'s
segments (index/chunks.py, index/generation.py) and the Milvus store (index/milvus.py), which stay
independent of each other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trtrag_cli.index.milvus import BATCH, SYNC, MilvusIndex, dense_index
from trtrag_cli.util.errors import TrtragError


def sync_collection(recipe, encoder_name: str, dim: int, prev, gone: list, new_records: list,
                    new_vectors: np.ndarray, segments: list, index_root: Path, analyzer, notes: list[str]) -> dict:
    """Bring the recipe's Milvus collection in step with the new generation; returns the manifest's record.

    In place when the collection is the one the previous generation wrote (its trtrag.sync token) with the
    same chain: chunks that died are deleted unless they come back, and only new or changed chunks are
    upserted. Otherwise the collection is made anew from every live chunk of `segments`.
    prev: the generation updated (None: a full build); gone: (segment, row, file, hash) of rows that died.
    """
    import time
    import uuid

    from trtrag_cli.corpus.chunking import index_text
    from trtrag_cli.index.chunks import ChunkRecord, Segment, int_id
    from trtrag_cli.index.generation import load_index_manifest
    from trtrag_cli.util.workspace import SEGMENTS_DIR

    cfg = recipe.index
    with MilvusIndex(cfg, recipe.workspace_dir(), recipe.name) as mv:
        kind, params = dense_index(cfg, mv.lite)
        lex = recipe.lexical.model_dump()
        chain = {"trtrag.encoder": encoder_name, "trtrag.dim": str(dim),
                 "trtrag.lexical": json.dumps(lex, sort_keys=True),
                 "trtrag.index": json.dumps({"type": kind, **params}, sort_keys=True)}
        props = mv.properties()
        why = None
        if prev is not None:
            prev_sync = (load_index_manifest(prev.gen).get("milvus") or {}).get("sync")
            changed = [k.split(".", 1)[1] for k, v in chain.items() if props.get(k) != v]
            if not prev_sync:
                why = "the previous index did not use Milvus"
            elif props.get(SYNC) != prev_sync:
                why = f"collection '{mv.name}' is not the one the previous index wrote"
            elif changed:
                why = "collection settings changed (" + ", ".join(changed) + ")"
            if why:
                notes.append(f"milvus: collection rebuilt: {why}")

        def put(records, vectors) -> None:
            mv.upsert(np.array([int_id(r.id) for r in records], dtype=np.int64), [r.id for r in records],
                      [r.file for r in records], [" ".join(analyzer.terms(index_text(r.title, r.text)))
                                                  for r in records], vectors)

        upserted, deleted = 0, 0
        if prev is not None and why is None:
            mv.set_sync("")  # a run that dies from here on leaves a collection the next run rebuilds
            before = {int(prev.store.segments[s].ids[row]): (h, f) for s, row, f, h in gone}
            fresh = [i for i, r in enumerate(new_records) if before.get(int_id(r.id)) != (r.hash, r.file)]
            delete = sorted(set(before) - {int_id(r.id) for r in new_records})
            if delete:
                mv.delete(np.array(delete, dtype=np.int64))
            if fresh:
                put([new_records[i] for i in fresh], new_vectors[fresh])
            upserted, deleted = len(fresh), len(delete)
        else:
            mv.create(chain, lex)
            for name, _, dead in segments:  # every live chunk, a batch at a time
                seg = Segment(index_root / SEGMENTS_DIR / name)
                try:
                    live_rows = [(row, ChunkRecord(*values)) for row, values in seg.scan() if not dead[row]]
                    for at in range(0, len(live_rows), BATCH * 8):
                        part = live_rows[at:at + BATCH * 8]
                        put([r for _, r in part], np.asarray(seg.vectors[[row for row, _ in part]]))
                        upserted += len(part)
                finally:
                    seg.close()
        rows = mv.count()
        live = sum(n - int(dead.sum()) for _, n, dead in segments)
        if rows != live:
            raise TrtragError(f"Milvus collection '{mv.name}' holds {rows} rows after indexing, the chunk store "
                              f"{live}", "re-run trtrag index (the collection will be rebuilt)")
        token = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        mv.set_sync(token)
        return {"uri": cfg.uri, "collection": mv.name, "index_type": kind, "sync": token,
                "rebuilt": bool(prev is None or why), "upserted": upserted, "deleted": deleted, "rows": rows}
