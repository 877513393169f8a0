"""``RemoteStore``: a library on object storage (an fsspec URL such as ``s3://bucket/lib``), used through a local
mirror.

The store holds a library's usual layout (``library.json``, ``experts/<name>/…``, ``routing/index/…``). moerge
works on a mirror of it, a local folder with the same layout (``$MOERGE_CACHE/remote/<name>-<hash of the URL>``):

* Reading. The manifest is downloaded when the library is opened or refreshed, the routing index when it is opened
  and under a writer's lock. An expert's files are downloaded only when the expert is first read, into a cache
  named by content (``$MOERGE_CACHE/blobs/<sha256>``, shared by every library) after their sha256 matched the
  manifest's, and linked into the mirror. A download that does not match is dropped: nothing unverified is kept.
* Writing. A change is made in the mirror as in a local library; then, at the manifest's commit, the files the new
  manifest names and the store lacks are uploaded (files first) and the manifest last. On S3 the manifest is put
  with ``If-Match`` on the ETag read under the lock (``If-None-Match: *`` for a new library), so a commit over a
  manifest someone else changed is refused, never lost. A file is never uploaded over an object the store's
  manifest lists: a replaced expert's new files go to ``experts/<name>/v-<sha256[:16]>/`` and its manifest entry
  maps them there (``"objects"``), so a reader of the old manifest still reads the old bytes.
* Writers are serialised by a lock object, ``.moerge.lock``, put only where none exists; a writer waits for it
  (``lock_timeout``), then is refused with the holder's name. A lock older than ``lock_ttl`` is taken as left by a
  writer that died.

fsspec and the store's backend (``s3fs`` for ``s3://``) are imported only when a URL is opened. ``hf://`` URLs are
read through ``huggingface_hub`` instead (:class:`HubStore`: its cache and offline mode; read-only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moerge.core.paths import cache_root
from moerge.core.safe_io import TMP_PREFIX, atomic_write_bytes, sha256_file
from moerge.errors import LibraryError

__all__ = ["RemoteStore", "HubStore", "open_store", "is_url", "local_path", "REMOTE_LOCK"]

REMOTE_LOCK = ".moerge.lock"
_MANIFEST = "library.json"
_INDEX = "routing/index"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 4 << 20
_VERSIONED = re.compile(r"experts/[^/]+/v-[0-9a-f]{16}/[^/]+")


def is_url(root: object) -> bool:
    """Whether ``root`` names a library on a store (``s3://…``) rather than a local folder (``file://`` is local)."""
    return isinstance(root, str) and bool(_URL.match(root)) and not root.startswith("file://")


def local_path(root: str | Path) -> str | Path:
    """``root`` as a local folder: a ``file://`` URL without its scheme, anything else as it is."""
    return root[len("file://"):] if isinstance(root, str) and root.startswith("file://") else root


def _precondition(e: BaseException) -> bool:
    """Whether ``e`` (or the backend error behind a :class:`LibraryError`) is a store's refusal of a conditional
    write: 412 Precondition Failed (s3fs raises ``FileExistsError`` for ``If-None-Match``, an ``OSError`` naming the
    failed pre-condition for ``If-Match``), or S3's 409 ConditionalRequestConflict (another conditional write of the
    same key under way)."""
    cause = e.__cause__ if isinstance(e, LibraryError) and e.__cause__ is not None else e
    if isinstance(cause, FileExistsError):
        return True
    text = f"{type(cause).__name__}: {cause}"
    return any(s in text for s in ("pre-conditions you specified did not hold", "PreconditionFailed",
                                   "ConditionalRequestConflict"))


def entry_files(entry: Mapping[str, Any]) -> dict[str, str]:
    """Every file of a manifest entry (its weights, metadata and routing data): name → sha256."""
    files = dict(entry.get("files") or {})
    for data in (entry.get("routing") or {}).values():
        files[data["file"]] = data["sha256"]
    return files


class RemoteStore:
    """The library at ``url`` on a store, and the local mirror moerge works on (see the module's docstring).

    Args:
        url: the library's URL, e.g. ``s3://bucket/libs/demo``.
        storage_options: passed to ``fsspec.filesystem`` (credentials, ``client_kwargs={"endpoint_url": …}``);
            S3's usual environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …) work too.
        lock_timeout: seconds a writer waits for another writer's lock before it is refused.
        lock_ttl: seconds after which a lock is taken as left by a writer that died.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None, lock_timeout: float = 60.0,
                 lock_ttl: float = 900.0) -> None:
        try:
            import fsspec
        except ImportError:
            raise LibraryError("a library on a store needs fsspec and its backend: pip install 'moerge[remote]'",
                               file=url) from None
        self.url = url.rstrip("/")
        self.protocol, self._root = fsspec.core.split_protocol(self.url)
        self._options = dict(storage_options or {})
        self.lock_timeout, self.lock_ttl = float(lock_timeout), float(lock_ttl)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self._root.rsplit("/", 1)[-1])[:40] or "library"
        self.mirror = cache_root() / "remote" / f"{slug}-{hashlib.sha256(self.url.encode()).hexdigest()[:16]}"
        self.blobs = cache_root() / "blobs"
        self.etag: str | None = None  # the store's manifest version that this object last read or wrote
        self.objects: dict[str, dict[str, str]] = {}  # expert → file → key, where not the usual place
        self._index_seen: str | None = None
        self._fs: Any = None
        self._pid = os.getpid()

    poll_interval = 1.0  # seconds between a following model's looks at the manifest (each is a request)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None  # the filesystem object holds an event loop and connections
        return state

    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():  # fsspec's async filesystems are not fork-safe
            self._pid = os.getpid()
            import fsspec

            options = dict(self._options)
            if self.protocol in ("s3", "s3a"):
                options.setdefault("use_listings_cache", False)
            try:
                self._fs = fsspec.filesystem(self.protocol, skip_instance_cache=True, **options)
            except (ImportError, ValueError) as e:
                raise LibraryError(f"cannot use a store of protocol {self.protocol!r}: {e}", file=self.url) from None
        return self._fs

    def where(self, rel: str = "") -> str:
        """The URL of ``rel`` (a path in the library), for messages."""
        return f"{self.url}/{rel}" if rel else self.url

    def _key(self, rel: str) -> str:
        return f"{self._root}/{rel}"

    def _cat(self, rel: str) -> bytes:
        """The bytes of object ``rel`` (``FileNotFoundError`` when absent)."""
        return self.fs.cat_file(self._key(rel))

    def _open(self, rel: str) -> Any:
        """Object ``rel`` opened for reading (``FileNotFoundError`` when absent)."""
        return self.fs.open(self._key(rel), "rb")

    def _call(self, what: str, rel: str, fn: Any, *args: Any, expert: str | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, its failures (but a missing object) turned into a :class:`LibraryError` that
        names ``rel``'s URL and ``expert``."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, LibraryError):
            raise
        except Exception as e:  # noqa: BLE001 - the backend's errors are many (botocore, aiohttp, OSError)
            raise LibraryError(f"{what} failed: {type(e).__name__}: {e}", expert=expert, file=self.where(rel)) \
                from e

    # --- the manifest -----------------------------------------------------------------------------------------------
    def stamp(self, rel: str = _MANIFEST) -> str | None:
        """A version of object ``rel`` on the store (its ETag where the store gives one), ``None`` when absent."""
        key = self._key(rel)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(key)
        try:
            info = self._call("reading the object's details", rel, self.fs.info, key)
        except FileNotFoundError:
            return None
        tag = info.get("ETag") or info.get("etag")
        return str(tag) if tag else json.dumps([info.get("size"), str(info.get("LastModified") or info.get("mtime"))])

    def read_manifest(self) -> bytes:
        """The store's manifest (``FileNotFoundError`` when it has none); its version is kept for the next commit."""
        for _ in range(5):
            before = self.stamp()
            if before is None:
                raise FileNotFoundError(self.where(_MANIFEST))
            data = self._call("reading the manifest", _MANIFEST, self._cat, _MANIFEST)
            if self.stamp() == before:  # not replaced while it was read
                self.etag = before
                return data
        raise LibraryError("the manifest kept changing while it was read", file=self.where(_MANIFEST))

    def note(self, manifest: Mapping[str, Any]) -> None:
        """Learn where the files of ``manifest``'s experts are on the store. An ``"objects"`` map may only name a
        file of the entry at ``experts/<name>/v-<16 hex>/<file>``: anything else is refused, so a damaged or
        hostile manifest can neither send reads elsewhere nor have a commit delete other objects."""
        objects = {}
        for name, entry in manifest.get("experts", {}).items():
            listed = entry.get("objects")
            if not listed:
                continue
            files = entry_files(entry) if isinstance(entry, Mapping) else {}
            if not isinstance(listed, Mapping) or any(
                    f not in files or not isinstance(k, str) or not _VERSIONED.fullmatch(k)
                    or k != f"experts/{name}/{k.split('/')[2]}/{f}" for f, k in listed.items()):
                raise LibraryError("the manifest entry's 'objects' names a key outside the expert's versioned "
                                   "folders", expert=name, file=self.where(_MANIFEST))
            objects[name] = dict(listed)
        self.objects = objects

    def write_manifest(self, data: bytes) -> None:
        """Put the manifest, only over the version last read (a new library: only where there is none)."""
        key = self._key(_MANIFEST)
        conditional = self.protocol in ("s3", "s3a")
        if not conditional and self.stamp() != self.etag:
            raise self._changed()
        kwargs: dict[str, Any] = {"IfMatch": self.etag} if conditional and self.etag else {}
        if conditional:  # one PUT up to S3's 5 GB limit: If-Match does not apply to a multipart upload's start
            kwargs["chunksize"] = 4 << 30
        mode = "create" if self.etag is None else "overwrite"
        try:
            self._call("writing the manifest", _MANIFEST, self.fs.pipe_file, key, data, mode=mode, **kwargs)
        except (FileExistsError, LibraryError) as e:
            if not _precondition(e):
                raise
            with contextlib.suppress(LibraryError, FileNotFoundError):  # a retried put of these very bytes
                if self._cat(_MANIFEST) == data:
                    self.etag = self.stamp()
                    return
            raise self._changed() from None
        try:
            self.etag = self.stamp()
        except LibraryError:  # written; the next read under the lock learns its version
            self.etag = None

    def _changed(self) -> LibraryError:
        return LibraryError("another writer changed the manifest on the store since it was read under the lock; "
                            "nothing was committed (try again)", file=self.where(_MANIFEST))

    # --- files ------------------------------------------------------------------------------------------------------
    def expert_key(self, name: str, fname: str) -> str:
        """Where file ``fname`` of expert ``name`` is on the store (relative to the library)."""
        return self.objects.get(name, {}).get(fname) or f"experts/{name}/{fname}"

    def fetch(self, rel: str, sha: str, dest: Path, *, expert: str | None = None) -> None:
        """Put the file ``rel`` with sha256 ``sha`` at ``dest`` in the mirror: from the content cache, or
        downloaded into it first. A download whose sha256 differs is dropped and refused, naming its URL."""
        blob = self.blobs / sha
        if not blob.is_file() or sha256_file(blob) != sha:
            self._download(rel, sha, blob, expert)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{TMP_PREFIX}link-{uuid.uuid4().hex[:8]}"
        try:
            try:
                os.link(blob, tmp)  # the mirror's file is the cached one, not a copy
            except OSError:
                shutil.copyfile(blob, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _download(self, rel: str, sha: str, blob: Path, expert: str | None) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        tmp = self.blobs / f"{TMP_PREFIX}{sha[:16]}-{uuid.uuid4().hex[:8]}"
        h = hashlib.sha256()

        def copy() -> None:
            with self._open(rel) as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())

        try:
            try:
                self._call("downloading", rel, copy, expert=expert)
            except FileNotFoundError:
                raise LibraryError("file listed in the manifest is missing on the store", expert=expert,
                                   file=self.where(rel)) from None
            if h.hexdigest() != sha:
                raise LibraryError("the downloaded file does not match the manifest's sha256 (changed on the store "
                                   "or corrupt); nothing was kept", expert=expert, file=self.where(rel))
            os.replace(tmp, blob)
        finally:
            tmp.unlink(missing_ok=True)

    def _upload(self, local: Path, rel: str, expert: str | None = None) -> None:
        self._call("uploading", rel, self.fs.put_file, str(local), self._key(rel), expert=expert)

    def _upload_new(self, local: Path, sha: str, name: str, fname: str, listed: set[str]) -> str:
        """Upload the mirror's ``local`` (file ``fname`` of expert ``name``) and return its key. The bytes sent are
        those whose sha256 was checked to be ``sha`` (a file another process of this machine replaced in the
        mirror meanwhile is refused, never uploaded under this sha256); an object is never overwritten (put only
        where none exists, S3's ``If-None-Match``): at ``experts/<name>/<fname>`` when that key is free and not
        listed, else at ``experts/<name>/v-<sha[:16]>/<fname>`` (an object already there holds these bytes, or is
        refused when read)."""
        data = local.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise LibraryError("the file changed in the local mirror while it was committed; nothing was committed "
                               "(try again)", expert=name, file=str(local))
        usual, versioned = f"experts/{name}/{fname}", f"experts/{name}/v-{sha[:16]}/{fname}"
        for key in ([usual] if usual not in listed else []) + [versioned]:
            try:
                self._call("uploading", key, self.fs.pipe_file, self._key(key), data, mode="create", expert=name)
                return key
            except (FileExistsError, LibraryError) as e:
                if not _precondition(e):
                    raise
        return versioned

    def _delete(self, rels: list[str]) -> None:
        """Remove objects no manifest names any more; a failure only leaves them (warned)."""
        if not rels:
            return
        try:
            self.fs.rm([self._key(r) for r in rels])
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - leftovers are harmless: nothing lists them
            warnings.warn(f"{self.url}: could not remove {len(rels)} unlisted object(s): {e}", RuntimeWarning,
                          stacklevel=3)

    # --- pushing a commit -------------------------------------------------------------------------------------------
    def push(self, old: Mapping[str, Any], new: dict[str, Any], mirror: Path) -> list[str]:
        """Upload from ``mirror`` the files that manifest ``new`` names and ``old`` (the store's, read under the
        lock) does not, never over an object ``old`` lists; record in ``new`` where they went. Returns the objects
        only ``old`` lists, to remove once ``new`` is committed."""
        gone: list[str] = []
        old_experts = old.get("experts", {})
        for name, entry in new["experts"].items():
            prev = old_experts.get(name)
            prev_files = entry_files(prev) if prev else {}
            prev_keys = self._keys(name, prev) if prev else {}
            objects: dict[str, str] = {}
            for fname, sha in entry_files(entry).items():
                key = prev_keys.get(fname) if prev_files.get(fname) == sha else None
                if key is None:
                    key = self._upload_new(mirror / "experts" / name / fname, sha, name, fname,
                                           listed=set(prev_keys.values()))
                if key != f"experts/{name}/{fname}":
                    objects[fname] = key
            entry.pop("objects", None)
            if objects:
                entry["objects"] = objects
            gone += sorted(set(prev_keys.values()) - set(self._keys(name, entry).values()))
        for name in set(old_experts) - set(new["experts"]):
            gone += sorted(self._keys(name, old_experts[name]).values())
        return gone

    def _keys(self, name: str, entry: Mapping[str, Any]) -> dict[str, str]:
        """Where the files of ``entry`` (of expert ``name``, checked by :meth:`note`) are on the store."""
        objects = entry.get("objects") or {}
        return {f: objects.get(f) or f"experts/{name}/{f}" for f in entry_files(entry)}

    def commit(self, old: Mapping[str, Any], new: dict[str, Any], mirror: Path) -> None:
        """Files first, the manifest last (see :meth:`push`, :meth:`write_manifest`), then the objects no longer
        listed removed."""
        gone = self.push(old, new, mirror)
        self.write_manifest((json.dumps(new, indent=2) + "\n").encode("utf-8"))
        self.note(new)
        self._delete(gone)

    # --- the routing index ------------------------------------------------------------------------------------------
    def push_index(self) -> None:
        """Upload the mirror's index folder: the files its ``index.json`` names that the store lacks, then
        ``index.json``; then remove the store's index files it no longer names."""
        folder = self.mirror / _INDEX
        meta = json.loads((folder / "index.json").read_text())
        named = set(meta.get("sha256") or {})
        for fname in sorted(named):
            rel = f"{_INDEX}/{fname}"
            if self.stamp(rel) is None:  # named by content: one that exists holds these bytes
                self._upload(folder / fname, rel)
        self._upload(folder / "index.json", f"{_INDEX}/index.json")
        self._index_seen = self.stamp(f"{_INDEX}/index.json")
        try:
            present = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self._key(_INDEX), detail=False)]
        except Exception:  # noqa: BLE001 - cleaning up is optional
            return
        self._delete([f"{_INDEX}/{f}" for f in present if f != "index.json" and f not in named])

    def pull_index(self) -> None:
        """Bring the store's routing index into the mirror when it changed (files first, ``index.json`` last); a
        store without one leaves the mirror without one. The index is derived data: a failure is warned about and
        the index is made again by the router."""
        rel, folder = f"{_INDEX}/index.json", self.mirror / _INDEX
        try:
            seen = self.stamp(rel)
            if seen == self._index_seen and (seen is None or (folder / "index.json").is_file()):
                return
            if seen is None:
                (folder / "index.json").unlink(missing_ok=True)
            else:
                raw = self._call("reading the routing index", rel, self._cat, rel)
                meta = json.loads(raw)
                for fname, sha in dict(meta.get("sha256") or {}).items():
                    if not re.fullmatch(r"[A-Za-z0-9._-]+", fname):
                        raise LibraryError(f"the index names a file {fname!r}", file=self.where(rel))
                    if not (folder / fname).is_file() or sha256_file(folder / fname) != sha:
                        self.fetch(f"{_INDEX}/{fname}", sha, folder / fname)
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(folder / "index.json", raw)
            self._index_seen = seen
        except (LibraryError, ValueError, FileNotFoundError) as e:
            warnings.warn(f"the routing index of {self.url} was not brought in ({e}); it is made again", RuntimeWarning,
                          stacklevel=3)

    # --- the writers' lock ------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's writer lock (see the module's docstring). The lock object is put only where none
        exists; a lock older than ``lock_ttl`` (by the store's clock: its LastModified) is taken over with a put
        conditional on that lock's ETag, so of two writers that find it stale only one gets it."""
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        body = json.dumps({"owner": owner, "since": time.time()}).encode()
        key, deadline, pause = self._key(REMOTE_LOCK), time.monotonic() + self.lock_timeout, 0.1
        while not self._put_lock(key, body, mode="create"):
            holder, etag, age = self._holder()
            if holder.get("owner") == owner:  # our own put, answered 412 on a retry
                break
            if etag is not None and age > self.lock_ttl:
                warnings.warn(f"{self.where(REMOTE_LOCK)}: taking over a lock held by {holder.get('owner')} for "
                              f"{age:.0f} s (over lock_ttl)", RuntimeWarning, stacklevel=3)
                if self.protocol in ("s3", "s3a"):
                    if self._put_lock(key, body, mode="overwrite", IfMatch=etag):
                        break
                else:  # no conditional overwrite: remove it and race for a new one
                    self._delete([REMOTE_LOCK])
                continue
            if time.monotonic() > deadline:
                who = "an unknown writer" if etag is None else f"{holder.get('owner')} (for {age:.0f} s)"
                raise LibraryError(f"another writer holds the library's lock: {who}; try again later, or remove "
                                   "the lock object if that writer is gone", file=self.where(REMOTE_LOCK))
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        try:
            yield
        finally:
            holder, _, _ = self._holder()
            if holder.get("owner") == owner:
                self._delete([REMOTE_LOCK])

    def _put_lock(self, key: str, body: bytes, **kwargs: Any) -> bool:
        """Put the lock object conditionally; ``False`` when the condition failed."""
        try:
            self._call("taking the writer lock", REMOTE_LOCK, self.fs.pipe_file, key, body, **kwargs)
            return True
        except (FileExistsError, LibraryError) as e:
            if _precondition(e):
                return False
            raise

    def _holder(self) -> tuple[dict[str, Any], str | None, float]:
        """The lock object's body, ETag and age in seconds by the store's clock (``({}, None, 0)`` when there is
        none or it cannot be read: a lock that cannot be read is never taken over)."""
        try:
            info = self.fs.info(self._key(REMOTE_LOCK))
            data = json.loads(self._cat(REMOTE_LOCK))
        except Exception:  # noqa: BLE001 - absent, or unreadable now
            return {}, None, 0.0
        modified = info.get("LastModified") or info.get("mtime") or info.get("created")
        try:
            stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
        except (TypeError, ValueError):
            stamp = time.time()
        etag = info.get("ETag") or json.dumps([info.get("size"), str(modified)])
        return (data if isinstance(data, dict) else {}), str(etag), max(0.0, time.time() - stamp)


class HubStore(RemoteStore):
    """A library in a Hugging Face Hub repository, read through ``huggingface_hub`` (its cache, its token, offline
    mode with ``HF_HUB_OFFLINE=1``): ``hf://org/name`` (a model repository), ``hf://datasets/org/name``, with
    ``@revision`` (a branch, tag or commit) after the name and an optional folder after that
    (``hf://datasets/org/name@v1/libs/demo``). Read-only: a write is refused (push the folder with
    ``huggingface-cli upload`` or ``HfApi.upload_folder``)."""

    _KINDS = {"datasets": "dataset", "spaces": "space", "models": "model"}
    poll_interval = 60.0  # each look asks the Hub (when online)

    def __init__(self, url: str, **options: Any) -> None:
        """``options`` as :class:`RemoteStore`'s; ``storage_options`` go to ``hf_hub_download`` (``token``,
        ``cache_dir``, …)."""
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            raise LibraryError("a library on the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub",
                               file=url) from None
        super().__init__(url, **options)
        parts = self._root.split("/")
        self.repo_type = self._KINDS.get(parts[0]) if parts and parts[0] in self._KINDS else None
        parts = parts[1:] if self.repo_type else parts
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise LibraryError("a Hub library is named hf://[datasets/]org/name[@revision][/folder]", file=url)
        name, _, self.revision = parts[1].partition("@")
        self.repo_id = f"{parts[0]}/{name}"
        self.revision = self.revision or None
        self.subfolder = "/".join(parts[2:]) or None

    def _local(self, rel: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            return Path(hf_hub_download(self.repo_id, rel, subfolder=self.subfolder, repo_type=self.repo_type,
                                        revision=self.revision, **self._options))
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as e:
            raise FileNotFoundError(self.where(rel)) from e

    def _cat(self, rel: str) -> bytes:
        return self._local(rel).read_bytes()

    def _open(self, rel: str) -> Any:
        return open(self._local(rel), "rb")

    def stamp(self, rel: str = _MANIFEST) -> str | None:
        """The file's blob in the Hub's cache, named by its ETag (``None`` when the repository lacks it)."""
        try:
            return self._call("reading from the Hub", rel, lambda: self._local(rel).resolve().name)
        except FileNotFoundError:
            return None

    def _read_only(self) -> LibraryError:
        return LibraryError("a library on the Hugging Face Hub is read-only here; change a local copy and upload it "
                            "(huggingface-cli upload)", file=self.url)

    @contextmanager
    def lock(self) -> Iterator[None]:
        raise self._read_only()
        yield  # pragma: no cover

    def write_manifest(self, data: bytes) -> None:
        raise self._read_only()


def open_store(url: str, **options: Any) -> RemoteStore:
    """The store of the library at ``url``: the Hugging Face Hub for ``hf://``, else fsspec's filesystem."""
    return (HubStore if url.startswith("hf://") else RemoteStore)(url, **options)
