"""``ExpertLibrary``: a folder of experts with a JSON manifest.

Layout::

    <root>/library.json                      manifest: format version, base id + fingerprint, embedder,
                                             experts with the sha256 of each of their files
    <root>/experts/<name>/weights.safetensors
    <root>/experts/<name>/expert.json        metadata and the weights' layout (kind, rank, scale per module)
    <root>/experts/<name>/routing-*.safetensors   the expert's routing data, one file per kind
    <root>/routing/                          library-wide routing data (the index)

:class:`ExpertLibrary` is the face of four parts, each with one job: the manifest and the lock its writers hold
(:class:`~moerge.library.manifest.Manifest`), the experts' folders (:class:`~moerge.library.experts.ExpertFiles`),
the routing data (:class:`~moerge.library.routing_data.RoutingStore`) and the record of the base
(:class:`~moerge.library.base_record.BaseRecord`). The manifest is the truth and is written last, so a failed or
interrupted write leaves the library as it was (at worst unlisted leftovers, removed on the next open). Only
safetensors files are ever read, and every file is checked against its sha256 when it is loaded.

A library can also live on a store: ``ExpertLibrary.open("s3://bucket/lib")`` (any fsspec URL). Its files are
then read into a local mirror on demand and writes are uploaded, files first and the manifest last
(:class:`~moerge.library.remote.RemoteStore`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moerge.adapters.delta import expert_from_diff
from moerge.adapters.expert import Expert, ExpertMetadata, StoredExpert, validate_name
from moerge.adapters.peft_loader import load_peft_lora
from moerge.errors import BaseMismatchError, ExpertFormatError, LibraryError
from moerge.library.base_record import DEFAULT_MAX_RANK, BaseRecord
from moerge.library.entries import Entries
from moerge.library.experts import ExpertFiles
from moerge.library.index import ExpertIndex
from moerge.library.manifest import FORMAT_VERSION, MANIFEST, Manifest
from moerge.library.remote import RemoteStore, is_url, local_path, open_store
from moerge.library.routing_data import INDEX_DIR, RoutingStore

__all__ = ["ExpertLibrary", "FORMAT_VERSION", "DEFAULT_MAX_RANK"]


@dataclass(frozen=True)
class _Read:
    """How a :class:`StoredExpert` reads its weights: these files, checked against these sha256 (picklable)."""

    experts: ExpertFiles
    name: str
    files: dict[str, str]

    def __call__(self) -> Expert:
        return self.experts.load(self.name, self.files)


class ExpertLibrary:
    """A folder of experts made for one base model.

    Create one with :meth:`create`, open an existing one with :meth:`open`. It behaves like a read-only mapping
    from expert name to :class:`Expert` (``lib["sql"]``, ``"sql" in lib``, ``len(lib)``, ``for name in lib``),
    with :meth:`add`, :meth:`add_peft`, :meth:`add_delta` and :meth:`remove` to change it, and keeps the routing
    data routers store for its experts (:meth:`put_routing`, :meth:`routing_for`, :attr:`routing_dir`).
    """

    def __init__(self, root: str | Path, manifest: dict[str, Any] | Manifest,
                 remote: RemoteStore | None = None) -> None:
        self.root = Path(root)  # for a library on a store: its local mirror
        self.remote = remote
        self._manifest = manifest if isinstance(manifest, Manifest) else Manifest(self.root, manifest, remote)
        self._experts = ExpertFiles(self.root, remote)
        self._routing = RoutingStore(self._manifest, self._experts)
        self._entries = Entries(self._manifest, self._experts)

    @property
    def url(self) -> str:
        """Where the library is: its URL on a store, else its folder."""
        return self.remote.url if self.remote is not None else str(self.root)

    def location(self, rel: str = MANIFEST) -> str:
        """Where ``rel`` (a path in the library, by default its manifest) is, for messages: a URL or a path."""
        return self.remote.where(rel) if self.remote is not None else str(self.root / rel)

    def stamp(self) -> Any:
        """A value that changes when the library's manifest is replaced (the file's stat, or the store's ETag);
        ``None`` while the folder cannot be read or the store has no manifest (:class:`LibraryError` when the store
        cannot be reached). A model following the library polls it."""
        return self.remote.stamp() if self.remote is not None else self._manifest.stamp()

    def refresh(self) -> None:
        """Re-read the manifest from disk (changes made by other processes or library objects)."""
        with self._manifest.held():  # a writer of this process never sees its own commit replaced by an older read
            self._manifest.refresh()

    def listing(self) -> dict[str, dict[str, str]]:
        """Re-read the manifest and return each expert's files as it lists them now (name → {file: sha256}, in the
        order experts were added): an expert replaced on disk lists other hashes. A model that follows the
        library compares this with what it loaded."""
        self.refresh()
        return {name: dict(entry.get("files") or {}) for name, entry in self._manifest.experts.items()}

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
        storage_options: dict[str, Any] | None = None,
    ) -> ExpertLibrary:
        """Make a new, empty library folder at ``root``.

        Args:
            base_model: the base the experts are for: a loaded model (its id and fingerprint are recorded, and
                every expert added is checked against it) or just an id.
            base_fingerprint: a fingerprint to record when ``base_model`` is only an id.
            exist_ok: open the library if ``root`` already holds one (its base must match).
            max_rank: refuse LoRA experts of a higher rank (default :data:`DEFAULT_MAX_RANK`); recorded in the
                manifest.
            storage_options: for a URL (``s3://bucket/lib``): options of the store (see :meth:`open`).
        """
        if is_url(root):
            return cls._create_remote(open_store(str(root), storage_options=storage_options), base_model,
                                      base_fingerprint, exist_ok, max_rank)
        root = Path(local_path(root))
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
        base = BaseRecord.of(base_model, base_fingerprint, max_rank)
        ExpertFiles(root).dir.mkdir(parents=True, exist_ok=True)
        manifest = Manifest.create(root, base_model=base.model, base_fingerprint=base.fingerprint,
                                   max_rank=base.max_rank)
        return cls(root, manifest.data)

    @classmethod
    def _create_remote(cls, remote: RemoteStore, base_model: nn.Module | str | None,
                       base_fingerprint: dict[str, Any] | None, exist_ok: bool,
                       max_rank: int | None) -> ExpertLibrary:
        if remote.stamp() is not None:
            if not exist_ok:
                raise LibraryError("a library already exists here (pass exist_ok=True to open it)",
                                   file=remote.where(MANIFEST))
            lib = cls._open_remote(remote)
            if isinstance(base_model, nn.Module):
                lib.check_base(base_model)
            return lib
        base = BaseRecord.of(base_model, base_fingerprint, max_rank)
        # a mirror left by a library since removed from the store is repaired by the next open (nothing lists its
        # experts any more)
        ExpertFiles(remote.mirror).dir.mkdir(parents=True, exist_ok=True)
        manifest = Manifest.create(remote.mirror, base_model=base.model, base_fingerprint=base.fingerprint,
                                   max_rank=base.max_rank)
        try:
            remote.write_manifest(manifest.path.read_bytes())  # only where the store has none
        except LibraryError:
            if not exist_ok or remote.stamp() is None:
                raise
            return cls._create_remote(remote, base_model, base_fingerprint, exist_ok, max_rank)  # created meanwhile
        return cls(remote.mirror, manifest.data, remote)

    @classmethod
    def open(cls, root: str | Path, *, storage_options: dict[str, Any] | None = None,
             lock_timeout: float = 60.0) -> ExpertLibrary:
        """Open the library at ``root``, repairing what interrupted writes left behind.

        ``root`` is a folder or the URL of a library on a store (``s3://bucket/lib``, through fsspec; S3 needs
        ``s3fs``). ``storage_options`` go to ``fsspec.filesystem`` (credentials, ``client_kwargs``); a writer
        waits ``lock_timeout`` seconds for another writer's lock on the store before it is refused."""
        if is_url(root):
            return cls._open_remote(open_store(str(root), storage_options=storage_options,
                                                lock_timeout=lock_timeout))
        root = local_path(root)
        lib = cls(root, Manifest.open(root))
        with lib._manifest.locked():
            lib._repair()
            lib._record_layouts()
        return lib

    @classmethod
    def _open_remote(cls, remote: RemoteStore) -> ExpertLibrary:
        lib = cls(remote.mirror, Manifest.open_remote(remote), remote)
        with lib._manifest.locked_here():  # the mirror only: opening does not take the store's writer lock
            lib._repair()
            remote.pull_index()
        return lib

    def _record_layouts(self) -> None:
        try:
            self._entries.record_old()
        except OSError as e:  # a folder this process may not write: the library still opens (slower)
            warnings.warn(f"{self.url}: could not record the experts' layouts in the manifest ({e})", RuntimeWarning,
                          stacklevel=3)

    def _repair(self) -> None:
        self._manifest.recover()
        self._experts.recover(self._manifest.experts)
        self._routing.recover()

    # --- reading ----------------------------------------------------------------------------------------------------
    @property
    def base_model(self) -> str | None:
        return self._base().model

    @property
    def base_fingerprint(self) -> dict[str, Any] | None:
        return self._base().fingerprint

    @property
    def max_rank(self) -> int:
        """The highest LoRA rank an added expert may have (``max_rank`` of :meth:`create`)."""
        return self._base().max_rank

    def _base(self) -> BaseRecord:
        return BaseRecord.from_manifest(self._manifest.data, file=str(self._manifest.path))

    def names(self) -> list[str]:
        """Expert names, in the order they were added."""
        return list(self._manifest.experts)

    def __len__(self) -> int:
        return len(self._manifest.experts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._manifest.experts

    def __getitem__(self, name: str) -> Expert:
        return self.get(name)

    def __repr__(self) -> str:
        return f"ExpertLibrary({self.url!r}, experts={len(self)}, base={self.base_model!r})"

    def info(self, name: str) -> dict[str, Any]:
        """The manifest entry of ``name`` (kind, modules, ranks, description, file hashes, routing data)."""
        return dict(self._manifest.require(name))

    def get(self, name: str) -> Expert:
        """Load expert ``name``, checking its files against the manifest's sha256. When they do not match, the
        manifest may be stale (another process replaced the expert): it is re-read under the library's lock and
        the load tried once more."""
        try:
            return self._load(name)
        except LibraryError as first:
            if self.remote is not None:  # its lock is the store's writers': re-read the manifest and try again
                self.refresh()
                return self._load(name)
            try:
                with self._manifest.locked():  # re-reads the manifest; no writer can change the files meanwhile
                    return self._load(name)
            except OSError:  # no lock to take (a read-only folder): the first answer stands
                raise first from None

    def stored(self, name: str) -> StoredExpert:
        """Expert ``name`` with its weights left on disk: its metadata and layout from the manifest (from
        ``expert.json``, checked against its sha256, for an entry written before the manifest kept them), its
        weights each time they are used, checked against the sha256 the manifest
        lists now (an expert replaced on disk meanwhile is refused, never mixed with this one's layout)."""
        with self._manifest.held():
            entry = self._manifest.require(name)
            files = dict(entry["files"])
            layout, meta_json = self._entries.layout_and_metadata(name, entry)
        try:
            meta = ExpertMetadata.from_json(meta_json)
            return StoredExpert(name, meta, layout, _Read(self._experts, name, files), entry.get("digest"))
        except ExpertFormatError as e:
            raise e.at(str(self._experts.file(name, "expert.json"))) from None
        except (TypeError, ValueError, AttributeError) as e:
            raise LibraryError(f"cannot parse: {e}", expert=name,
                               file=str(self._experts.file(name, "expert.json"))) from None

    def _load(self, name: str) -> Expert:
        with self._manifest.held():
            return self._experts.load(name, self._manifest.require(name)["files"])

    def experts(self) -> Iterator[Expert]:
        """Every expert, loaded one at a time."""
        for name in self.names():
            yield self.get(name)

    def verify(self) -> list[str]:
        """Check the library as it is on disk now: every listed file's sha256, that every expert loads, every
        expert's routing data against its sha256, and that the routing index loads; returns the problems found
        (empty: ok)."""
        problems = []
        with self._manifest.held():
            try:
                self.refresh()
            except LibraryError as e:
                return [str(e)]
            for name in self.names():
                try:
                    self.get(name)
                    self._routing.verify(name)
                except (LibraryError, ExpertFormatError) as e:
                    problems.append(str(e))
            problems += self._routing.index_problems()
        return problems

    def check_base(self, base: nn.Module, *, strict_weights: bool = True) -> list[str]:
        """Check ``base`` against the library's recorded base.

        Raises :class:`BaseMismatchError` for another architecture or other shapes, and for other weights when
        ``strict_weights``; returns the weight differences otherwise (empty when the weights match).
        """
        return self._base().check_model(base, strict_weights=strict_weights)

    # --- writing ----------------------------------------------------------------------------------------------------
    def add(self, expert: Expert, *, overwrite: bool = False, allow_other_base: bool = False) -> Expert:
        """Add ``expert`` (post hoc: nothing else in the library changes). Atomic: on any error the library is as
        it was. Returns the expert.

        Refused: a LoRA rank above :attr:`max_rank`; shapes or modules the library's base does not have; an
        expert whose own record names another base (``base_model``, e.g. a PEFT adapter's
        ``base_model_name_or_path``, compared by model name when both are ids, not folder paths) unless
        ``allow_other_base``."""
        return self.add_many([expert], overwrite=overwrite, allow_other_base=allow_other_base)[0]

    def add_many(self, experts: Iterable[Expert], *, overwrite: bool = False,
                 allow_other_base: bool = False) -> list[Expert]:
        """Add several experts in one commit, all or none (each refused as by :meth:`add`; on any error the
        library is as it was). The manifest is written once: the way to make a large library, where :meth:`add`
        would rewrite it per expert."""
        experts = list(experts)
        seen: dict[str, str] = {}
        for e in experts:
            validate_name(e.name)
            if e.name.lower() in seen:
                raise LibraryError(f"the name is given twice (as {seen[e.name.lower()]!r} and {e.name!r}) in one add",
                                   expert=e.name)
            seen[e.name.lower()] = e.name
        with self._manifest.locked():
            lower = {n.lower(): n for n in self._manifest.experts}
            base, admitted = self._base(), []
            for e in experts:
                listed = e.name in self._manifest.experts
                if listed and not overwrite:
                    raise LibraryError("an expert with this name already exists (pass overwrite=True to replace it)",
                                       expert=e.name, file=str(self._experts.dir / e.name))
                if lower.get(e.name.lower(), e.name) != e.name:
                    raise LibraryError(f"the name differs only in case from {lower[e.name.lower()]!r}, which would "
                                       "share its folder on case-insensitive file systems", expert=e.name)
                admitted.append((base.admit(e, allow_other_base=allow_other_base), listed))
            with ExitStack() as stack:  # every folder put back or removed when any step fails
                draft = self._manifest.draft()
                for e, listed in admitted:
                    self._entries.put(draft, e, stack.enter_context(self._experts.replacing(e, listed=listed)))
                self._manifest.commit(self._entries.pruned(draft))
        return [e for e, _ in admitted]

    def add_peft(
        self, path: str | Path, name: str, *, description: str = "", examples: Iterable[str] = (),
        overwrite: bool = False, allow_other_base: bool = False, **kwargs: Any,
    ) -> Expert:
        """Add the PEFT LoRA adapter in folder ``path`` (or hub repository ``org/name``, with ``revision=``) as expert
        ``name`` (see :func:`moerge.adapters.peft_loader.load_peft_lora`, which takes ``kwargs``)."""
        expert = load_peft_lora(str(path), name=name, description=description, examples=list(examples), **kwargs)
        try:
            return self.add(expert, overwrite=overwrite, allow_other_base=allow_other_base)
        except (ExpertFormatError, BaseMismatchError) as e:
            folder = expert.metadata.source.get("path") or path  # a hub adapter's folder in the hub's cache
            raise e.at(str(Path(folder) / "adapter_model.safetensors")) from None

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
        with self._manifest.locked():
            self._manifest.require(name)
            folder = self._experts.folder(name)
            draft = self._manifest.draft()
            del draft["experts"][name]
            self._manifest.commit(self._entries.pruned(draft))
            self._experts.delete(folder)

    # --- routing data -----------------------------------------------------------------------------------------------
    @property
    def routing_dir(self) -> Path:
        """Folder of library-wide routing data (the FAISS index: ``routing/index``)."""
        return self._routing.dir

    def locked(self) -> AbstractContextManager[None]:
        """Hold the library's write lock (for writers of library-wide routing data such as the index)."""
        return self._manifest.locked()

    def save_index(self, index: ExpertIndex) -> None:
        """Write the routing index (under :meth:`locked`) into ``routing/index``, and to the store for a library
        on one."""
        index.save(self.routing_dir / INDEX_DIR)
        if self.remote is not None:
            self.remote.push_index()

    @property
    def embedder(self) -> dict[str, Any] | None:
        """The sentence embedder the library's routing data was made with (``{"id", "dim"}``), or ``None``."""
        return self._routing.embedder

    def set_embedder(self, embedder_id: str, dim: int) -> None:
        """Record the sentence embedder the library's routing data was made with."""
        self._routing.set_embedder(embedder_id, dim)

    def put_routing(self, name: str, kind: str, tensors: dict[str, torch.Tensor],
                    info: dict[str, Any] | None = None) -> None:
        """Store routing data ``kind`` of expert ``name`` (e.g. PHATGOOSE gate vectors) next to its weights, as
        ``experts/<name>/routing-<kind>-<random>.safetensors`` with its sha256 and ``info`` in the manifest.
        Replacing the expert's weights drops its routing data (it was made for the old weights)."""
        self._routing.put(name, kind, tensors, info)

    def drop_routing(self, name: str, kind: str) -> bool:
        """Delete routing data ``kind`` of expert ``name`` (e.g. made by an older way of computing it, so routers
        make it again when they next take the expert in); whether there was any. An unknown expert is an error."""
        return self._routing.drop(name, kind)

    def get_routing(self, name: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Routing data ``kind`` of expert ``name`` as ``(tensors, info)``, or ``None`` if none is stored."""
        return self._routing.get(name, kind)

    def routing_for(self, name: str, kind: str, digest: str) -> dict[str, torch.Tensor] | None:
        """The tensors of routing data ``kind`` of expert ``name`` if they were made for the weights with ``digest``
        (see :meth:`Expert.digest`); ``None`` when the library lacks the expert, the data, or holds data made for
        other weights."""
        return self._routing.matching(name, kind, digest)

    def has_routing_for(self, name: str, kind: str, digest: str) -> bool:
        """Whether :meth:`routing_for` would find data (read from the manifest alone: no file is loaded)."""
        return self._routing.made_for(name, kind, digest)

    def routing_kinds(self, name: str) -> list[str]:
        """The kinds of routing data stored for expert ``name``."""
        return self._routing.kinds(name)
