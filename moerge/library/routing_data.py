"""``RoutingStore``: the routing data a library keeps for its routers.

Per expert, data of one kind (e.g. PHATGOOSE gate vectors) is a file next to its weights,
``experts/<name>/routing-<kind>-<random>.safetensors``, listed with its sha256 and an ``info`` object in the
expert's manifest entry under ``"routing"``. A write gets a new file name every time and the manifest is switched
to it before the old file is deleted, so a crash leaves the old data valid. Library-wide routing data lives in
``<root>/routing`` (GLIDER's index in ``routing/index``), and the manifest records the sentence embedder it was
made with.
"""

from __future__ import annotations

import json
import uuid
import warnings
from typing import Any

import torch

from moerge.core.safe_io import TMP_PREFIX, load_safetensors_verified, save_safetensors, sha256_file
from moerge.errors import ExpertFormatError, LibraryError
from moerge.library.experts import ExpertFiles
from moerge.library.index import ExpertIndex
from moerge.library.manifest import Manifest

__all__ = ["RoutingStore", "ROUTING_DIR", "INDEX_DIR"]

ROUTING_DIR = "routing"
INDEX_DIR = "index"  # the routing index's folder inside ROUTING_DIR
_PREFIX = "routing-"  # names of the per-expert routing data files


class RoutingStore:
    """The routing data of the library whose manifest is ``manifest`` and whose expert folders are ``experts``."""

    def __init__(self, manifest: Manifest, experts: ExpertFiles) -> None:
        self._manifest = manifest
        self._experts = experts
        self.dir = manifest.root / ROUTING_DIR

    @property
    def embedder(self) -> dict[str, Any] | None:
        """The sentence embedder the routing data was made with (``{"id", "dim"}``), or ``None``."""
        return self._manifest.data.get("embedder")

    def set_embedder(self, embedder_id: str, dim: int) -> None:
        """Record the sentence embedder the routing data was made with."""
        with self._manifest.locked():
            draft = self._manifest.draft()
            draft["embedder"] = {"id": embedder_id, "dim": int(dim)}
            self._manifest.commit(draft)

    def put(self, name: str, kind: str, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> None:
        """Store data ``kind`` of expert ``name`` with ``info``, replacing what was stored of that kind."""
        if not kind.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"routing data kind must be alphanumeric (with - or _), got {kind!r}")
        with self._manifest.locked():
            self._manifest.require(name)
            folder = self._experts.folder(name)
            folder.mkdir(parents=True, exist_ok=True)  # in a store's mirror, an expert not read yet has none
            # a new file name each time: the manifest names the old file until it is replaced, so a crash leaves
            # the old data valid (and at worst an unlisted file)
            fname = f"{_PREFIX}{kind}-{uuid.uuid4().hex[:8]}.safetensors"
            save_safetensors(folder / fname, tensors, metadata={"format": "moerge-routing", "kind": kind})
            draft = self._manifest.draft()
            routing = draft["experts"][name].setdefault("routing", {})
            old = routing.get(kind, {}).get("file")
            routing[kind] = {"file": fname, "sha256": sha256_file(folder / fname),
                             "info": json.loads(json.dumps(info or {}))}
            try:
                self._manifest.commit(draft)
            except BaseException:
                (folder / fname).unlink(missing_ok=True)
                raise
            if old and old != fname:
                (folder / old).unlink(missing_ok=True)

    def drop(self, name: str, kind: str) -> bool:
        """Delete data ``kind`` of expert ``name`` (its file after the manifest no longer names it); whether there
        was any."""
        with self._manifest.locked():
            self._manifest.require(name)
            draft = self._manifest.draft()
            entry = draft["experts"][name].get("routing", {}).pop(kind, None)
            if entry is None:
                return False
            self._manifest.commit(draft)
            (self._experts.folder(name) / entry["file"]).unlink(missing_ok=True)
            return True

    def get(self, name: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Data ``kind`` of expert ``name`` as ``(tensors, info)``, checked against its sha256; ``None`` if none is
        stored."""
        with self._manifest.held():
            entry = self._manifest.require(name).get("routing", {}).get(kind)
            if entry is None:
                return None
            try:
                tensors = self._experts.read(name, entry["file"], entry["sha256"],
                                             lambda p: load_safetensors_verified(p, entry["sha256"], expert=name))
            except LibraryError as e:
                raise LibraryError(f"routing data {kind!r}: {e.problem}", expert=name, file=e.file) from None
            return tensors, dict(entry.get("info") or {})

    def made_for(self, name: str, kind: str, digest: str) -> bool:
        """Whether the manifest lists data ``kind`` of expert ``name`` made for the weights with ``digest`` (only
        the manifest is read)."""
        with self._manifest.held():
            entry = self._manifest.experts.get(name, {}).get("routing", {}).get(kind)
        return entry is not None and (entry.get("info") or {}).get("digest") == digest

    def matching(self, name: str, kind: str, digest: str) -> dict[str, torch.Tensor] | None:
        """The tensors of data ``kind`` of expert ``name`` if they were made for the weights with ``digest``;
        ``None`` when the library lacks the expert, the data, or holds data made for other weights (then no file
        is read)."""
        if not self.made_for(name, kind, digest):
            return None
        got = self.get(name, kind)
        return got[0] if got is not None and got[1].get("digest") == digest else None

    def kinds(self, name: str) -> list[str]:
        """The kinds of routing data stored for expert ``name``."""
        return sorted(self._manifest.require(name).get("routing", {}))

    def verify(self, name: str) -> None:
        """Load every kind of routing data of expert ``name``, raising on the first that does not load."""
        for kind in self.kinds(name):
            self.get(name, kind)

    def index_problems(self) -> list[str]:
        """What is wrong with the stored routing index (empty when it loads or there is none)."""
        index_dir = self.dir / INDEX_DIR
        if not (index_dir / "index.json").is_file():
            return []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a FAISS file that must be rebuilt is a problem here
                ExpertIndex.load(index_dir, dim=(self.embedder or {}).get("dim"))
        except (LibraryError, ExpertFormatError, UserWarning) as e:
            return [f"routing index {index_dir}: {e}"]
        return []

    def recover(self) -> None:
        """Remove what interrupted writes left (under the manifest's lock): temp files and routing data files the
        manifest does not list in the experts' folders, and temp files in the index folder."""
        for name, entry in self._manifest.experts.items():
            folder = self._experts.dir / name
            if not folder.is_dir() or folder.is_symlink():
                continue
            listed = {r.get("file") for r in entry.get("routing", {}).values()}
            for p in folder.iterdir():
                if p.is_file() and (p.name.startswith(TMP_PREFIX) or (p.name.startswith(_PREFIX)
                                                                      and p.name not in listed)):
                    p.unlink(missing_ok=True)
        index_dir = self.dir / INDEX_DIR
        if index_dir.is_dir():
            for p in index_dir.glob(TMP_PREFIX + "*"):
                p.unlink(missing_ok=True)
