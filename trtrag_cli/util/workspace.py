"""The workspace of one recipe: index generations published atomically, and a lock for writers.

A generation that CURRENT no longer names is not deleted at once: readers (ask, eval, serve) hold a shared
lease on the generation they open (`lease_index`), and pruning, at the next publish, removes only a
superseded generation that nobody leases and that was superseded more than GRACE_S ago. The grace period
covers readers that take no lease (calibrate, bench) and the instant between reading CURRENT and leasing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import atomic_write_text

GRACE_S = 60.0   # a superseded generation stays at least this long after CURRENT moved on
LEASE = ".lease"  # readers hold a shared flock on it; pruning needs an exclusive one
SUPERSEDED = ".superseded"  # its mtime says when CURRENT moved on from this generation
SEGMENTS_DIR = "segments"  # index/segments/: the segments generations share (index/generation.py)
SEGMENT_LIST = "SEGMENTS"  # in a generation folder: the names of the segments it reads, one per line
# The fix of every damaged-index error: `trtrag index` notices an unreadable generation and rebuilds it.
REBUILD_HINT = "rebuild it: trtrag index <corpus> --rebuild (calibration and engines are kept)"


class Lease:
    """A shared lock on one index generation: while held, pruning leaves the folder on disk."""

    def __init__(self, path: Path, fh=None):
        self.path = path
        self._fh = fh

    def release(self) -> None:
        """Let pruning remove the generation (closing the file drops the flock; so does garbage collection)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Workspace:
    """One folder per recipe: encoder cache, index generations, lock."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def index_root(self) -> Path:
        return self.root / "index"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock for writers; a second writer fails at once instead of corrupting.

        An flock, so it dies with its process: a run killed with SIGKILL leaves the file, which records
        the last holder's pid for this message, but no lock.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / "lock", "a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().split()
                who = f" (pid {holder[0]}, since {holder[1]})" if len(holder) == 2 else ""
                raise TrtragError(f"workspace '{self.root}' is locked by another trtrag run{who}",
                                  "wait for it to finish; the lock goes when that process ends") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def current_index(self) -> Path | None:
        """The folder of the live index generation, or None when nothing was indexed."""
        name = self._pointer()
        if not name:
            return None
        gen = self.index_root / name
        return gen if gen.is_dir() else None

    def _pointer(self) -> str | None:
        """The generation name CURRENT holds; "" when it is damaged (not one `gen-*` name, as a half-written
        or garbled file, or one naming `..`, would be), None when there is no CURRENT."""
        try:
            name = (self.index_root / "CURRENT").read_bytes().decode("utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return ""
        return name if name.startswith("gen-") and "/" not in name and "\\" not in name else ""

    def require_index(self) -> Path:
        """The live index folder, or a user error telling how to build one."""
        gen = self.current_index()
        if gen is None:
            name = self._pointer()
            if name is not None:  # CURRENT is there but names nothing usable: say so, not "no index"
                what = f"names '{name}', which is missing" if name else "is damaged"
                raise TrtragError(f"the index in workspace '{self.root}' is damaged: index/CURRENT {what}",
                                  REBUILD_HINT)
            raise TrtragError(f"no index in workspace '{self.root}'", "run: trtrag index <corpus folder>")
        return gen

    def lease_index(self) -> Lease:
        """The live index folder with a shared lease on it, or a user error telling how to build one."""
        for _ in range(50):
            gen = self.require_index()
            try:
                fh = open(gen / LEASE, "a+")
            except FileNotFoundError:
                continue  # pruned between reading CURRENT and opening: read CURRENT again
            except OSError:
                return Lease(gen)  # a read-only workspace: the grace period is all there is
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)  # waits only while a pruner renames the folder away
            try:
                same = os.stat(gen / LEASE).st_ino == os.fstat(fh.fileno()).st_ino
            except OSError:
                same = False
            if same:
                return Lease(gen, fh)
            fh.close()  # the folder was pruned while we waited for the lock
        raise TrtragError(f"the index in workspace '{self.root}' changed 50 times while opening it",
                          "retry when the re-indexing loop pauses")

    def _remove_leftovers(self) -> None:
        """Remove what a killed writer left behind: an unpublished generation, a pruned one half deleted, a
        half-written CURRENT. Runs under the writer lock, so no live writer owns them."""
        for old in self.index_root.iterdir():
            if old.is_dir() and old.name.startswith((".tmp-gen-", ".trash-")):
                shutil.rmtree(old, ignore_errors=True)
            elif old.is_dir() and old.name == SEGMENTS_DIR:
                for seg in old.glob(".tmp-seg-*"):  # a killed writer's half-written segment
                    shutil.rmtree(seg, ignore_errors=True)
            elif old.is_file() and old.name.startswith(".CURRENT.") and old.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def _prune(self, keep: Path) -> None:
        """Remove superseded generations past the grace period that no one leases, and mark the ones
        superseded just now. Runs under the writer lock."""
        now = time.time()
        for old in self.index_root.iterdir():
            if not old.is_dir() or old == keep or not old.name.startswith("gen-"):
                continue
            marker = old / SUPERSEDED
            try:
                if now - marker.stat().st_mtime < GRACE_S:
                    continue
            except FileNotFoundError:
                marker.touch()
                if GRACE_S > 0:
                    continue
            try:
                fh = open(old / LEASE, "a+")
            except OSError:
                continue
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()  # a reader has it open
                continue
            trash = self.index_root / f".trash-{old.name}"
            os.rename(old, trash)  # a reader waiting for the lock sees the folder gone and reads CURRENT again
            fh.close()
            shutil.rmtree(trash, ignore_errors=True)
        self._collect_segments()

    def _collect_segments(self) -> None:
        """Delete segments that no generation on disk lists (superseded by compaction, or written by a run
        killed before it published). Runs under the writer lock, after pruning."""
        folder = self.index_root / SEGMENTS_DIR
        if not folder.is_dir():
            return
        used: set[str] = set()
        for gen in self.index_root.glob("gen-*"):
            listed = _listed_segments(gen)
            if listed is None:
                return  # a generation we cannot read might still be leased: delete nothing this time
            used.update(listed)
        for seg in folder.iterdir():
            if seg.is_dir() and seg.name not in used:
                trash = folder / f".tmp-seg-gone-{seg.name}"  # the .tmp-seg- prefix: a kill mid-delete is cleaned
                os.rename(seg, trash)
                shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def new_generation(self) -> Iterator[Path]:
        """Yield a temporary folder; on success it becomes the live index, on failure it is removed."""
        self.index_root.mkdir(parents=True, exist_ok=True)
        # A killed run's unpublished generation can be as large as this one: free the disk before writing.
        self._remove_leftovers()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-gen-", dir=self.index_root))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.index_root / f"gen-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{tmp.name[-6:]}"
        os.rename(tmp, final)
        atomic_write_text(self.index_root / "CURRENT", final.name + "\n")
        self._prune(keep=final)

    @contextlib.contextmanager
    def publish_dir(self, name: str) -> Iterator[Path]:
        """Yield a temporary folder that replaces root/name only if the block succeeds.

        The swap is one atomic exchange where Linux offers it (renameat2), so a kill never leaves the name
        empty; elsewhere the old folder is moved aside first, and a run killed between the two renames is
        repaired by the next publish of that name (the aside copy is put back before anything else).
        """
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        _restore_aside(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists() and _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # it holds the old folder now
            return
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}-{tmp.name[-6:]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _listed_segments(gen: Path) -> set[str] | None:
    """The segments a generation reads: those SEGMENTS and manifest.json name (both, so that one damaged
    file cannot get a leased segment deleted); None when a file that is there cannot be read."""
    names: set[str] = set()
    try:
        names.update((gen / SEGMENT_LIST).read_bytes().decode("utf-8").split())
    except FileNotFoundError:
        pass  # an older layout: it reads no segments
    except (OSError, UnicodeDecodeError):
        return None
    try:
        manifest = json.loads((gen / "manifest.json").read_bytes())
    except FileNotFoundError:
        return names
    except (OSError, ValueError):
        return None
    entries = manifest.get("segments") if isinstance(manifest, dict) else None
    if isinstance(entries, list):
        names.update(e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str))
    elif not isinstance(manifest, dict) or manifest.get("layout", 1) != 1:
        return None  # a manifest of the wrong shape: we cannot tell what it reads
    return names


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _restore_aside(final: Path) -> None:
    """After a run killed between moving `final` aside and moving its successor in: put the aside copy back;
    drop aside copies that a finished swap left behind."""
    asides = sorted(final.parent.glob(f".old-{final.name}-*"), key=lambda p: p.stat().st_mtime)
    if asides and not final.exists():
        os.rename(asides.pop(), final)
    for path in asides:
        shutil.rmtree(path, ignore_errors=True)
