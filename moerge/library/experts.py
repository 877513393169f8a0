"""``ExpertFiles``: the experts folder of a library, one folder per expert.

``<root>/experts/<name>/`` holds ``weights.safetensors`` and ``expert.json`` (metadata and the weights' layout).
A folder is written as a temp folder, fsynced and renamed into place; a folder it replaces is kept aside until
the manifest names the new files, so :meth:`ExpertFiles.recover` can put it back after a crash. Only safetensors
files are read, each after its sha256 matches the manifest's; a link that leads out of the library is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from moerge.adapters.expert import Expert, ExpertMetadata
from moerge.core.safe_io import (
    TMP_PREFIX,
    atomic_write_json,
    fsync_dir,
    load_safetensors_verified,
    save_safetensors,
    sha256_file,
)
from moerge.errors import LibraryError
from moerge.library.manifest import FORMAT_VERSION, discard

if TYPE_CHECKING:
    from moerge.library.remote import RemoteStore

T = TypeVar("T")

__all__ = ["ExpertFiles", "EXPERTS_DIR", "WEIGHTS_FILE", "EXPERT_FILE"]

EXPERTS_DIR = "experts"
WEIGHTS_FILE = "weights.safetensors"
EXPERT_FILE = "expert.json"
_OLD = TMP_PREFIX + "old-"  # an expert's folder moved aside while its replacement is committed


def _inside(path: Path, folder: Path, name: str, problem: str) -> Path:
    """``path``, an entry of ``folder`` itself: refused when it is a link (it could lead anywhere) or its name
    leads elsewhere (``..``, a ``/``). One ``lstat``, no resolving: it is on the path of every read."""
    if path.parent != folder or path.name in ("", ".", "..") or path.is_symlink():
        raise LibraryError(problem, expert=name, file=str(path))
    return path


def _matches(folder: Path, files: Mapping[str, str]) -> bool:
    """Whether ``folder`` holds every file of ``files`` (name → sha256) with that sha256."""
    return bool(files) and all((folder / f).is_file() and sha256_file(folder / f) == h for f, h in files.items())


def _missing(name: str, path: Path) -> LibraryError:
    return LibraryError("file listed in the manifest is missing", expert=name, file=str(path))


def _mismatch(name: str, path: Path) -> LibraryError:
    return LibraryError("sha256 does not match the manifest (file changed or corrupt)", expert=name, file=str(path))


class ExpertFiles:
    """The folders of a library's experts, under ``<root>/experts``. It knows files, not the manifest: callers
    pass the sha256 the manifest lists and commit the manifest inside :meth:`replacing`."""

    def __init__(self, root: str | Path, remote: RemoteStore | None = None) -> None:
        self.dir = Path(root) / EXPERTS_DIR
        self.remote = remote  # a library on a store: ``root`` is its mirror, filled on demand

    def folder(self, name: str) -> Path:
        """The folder of expert ``name``, refused when it or the experts folder is a link out of the library."""
        _inside(self.dir, self.dir.parent, name, "the experts folder is a link that leads out of the library")
        return _inside(self.dir / name, self.dir, name, "the expert's folder leads out of the library")

    def file(self, name: str, fname: str) -> Path:
        """File ``fname`` of expert ``name``'s folder, refused when it is a link out of the folder."""
        folder = self.folder(name)
        return _inside(folder / fname, folder, name, "the file is a link that leads out of the expert's folder")

    def read(self, name: str, fname: str, sha: str, reader: Callable[[Path], T | None]) -> T:
        """``reader(path)`` of file ``fname`` of expert ``name``, whose sha256 must be ``sha``: ``reader`` returns
        ``None`` when the file's sha256 differs and raises ``FileNotFoundError`` when it is missing. For a library
        on a store a missing or differing file is fetched (checked against ``sha``) and read once more."""
        path = self.file(name, fname)
        for fetched in (False, True):
            if fetched:
                self.remote.fetch(self.remote.expert_key(name, fname), sha, path, expert=name)  # type: ignore[union-attr]
            try:
                got = reader(path)
            except FileNotFoundError:
                if self.remote is None or fetched:
                    raise _missing(name, path) from None
                continue
            if got is not None:
                return got
            if self.remote is None or fetched:
                break
        raise _mismatch(name, path)

    def _read_checked(self, name: str, fname: str, files: Mapping[str, str]) -> bytes:
        """File ``fname`` of expert ``name``, read once and checked against its sha256 in ``files``."""
        if fname not in files:
            raise LibraryError(f"the manifest lists no {fname}", expert=name)

        def checked(path: Path) -> bytes | None:
            raw = path.read_bytes()
            return raw if hashlib.sha256(raw).hexdigest() == files[fname] else None

        return self.read(name, fname, files[fname], checked)

    def header(self, name: str, files: Mapping[str, str]) -> dict[str, Any]:
        """Expert ``name``'s ``expert.json`` (metadata and the weights' layout), checked against its sha256 in
        ``files``; the weights are not read."""
        raw = self._read_checked(name, EXPERT_FILE, files)
        meta_path = self.file(name, EXPERT_FILE)
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data.get("modules"), dict) or not isinstance(data.get("metadata"), dict):
                raise ValueError("'modules' and 'metadata' must be objects")
        except (UnicodeDecodeError, ValueError, AttributeError) as e:
            raise LibraryError(f"cannot parse: {e}", expert=name, file=str(meta_path)) from None
        return data

    def load(self, name: str, files: Mapping[str, str]) -> Expert:
        """Load expert ``name`` after checking each of ``files`` (name → sha256) against its sha256; each file is
        read once (the weights into one buffer their tensors view)."""
        for fname in files:
            if fname not in (WEIGHTS_FILE, EXPERT_FILE):
                self._read_checked(name, fname, files)
        data = self.header(name, files)
        if WEIGHTS_FILE not in files:
            raise LibraryError(f"the manifest lists no {WEIGHTS_FILE}", expert=name)
        weights = self.file(name, WEIGHTS_FILE)
        tensors = self.read(name, WEIGHTS_FILE, files[WEIGHTS_FILE],
                            lambda path: load_safetensors_verified(path, files[WEIGHTS_FILE], expert=name))
        return Expert.from_state_dict(name, data["modules"], tensors, ExpertMetadata.from_json(data["metadata"]),
                                      file=str(weights), values_checked=True)  # checked when stored: same bytes

    @contextmanager
    def replacing(self, expert: Expert, *, listed: bool) -> Iterator[dict[str, str]]:
        """Write ``expert``'s folder and move it into place, then yield its files' sha256 (name → digest) for the
        body to commit to the manifest. A folder it replaces is kept aside until the body returns; if writing,
        moving or the body fails, the folder that was there is put back (or the new one removed when the manifest
        does not list the name: ``listed`` is false)."""
        self.dir.mkdir(exist_ok=True)
        final = self.folder(expert.name)
        tmp = self.dir / f"{TMP_PREFIX}{expert.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        old: Path | None = None
        try:
            save_safetensors(tmp / WEIGHTS_FILE, expert.state_dict(), metadata={"format": "moerge-expert"})
            atomic_write_json(tmp / EXPERT_FILE, {
                "name": expert.name,
                "format_version": FORMAT_VERSION,
                "modules": expert.spec(),
                "metadata": expert.metadata.to_json(),
            })
            files = {f: sha256_file(tmp / f) for f in (WEIGHTS_FILE, EXPERT_FILE)}
            if final.exists():
                old = self.dir / f"{_OLD}{expert.name}-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            yield files
        except BaseException:
            if old is not None:
                if final.exists():
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(old, final)
            elif final.exists() and not listed:
                shutil.rmtree(final, ignore_errors=True)
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def delete(self, folder: Path) -> None:
        """Remove an expert's ``folder`` (from :meth:`folder`): renamed to a temp name first, so an interruption
        leaves a leftover that :meth:`recover` removes."""
        if folder.exists():
            trash = self.dir / f"{TMP_PREFIX}rm-{folder.name}-{uuid.uuid4().hex[:8]}"
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def recover(self, listed: Mapping[str, Mapping[str, Any]]) -> None:
        """Repair what an interrupted write left, given the manifest's entries ``listed``: put back a replaced
        expert's old folder when the manifest still names its files, then remove temp folders and the folders the
        manifest does not list."""
        for old in sorted(self.dir.glob(_OLD + "*")):
            name = old.name[len(_OLD):].rsplit("-", 1)[0]
            final = self.dir / name
            files = (listed.get(name) or {}).get("files") or {}
            if name in listed and not _matches(final, files) and _matches(old, files):
                if final.exists():
                    shutil.rmtree(final)
                os.replace(old, final)
        for p in self.dir.glob(TMP_PREFIX + "*"):
            discard(p)
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.is_dir() and not p.is_symlink() and p.name not in listed:
                    shutil.rmtree(p, ignore_errors=True)
