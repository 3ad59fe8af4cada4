"""The workspace of one recipe: index generations published atomically, and a lock for writers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.files import atomic_write_text


class Workspace:
    """One folder per recipe: encoder cache, index generations, lock."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def index_root(self) -> Path:
        return self.root / "index"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock for writers; a second writer fails at once instead of corrupting."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / "lock", "a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TrtragError(f"workspace '{self.root}' is locked by another trtrag run",
                                  "wait for it to finish, or remove a stale lock holder") from None
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
        pointer = self.index_root / "CURRENT"
        if not pointer.is_file():
            return None
        gen = self.index_root / pointer.read_text().strip()
        return gen if gen.is_dir() else None

    def require_index(self) -> Path:
        """The live index folder, or a user error telling how to build one."""
        gen = self.current_index()
        if gen is None:
            raise TrtragError(f"no index in workspace '{self.root}'", "run: trtrag index <corpus folder>")
        return gen

    @contextlib.contextmanager
    def new_generation(self) -> Iterator[Path]:
        """Yield a temporary folder; on success it becomes the live index, on failure it is removed."""
        self.index_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-gen-", dir=self.index_root))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        previous = self.current_index()
        final = self.index_root / f"gen-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{tmp.name[-6:]}"
        os.rename(tmp, final)
        atomic_write_text(self.index_root / "CURRENT", final.name + "\n")
        for old in self.index_root.iterdir():
            if old.is_dir() and old != final and (old == previous or old.name.startswith(("gen-", ".tmp-gen-"))):
                shutil.rmtree(old, ignore_errors=True)

    @contextlib.contextmanager
    def publish_dir(self, name: str) -> Iterator[Path]:
        """Yield a temporary folder that replaces root/name only if the block succeeds."""
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}-{tmp.name[-6:]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
