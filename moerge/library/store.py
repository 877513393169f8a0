"""``ExpertLibrary``: a folder of experts with a JSON manifest.

Layout::

    <root>/library.json                      manifest: format version, base id + fingerprint, embedder,
                                             experts with the sha256 of each of their files
    <root>/experts/<name>/weights.safetensors
    <root>/experts/<name>/expert.json        metadata and the weights' layout (kind, rank, scale per module)

The manifest is the truth: an expert exists when the manifest lists it. Every write goes through a temp file or a
temp folder that is fsynced and renamed into place, and the manifest is replaced last, so a failed or interrupted
add leaves the library as it was (at worst an unlisted leftover folder, removed on the next open). Only
safetensors files are ever read, and every file is checked against its sha256 when it is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # POSIX file locks; on other platforms only threads of one process are serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from moerge.adapters.delta import expert_from_diff
from moerge.adapters.expert import Expert, ExpertMetadata, LoRAWeights, validate_name
from moerge.adapters.peft_loader import load_peft_lora
from moerge.core.fingerprint import (
    check_expert_shapes,
    compact_fingerprint,
    compare_fingerprints,
    fingerprint,
)
from moerge.core.safe_io import (
    TMP_PREFIX,
    atomic_write_json,
    fsync_dir,
    load_safetensors,
    save_safetensors,
    sha256_file,
)
from moerge.errors import BaseMismatchError, ExpertFormatError, LibraryError

__all__ = ["ExpertLibrary", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MANIFEST = "library.json"
LOCK_FILE = ".moerge.lock"
EXPERTS_DIR = "experts"
WEIGHTS_FILE = "weights.safetensors"
EXPERT_FILE = "expert.json"
ROUTING_DIR = "routing"


DEFAULT_MAX_RANK = 1024  # LoRA ranks above this are refused unless the library was made with another cap


def _check_cap(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"max_rank must be a positive integer, got {n!r}")
    return n


def _local(spec: str) -> bool:
    """Whether a base's record is a folder path (whose hub name cannot be known) rather than a model id."""
    spec = str(spec)
    return spec.startswith(("/", ".", "~")) or "\\" in spec or Path(spec).expanduser().exists()


def _model_name(spec: str) -> str:
    """A base's name for comparison: the last part of a hub id or folder path, lower case."""
    return str(spec).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


class ExpertLibrary:
    """A folder of experts made for one base model.

    Create one with :meth:`create`, open an existing one with :meth:`open`. It behaves like a read-only mapping
    from expert name to :class:`Expert` (``lib["sql"]``, ``"sql" in lib``, ``len(lib)``, ``for name in lib``),
    with :meth:`add`, :meth:`add_peft`, :meth:`add_delta` and :meth:`remove` to change it.
    """

    def __init__(self, root: str | Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self._manifest = manifest
        self._lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Serialise writers: threads of this process (an RLock) and other processes and library objects on the
        same folder (an exclusive ``flock`` on ``.moerge.lock``). The manifest is re-read under the lock, so a
        change made through another object is never overwritten."""
        with self._lock:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                self.refresh()
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def refresh(self) -> None:
        """Re-read the manifest from disk (changes made by other processes or library objects)."""
        self._manifest = self._read_manifest(self.root)

    # --- creating and opening -------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | Path,
        base_model: nn.Module | str | None = None,
        *,
        base_fingerprint: dict[str, Any] | None = None,
        exist_ok: bool = False,
        max_rank: int | None = None,
    ) -> ExpertLibrary:
        """Make a new, empty library folder at ``root``.

        Args:
            base_model: the base the experts are for: a loaded model (its id and fingerprint are recorded, and
                every expert added is checked against it) or just an id.
            base_fingerprint: a fingerprint to record when ``base_model`` is only an id.
            exist_ok: open the library if ``root`` already holds one (its base must match).
            max_rank: refuse LoRA experts of a higher rank (default :data:`DEFAULT_MAX_RANK`); recorded in the
                manifest.
        """
        root = Path(root)
        if (root / MANIFEST).exists():
            if not exist_ok:
                raise LibraryError("a library already exists here (pass exist_ok=True to open it)",
                                   file=str(root / MANIFEST))
            lib = cls.open(root)
            if isinstance(base_model, nn.Module):
                lib.check_base(base_model)
            return lib
        if root.exists() and any(root.iterdir()):
            raise LibraryError("folder is not empty and holds no library.json", file=str(root))
        if isinstance(base_model, nn.Module):
            base_id = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
            base_fingerprint = fingerprint(base_model)
        else:
            base_id = base_model
        manifest = {
            "format": "moerge-library",
            "format_version": FORMAT_VERSION,
            "base_model": base_id,
            "base_fingerprint": base_fingerprint,
            "embedder": None,
            "max_rank": DEFAULT_MAX_RANK if max_rank is None else _check_cap(max_rank),
            "created_at": time.time(),
            "experts": {},
        }
        (root / EXPERTS_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / MANIFEST, manifest)
        return cls(root, manifest)

    @classmethod
    def open(cls, root: str | Path) -> ExpertLibrary:
        """Open the library at ``root``, repairing what interrupted writes left behind."""
        lib = cls(root, cls._read_manifest(Path(root)))
        with lib._write_lock():
            lib._clean_leftovers()
        return lib

    @staticmethod
    def _read_manifest(root: Path) -> dict[str, Any]:
        path = root / MANIFEST
        if not path.is_file():
            raise LibraryError("no library here (library.json is missing)", file=str(path))
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LibraryError(f"cannot parse the manifest: {e}", file=str(path)) from None
        if not isinstance(manifest, dict) or manifest.get("format") != "moerge-library":
            raise LibraryError("not a moerge library manifest", file=str(path))
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise LibraryError(f"format_version {version!r} is not supported by this moerge (≤ {FORMAT_VERSION})",
                               file=str(path))
        if not isinstance(manifest.get("experts"), dict):
            raise LibraryError("the manifest's 'experts' is not an object", file=str(path))
        for name in manifest["experts"]:
            try:
                validate_name(name)
            except ExpertFormatError as e:
                raise LibraryError(e.problem, expert=name, file=str(path)) from None
        return manifest

    def _files_match(self, folder: Path, name: str) -> bool:
        files = self._manifest["experts"][name].get("files") or {}
        return bool(files) and all((folder / f).is_file() and sha256_file(folder / f) == h for f, h in files.items())

    def _clean_leftovers(self) -> None:
        """Repair what an interrupted write left: restore a replaced expert's old folder when the manifest still
        names its files, then remove temp files and folders the manifest does not list."""
        experts_dir = self.root / EXPERTS_DIR
        for old in sorted(experts_dir.glob(TMP_PREFIX + "old-*")):
            name = old.name[len(TMP_PREFIX + "old-"):].rsplit("-", 1)[0]
            final = experts_dir / name
            if name in self._manifest["experts"] and not self._files_match(final, name) \
                    and self._files_match(old, name):
                if final.exists():
                    shutil.rmtree(final)
                os.replace(old, final)
        for p in [*self.root.glob(TMP_PREFIX + "*"), *experts_dir.glob(TMP_PREFIX + "*")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        experts_dir = self.root / EXPERTS_DIR
        if experts_dir.is_dir():
            for p in experts_dir.iterdir():
                if p.is_dir() and not p.is_symlink() and p.name not in self._manifest["experts"]:
                    shutil.rmtree(p, ignore_errors=True)
        for name, entry in self._manifest["experts"].items():  # temp files and unlisted routing data of an expert
            folder = experts_dir / name
            if not folder.is_dir() or folder.is_symlink():
                continue
            listed = {*entry.get("files", {}), *(r.get("file") for r in entry.get("routing", {}).values())}
            for p in folder.iterdir():
                if p.is_file() and (p.name.startswith(TMP_PREFIX)
                                    or (p.name.startswith("routing-") and p.name not in listed)):
                    p.unlink(missing_ok=True)
        index_dir = self.root / ROUTING_DIR / "index"
        if index_dir.is_dir():
            for p in index_dir.glob(TMP_PREFIX + "*"):
                p.unlink(missing_ok=True)

    # --- reading ----------------------------------------------------------------------------------------------------
    @property
    def base_model(self) -> str | None:
        return self._manifest.get("base_model")

    @property
    def base_fingerprint(self) -> dict[str, Any] | None:
        return self._manifest.get("base_fingerprint")

    @property
    def embedder(self) -> dict[str, Any] | None:
        return self._manifest.get("embedder")

    def names(self) -> list[str]:
        """Expert names, in the order they were added."""
        return list(self._manifest["experts"])

    def __len__(self) -> int:
        return len(self._manifest["experts"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._manifest["experts"]

    def __getitem__(self, name: str) -> Expert:
        return self.get(name)

    def __repr__(self) -> str:
        return f"ExpertLibrary({str(self.root)!r}, experts={len(self)}, base={self.base_model!r})"

    def info(self, name: str) -> dict[str, Any]:
        """The manifest entry of ``name`` (kind, modules, ranks, description, file hashes)."""
        self._require(name)
        return dict(self._manifest["experts"][name])

    def _require(self, name: str) -> None:
        if name not in self._manifest["experts"]:
            raise LibraryError(f"no expert named {name!r}; the library holds {self.names()[:10]}", expert=name,
                               file=str(self.root / MANIFEST))

    def _expert_dir(self, name: str) -> Path:
        experts = self._inside(self.root / EXPERTS_DIR, self.root, name,
                               "the experts folder is a link that leads out of the library")
        return self._inside(experts / name, experts, name, "the expert's folder leads out of the library")

    @staticmethod
    def _inside(path: Path, folder: Path, name: str,
                problem: str = "the file is a link that leads out of the expert's folder") -> Path:
        """``path``, an entry of ``folder``: refused when it is a link (it could lead anywhere)."""
        if path.is_symlink() or (path.exists() and path.resolve().parent != folder.resolve()):
            raise LibraryError(problem, expert=name, file=str(path))
        return path

    def get(self, name: str) -> Expert:
        """Load expert ``name``, checking its files against the manifest's sha256. When they do not match, the
        manifest may be stale (another process replaced the expert): it is re-read under the library's lock and
        the load tried once more."""
        try:
            return self._get(name)
        except LibraryError as first:
            try:
                with self._write_lock():  # re-reads the manifest; no writer can change the files meanwhile
                    return self._get(name)
            except OSError:  # no lock to take (a read-only folder): the first answer stands
                raise first from None

    def _get(self, name: str) -> Expert:
        with self._lock:
            self._require(name)
            entry = self._manifest["experts"][name]
            folder = self._expert_dir(name)
            for fname, digest in entry["files"].items():
                path = self._inside(folder / fname, folder, name)
                if not path.is_file():
                    raise LibraryError("file listed in the manifest is missing", expert=name, file=str(path))
                if sha256_file(path) != digest:
                    raise LibraryError("sha256 does not match the manifest (file changed or corrupt)", expert=name,
                                       file=str(path))
            meta_path = folder / EXPERT_FILE
            try:
                data = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise LibraryError(f"cannot parse: {e}", expert=name, file=str(meta_path)) from None
            tensors = load_safetensors(folder / WEIGHTS_FILE, expert=name)
            return Expert.from_state_dict(name, data["modules"], tensors, ExpertMetadata.from_json(data["metadata"]),
                                          file=str(folder / WEIGHTS_FILE))

    def experts(self) -> Iterator[Expert]:
        """Every expert, loaded one at a time."""
        for name in self.names():
            yield self.get(name)

    def verify(self) -> list[str]:
        """Check the library as it is on disk now: every listed file's sha256, that every expert loads, every
        expert's routing data against its sha256, and that the routing index loads; returns the problems found
        (empty: ok)."""
        from moerge.library.index import ExpertIndex

        problems = []
        with self._lock:
            try:
                self.refresh()
            except LibraryError as e:
                return [str(e)]
            for name in self.names():
                try:
                    self.get(name)
                    for kind in self.routing_kinds(name):
                        self.get_routing(name, kind)
                except (LibraryError, ExpertFormatError) as e:
                    problems.append(str(e))
            index_dir = self.routing_dir / "index"
            if (index_dir / "index.json").is_file():
                dim = (self.embedder or {}).get("dim")
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error")  # a FAISS file that must be rebuilt is a problem here
                        ExpertIndex.load(index_dir, dim=dim)
                except (LibraryError, ExpertFormatError, UserWarning) as e:
                    problems.append(f"routing index {index_dir}: {e}")
        return problems

    # --- checking against a base ----------------------------------------------------------------------------------
    def check_base(self, base: nn.Module, *, strict_weights: bool = True) -> list[str]:
        """Check ``base`` against the library's recorded base.

        Raises :class:`BaseMismatchError` for another architecture or other shapes, and for other weights when
        ``strict_weights``; returns the weight differences otherwise (empty when the weights match).
        """
        expected = self.base_fingerprint
        if not expected:
            return []
        arch, weights = compare_fingerprints(expected, fingerprint(base))
        if arch:
            raise BaseMismatchError("the model is not the library's base: " + "; ".join(arch),
                                    file=str(self.root / MANIFEST))
        if weights and strict_weights:
            raise BaseMismatchError(
                "the model has the library's architecture but other weights (" + "; ".join(weights) + "); pass "
                "strict_base=False to apply the experts to this version of the base anyway",
                file=str(self.root / MANIFEST),
            )
        return weights

    @property
    def max_rank(self) -> int:
        """The highest LoRA rank an added expert may have (``max_rank`` of :meth:`create`)."""
        return int(self._manifest.get("max_rank") or DEFAULT_MAX_RANK)

    def _check_expert_against_base(self, expert: Expert, allow_other_base: bool = False) -> None:
        over = {m: w.rank for m, w in expert.modules.items() if isinstance(w, LoRAWeights) and w.rank > self.max_rank}
        if over:
            m, r = next(iter(over.items()))
            raise ExpertFormatError(f"module {m!r}: rank {r} exceeds the library's cap of {self.max_rank}",
                                    expert=expert.name)
        theirs, ours = expert.metadata.base_model, self.base_model
        if theirs and ours and not (_local(theirs) or _local(ours)) and _model_name(theirs) != _model_name(ours):
            msg = (f"made for base {theirs!r} (its base_model_name_or_path), the library's base is {ours!r}; "
                   "pass allow_other_base=True if it is the same model under another name")
            if not allow_other_base:
                raise BaseMismatchError(msg, expert=expert.name)
            warnings.warn(f"expert {expert.name!r}: {msg}", stacklevel=3)
        fp = self.base_fingerprint
        if fp and fp.get("modules"):
            check_expert_shapes(expert, fp["modules"], "the library's base")
        efp = expert.metadata.base_fingerprint
        if fp and efp:
            arch, _ = compare_fingerprints(fp, efp)
            if arch:
                raise BaseMismatchError("made for another base: " + "; ".join(arch), expert=expert.name)

    # --- writing ----------------------------------------------------------------------------------------------------
    def add(self, expert: Expert, *, overwrite: bool = False, allow_other_base: bool = False) -> Expert:
        """Add ``expert`` (post hoc: nothing else in the library changes). Atomic: on any error the library is as
        it was. Returns the expert.

        Refused: a LoRA rank above :attr:`max_rank`; shapes or modules the library's base does not have; an
        expert whose own record names another base (``base_model``, e.g. a PEFT adapter's
        ``base_model_name_or_path``, compared by model name when both are ids, not folder paths) unless
        ``allow_other_base``."""
        validate_name(expert.name)
        with self._write_lock():
            if expert.name in self and not overwrite:
                raise LibraryError("an expert with this name already exists (pass overwrite=True to replace it)",
                                   expert=expert.name, file=str(self.root / EXPERTS_DIR / expert.name))
            clash = [n for n in self._manifest["experts"] if n.lower() == expert.name.lower() and n != expert.name]
            if clash:
                raise LibraryError(f"the name differs only in case from {clash[0]!r}, which would share its folder "
                                   "on case-insensitive file systems", expert=expert.name)
            self._check_expert_against_base(expert, allow_other_base)
            if expert.metadata.base_fingerprint is None and self.base_fingerprint:
                # checked against the library's base above: record which base it was verified for
                expert = dataclasses.replace(expert, metadata=dataclasses.replace(
                    expert.metadata, base_fingerprint=compact_fingerprint(self.base_fingerprint)))
            experts_dir = self.root / EXPERTS_DIR
            experts_dir.mkdir(exist_ok=True)
            tmp = experts_dir / f"{TMP_PREFIX}{expert.name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            final = self._expert_dir(expert.name)
            old: Path | None = None
            try:
                save_safetensors(tmp / WEIGHTS_FILE, expert.state_dict(), metadata={"format": "moerge-expert"})
                atomic_write_json(tmp / EXPERT_FILE, {
                    "name": expert.name,
                    "format_version": FORMAT_VERSION,
                    "modules": expert.spec(),
                    "metadata": expert.metadata.to_json(),
                })
                entry = {
                    "kind": expert.kind,
                    "description": expert.metadata.description,
                    "modules": len(expert.modules),
                    "ranks": sorted(set(expert.ranks.values())),
                    "parameters": expert.num_parameters(),
                    "source": expert.metadata.source.get("type"),
                    "added_at": time.time(),
                    "files": {f: sha256_file(tmp / f) for f in (WEIGHTS_FILE, EXPERT_FILE)},
                }
                manifest = json.loads(json.dumps(self._manifest))
                manifest["experts"][expert.name] = entry  # a replaced expert keeps its place (and id order)
                if final.exists():
                    # kept until the manifest names the new files; open() restores it after a crash (see
                    # _clean_leftovers)
                    old = experts_dir / f"{TMP_PREFIX}old-{expert.name}-{uuid.uuid4().hex[:8]}"
                    os.replace(final, old)
                os.replace(tmp, final)
                fsync_dir(experts_dir)
                atomic_write_json(self.root / MANIFEST, manifest)
            except BaseException:
                if old is not None:
                    if final.exists():
                        shutil.rmtree(final, ignore_errors=True)
                    os.replace(old, final)
                elif final.exists() and expert.name not in self._manifest["experts"]:
                    shutil.rmtree(final, ignore_errors=True)
                raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            self._manifest = manifest
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return expert

    def add_peft(
        self, path: str | Path, name: str, *, description: str = "", examples: Iterable[str] = (),
        overwrite: bool = False, allow_other_base: bool = False, **kwargs: Any,
    ) -> Expert:
        """Add the PEFT LoRA adapter in folder ``path`` as expert ``name`` (see
        :func:`moerge.adapters.peft_loader.load_peft_lora`)."""
        expert = load_peft_lora(str(path), name=name, description=description, examples=list(examples), **kwargs)
        try:
            return self.add(expert, overwrite=overwrite, allow_other_base=allow_other_base)
        except (ExpertFormatError, BaseMismatchError) as e:
            raise e.at(str(Path(path) / "adapter_model.safetensors")) from None

    def add_delta(
        self, finetuned: nn.Module, base: nn.Module, name: str, *, description: str = "",
        examples: Iterable[str] = (), rank: int | None = None, overwrite: bool = False, **kwargs: Any,
    ) -> Expert:
        """Add the full fine-tune ``finetuned − base`` as expert ``name``, dense or (``rank=r``) low rank (see
        :func:`moerge.adapters.delta.expert_from_diff`)."""
        expert = expert_from_diff(finetuned, base, name=name, rank=rank, description=description,
                                  examples=list(examples), **kwargs)
        return self.add(expert, overwrite=overwrite)

    def remove(self, name: str) -> None:
        """Remove expert ``name``. The manifest is updated first, so an interruption leaves at worst an unlisted
        folder that the next open removes."""
        with self._write_lock():
            self._require(name)
            folder = self._expert_dir(name)
            manifest = json.loads(json.dumps(self._manifest))
            del manifest["experts"][name]
            atomic_write_json(self.root / MANIFEST, manifest)
            self._manifest = manifest
            if folder.exists():
                trash = self.root / EXPERTS_DIR / f"{TMP_PREFIX}rm-{name}-{uuid.uuid4().hex[:8]}"
                os.replace(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)

    # --- routing data -----------------------------------------------------------------------------------------------
    @property
    def routing_dir(self) -> Path:
        """Folder of library-wide routing data (the FAISS index: ``routing/index``)."""
        return self.root / ROUTING_DIR

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the library's write lock (for writers of library-wide routing data such as the index)."""
        with self._write_lock():
            yield

    def put_routing(self, name: str, kind: str, tensors: dict[str, torch.Tensor],
                    info: dict[str, Any] | None = None) -> None:
        """Store routing data ``kind`` of expert ``name`` (e.g. PHATGOOSE gate vectors) next to its weights, as
        ``experts/<name>/routing-<kind>-<random>.safetensors`` with its sha256 and ``info`` in the manifest. Replacing the
        expert's weights drops its routing data (it was made for the old weights)."""
        if not kind.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"routing data kind must be alphanumeric (with - or _), got {kind!r}")
        with self._write_lock():
            self._require(name)
            folder = self._expert_dir(name)
            # a new file name each time: the manifest names the old file until it is replaced, so a crash leaves
            # the old data valid (and at worst an unlisted file)
            fname = f"routing-{kind}-{uuid.uuid4().hex[:8]}.safetensors"
            save_safetensors(folder / fname, tensors, metadata={"format": "moerge-routing", "kind": kind})
            manifest = json.loads(json.dumps(self._manifest))
            routing = manifest["experts"][name].setdefault("routing", {})
            old = routing.get(kind, {}).get("file")
            routing[kind] = {"file": fname, "sha256": sha256_file(folder / fname),
                             "info": json.loads(json.dumps(info or {}))}
            try:
                atomic_write_json(self.root / MANIFEST, manifest)
            except BaseException:
                (folder / fname).unlink(missing_ok=True)
                raise
            self._manifest = manifest
            if old and old != fname:
                (folder / old).unlink(missing_ok=True)

    def get_routing(self, name: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Routing data ``kind`` of expert ``name`` as ``(tensors, info)``, or ``None`` if none is stored."""
        with self._lock:
            self._require(name)
            entry = self._manifest["experts"][name].get("routing", {}).get(kind)
            if entry is None:
                return None
            folder = self._expert_dir(name)
            path = self._inside(folder / entry["file"], folder, name)
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise LibraryError(f"routing data {kind!r} is missing or does not match its sha256", expert=name,
                                   file=str(path))
            return load_safetensors(path, expert=name), dict(entry.get("info") or {})

    def routing_for(self, name: str, kind: str, digest: str) -> dict[str, torch.Tensor] | None:
        """The tensors of routing data ``kind`` of expert ``name`` if they were made for the weights with ``digest``
        (see :meth:`Expert.digest`); ``None`` when the library lacks the expert, the data, or holds data made for
        other weights."""
        if name not in self:
            return None
        got = self.get_routing(name, kind)
        return got[0] if got is not None and got[1].get("digest") == digest else None

    def routing_kinds(self, name: str) -> list[str]:
        self._require(name)
        return sorted(self._manifest["experts"][name].get("routing", {}))

    def set_embedder(self, embedder_id: str, dim: int) -> None:
        """Record the sentence embedder the library's routing data was made with."""
        with self._write_lock():
            manifest = json.loads(json.dumps(self._manifest))
            manifest["embedder"] = {"id": embedder_id, "dim": int(dim)}
            atomic_write_json(self.root / MANIFEST, manifest)
            self._manifest = manifest

