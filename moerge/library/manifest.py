"""``Manifest``: a library's ``library.json`` and the lock its writers hold.

The manifest is the truth: an expert exists when the manifest lists it. It is replaced whole, through a temp file
that is fsynced and renamed over it, so a reader sees the old manifest or the new one. A writer holds
:meth:`Manifest.locked` (which re-reads the manifest), puts the files the change needs in place, then writes a
changed copy (:meth:`Manifest.draft`, :meth:`Manifest.commit`) last: a write that fails or is interrupted before
the commit leaves the manifest as it was.

A library on a store (:class:`~moerge.library.remote.RemoteStore`) has its manifest here in the store's local
mirror: reading it downloads the store's, the lock is also the store's writer lock, and a commit uploads the files
the new manifest names before the manifest itself.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # POSIX file locks; on other platforms only threads of one process are serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from moerge.adapters.expert import validate_name
from moerge.core.safe_io import TMP_PREFIX, atomic_write_bytes, atomic_write_json
from moerge.errors import ExpertFormatError, LibraryError

if TYPE_CHECKING:
    from moerge.library.remote import RemoteStore

__all__ = ["Manifest", "FORMAT_VERSION", "MANIFEST", "LOCK_FILE", "discard"]

FORMAT = "moerge-library"
FORMAT_VERSION = 1
MANIFEST = "library.json"
LOCK_FILE = ".moerge.lock"


def discard(path: Path) -> None:
    """Remove a leftover file or folder; one that is already gone is fine."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Manifest:
    """The manifest of the library at ``root``, as this object last read or wrote it, and the lock that
    serialises the library's writers: the threads of this process (an RLock) and other processes and objects on
    the same folder (an exclusive ``flock`` on ``<root>/.moerge.lock``).

    Readers take :meth:`held` (the thread lock) so that no writer of this process changes files under them;
    writers take :meth:`locked` and end with :meth:`commit`.
    """

    def __init__(self, root: str | Path, data: dict[str, Any], remote: RemoteStore | None = None) -> None:
        self.root = Path(root)
        self.path = self.root / MANIFEST
        self.remote = remote
        self._data = data
        self._seen: tuple[int, ...] | None = None  # the stat of the manifest file ``data`` was read from
        self._lock = threading.RLock()

    @property
    def where(self) -> str:
        """The manifest's location for messages: its URL on a store, else its path."""
        return self.remote.where(MANIFEST) if self.remote is not None else str(self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # --- creating and reading ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, *, base_model: str | None, base_fingerprint: dict[str, Any] | None,
               max_rank: int) -> Manifest:
        """Write the manifest of a new, empty library at ``root`` (the folder must exist)."""
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "base_fingerprint": base_fingerprint,
            "embedder": None,
            "max_rank": max_rank,
            "created_at": time.time(),
            "experts": {},
        }
        manifest = cls(root, data)
        atomic_write_json(manifest.path, data)
        return manifest

    @classmethod
    def open(cls, root: str | Path) -> Manifest:
        """Read the manifest at ``root``; refused (:class:`LibraryError` naming the file) when it is missing,
        unreadable, not a moerge library's, of a newer format or names an invalid expert."""
        root = Path(root)
        manifest = cls(root, {})
        manifest.refresh()
        return manifest

    @classmethod
    def open_remote(cls, remote: RemoteStore) -> Manifest:
        """Read the manifest of the library on a store into its mirror (made when missing)."""
        manifest = cls(remote.mirror, {}, remote)
        manifest.root.mkdir(parents=True, exist_ok=True)
        manifest.refresh()
        return manifest

    @classmethod
    def _read(cls, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise LibraryError("no library here (library.json is missing)", file=str(path))
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise LibraryError(f"cannot read the manifest: {e}", file=str(path)) from None
        return cls._parse(raw, str(path))

    @staticmethod
    def _parse(raw: bytes, where: str) -> dict[str, Any]:
        """The manifest in ``raw`` (read from ``where``), checked."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LibraryError(f"cannot parse the manifest: {e}", file=where) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LibraryError("not a moerge library manifest", file=where)
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise LibraryError(f"format_version {version!r} is not supported by this moerge (≤ {FORMAT_VERSION})",
                               file=where)
        if not isinstance(data.get("experts"), dict):
            raise LibraryError("the manifest's 'experts' is not an object", file=where)
        for name in data["experts"]:
            try:
                validate_name(name)
            except ExpertFormatError as e:
                raise LibraryError(e.problem, expert=name, file=where) from None
        return data

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the manifest from disk, or from the store (changes made by other processes or objects). A
        manifest file whose stat is the one last read is not parsed again, unless ``force`` (a writer, under the
        lock: a stat can repeat — inode reuse, coarse timestamps, NFS's attribute cache — and a draft made from a
        stale manifest would undo another writer's change)."""
        if self.remote is None:
            stamp = self.stamp()
            if force or stamp is None or stamp != self._seen:  # a rename puts every new manifest in: a new stat
                self._data = self._read(self.path)
                self._seen = stamp
            return
        try:
            raw = self.remote.read_manifest()
        except FileNotFoundError:
            raise LibraryError("no library here (library.json is missing)", file=self.where) from None
        data = self._parse(raw, self.where)
        atomic_write_bytes(self.path, raw)
        self.remote.note(data)
        self._data = data

    def stamp(self) -> tuple[int, ...] | None:
        """The stat of the manifest file (inode, size, times): a new manifest is renamed in, so it changes with
        every commit; ``None`` when the file cannot be read."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    @property
    def data(self) -> dict[str, Any]:
        """The manifest as last read or written; a writer changes a :meth:`draft`, never this."""
        return self._data

    @property
    def experts(self) -> dict[str, dict[str, Any]]:
        """Expert name → manifest entry, in the order the experts were added."""
        return self._data["experts"]

    def require(self, name: str) -> dict[str, Any]:
        """The manifest entry of expert ``name``; :class:`LibraryError` when the library does not hold it."""
        entry = self.experts.get(name)
        if entry is None:
            raise LibraryError(f"no expert named {name!r}; the library holds {list(self.experts)[:10]}",
                               expert=name, file=self.where)
        return entry

    # --- locking and writing ----------------------------------------------------------------------------------------
    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the thread lock: no writer of this process changes the manifest or the files it names meanwhile."""
        with self._lock:
            yield

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the write lock (the thread lock, the folder's ``flock`` and, for a library on a store, the store's
        writer lock) and re-read the manifest under it, so a change made through another object or process is
        never overwritten."""
        with self.locked_here():
            if self.remote is None:
                self.refresh(force=True)
                yield
                return
            with self.remote.lock():
                self.refresh()
                self.remote.pull_index()
                yield

    @contextmanager
    def locked_here(self) -> Iterator[None]:
        """Hold the thread lock and the folder's ``flock`` only (for a store's mirror: the local copy)."""
        with self._lock:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def draft(self) -> dict[str, Any]:
        """A deep copy of the manifest to change and :meth:`commit` (under :meth:`locked`)."""
        return json.loads(json.dumps(self._data))

    def commit(self, draft: dict[str, Any]) -> None:
        """Write ``draft`` over the manifest atomically and adopt it; on failure the manifest is as it was. For a
        library on a store the files ``draft`` names are uploaded first, then the manifest (see
        :meth:`RemoteStore.commit <moerge.library.remote.RemoteStore.commit>`)."""
        if self.remote is not None:
            self.remote.commit(self._data, draft, self.root)
        atomic_write_json(self.path, draft)
        self._data, self._seen = draft, None  # the next refresh reads it: another writer may follow at once

    def recover(self) -> None:
        """Remove the temp files an interrupted manifest write left in the library's folder (under :meth:`locked`)."""
        for p in self.root.glob(TMP_PREFIX + "*"):
            discard(p)
