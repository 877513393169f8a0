"""``Entries``: the manifest's expert entries, its table of layouts, and the metadata it keeps for each expert.

An entry lists the expert's files with their sha256, a summary (kind, modules, ranks, parameters), the digest of
its weights, the id of its layout in the manifest's ``"layouts"`` table (experts of one layout share it) and its
metadata when small (the library's own base fingerprint written as ``"library"``), so that opening a library and
taking its experts in reads the manifest alone. Entries written before the table are given theirs from each
expert's ``expert.json`` (:meth:`Entries.record_old`).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from moerge.adapters.expert import Expert, ExpertMetadata, intern_layout
from moerge.core.fingerprint import compact_fingerprint
from moerge.errors import ExpertFormatError, LibraryError
from moerge.library.experts import ExpertFiles
from moerge.library.manifest import Manifest

__all__ = ["Entries", "layout_id"]

_INLINE_METADATA = 16 << 10  # metadata up to this size (as JSON) is kept in the manifest too
_LIBRARY_BASE = "library"  # inline metadata's base_fingerprint when it is the library's own (compact) fingerprint


def layout_id(spec: dict[str, Any]) -> str:
    """The id of a layout (an :meth:`Expert.spec`) in the manifest's ``"layouts"`` table."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class Entries:
    """The entries of the manifest ``manifest`` (whose experts' folders are ``experts``)."""

    def __init__(self, manifest: Manifest, experts: ExpertFiles) -> None:
        self._manifest, self._experts = manifest, experts
        self._layouts: dict[str, tuple[dict[str, Any], Any]] = {}  # layout id → (manifest's spec, shared copy)
        self._compact: tuple[Any, dict[str, Any] | None] = (None, None)  # (base fingerprint, its compact form)

    # --- writing ----------------------------------------------------------------------------------------------------
    def put(self, draft: dict[str, Any], expert: Expert, files: dict[str, str]) -> None:
        """Write ``expert``'s entry into ``draft`` (its folder holds ``files``: name → sha256), with its layout in
        the table; a replaced expert keeps its place."""
        spec = expert.spec()
        draft.setdefault("layouts", {}).setdefault(lid := layout_id(spec), spec)
        meta = self._inline(expert.metadata.to_json())
        draft["experts"][expert.name] = {
            "kind": expert.kind,
            "description": expert.metadata.description,
            "modules": len(expert.modules),
            "ranks": sorted(set(expert.ranks.values())),
            "parameters": expert.num_parameters(),
            "digest": expert.digest(),  # what routing data made for these weights records (read without the weights)
            "source": expert.metadata.source.get("type"),
            "added_at": time.time(),
            "files": files,
            "layout": lid,
            **({"metadata": meta} if meta is not None else {}),
        }

    @staticmethod
    def pruned(draft: dict[str, Any]) -> dict[str, Any]:
        """``draft`` without the layouts no expert has any more."""
        if "layouts" in draft:
            used = {e.get("layout") for e in draft["experts"].values()}
            draft["layouts"] = {k: v for k, v in draft["layouts"].items() if k in used}
        return draft

    def _inline(self, meta: dict[str, Any]) -> dict[str, Any] | None:
        """``meta`` as the manifest keeps it (as JSON gives it back; the library's own base fingerprint as a mark),
        or ``None`` when it is too large to keep there."""
        base = self._compact_base()
        if base is not None and meta.get("base_fingerprint") == base:
            meta = {**meta, "base_fingerprint": _LIBRARY_BASE}
        raw = json.dumps(meta)
        return json.loads(raw) if len(raw) <= _INLINE_METADATA else None

    def record_old(self) -> bool:
        """Give the entries written before the manifest kept layouts and metadata theirs into a draft committed
        here, from each expert's checked ``expert.json`` (once: the next open reads the manifest alone); an expert
        whose file does not read is left as it is (its reads report it). Whether anything was committed."""
        layouts = self._manifest.data.get("layouts", {})
        old = [n for n, e in self._manifest.experts.items()
               if "layout" not in e or ("metadata" not in e and e.get("layout") not in layouts)]
        if not old:
            return False
        draft, changed = self._manifest.draft(), False
        for name in old:
            try:
                data = self._experts.header(name, self._manifest.experts[name]["files"])
                intern_layout(data["modules"], name)
                ExpertMetadata.from_json(data["metadata"])
            except (LibraryError, ExpertFormatError, AttributeError, TypeError, ValueError, KeyError):
                continue
            draft.setdefault("layouts", {}).setdefault(lid := layout_id(data["modules"]), data["modules"])
            draft["experts"][name]["layout"] = lid
            meta = self._inline(data["metadata"])
            if meta is not None:
                draft["experts"][name]["metadata"] = meta
            changed = True
        if changed:
            self._manifest.commit(draft)
        return changed

    # --- reading ----------------------------------------------------------------------------------------------------
    def layout_and_metadata(self, name: str, entry: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Expert ``name``'s layout (the shared copy) and metadata (JSON) from its manifest ``entry``, or from its
        ``expert.json`` for an entry written before the table (under the manifest's thread lock)."""
        try:
            layout = self._layout(entry.get("layout"))
        except (ExpertFormatError, AttributeError, TypeError) as e:
            raise LibraryError(f"the manifest's layout of this expert is malformed: {e}", expert=name,
                               file=self._manifest.where) from None
        if layout is None or not isinstance(entry.get("metadata"), dict):
            data = self._experts.header(name, entry["files"])
            return data["modules"], data["metadata"]
        meta = entry["metadata"]
        if meta.get("base_fingerprint") == _LIBRARY_BASE:
            meta = {**meta, "base_fingerprint": self._compact_base()}
        return layout, meta

    def _compact_base(self) -> dict[str, Any] | None:
        """The compact fingerprint of the library's base: what experts added here are stamped with."""
        fp = self._manifest.data.get("base_fingerprint")
        if self._compact[0] is not fp:
            self._compact = (fp, compact_fingerprint(fp) if fp else None)
        return self._compact[1]

    def _layout(self, lid: Any) -> Any:
        """The shared, checked copy of layout ``lid`` of the manifest's table (``None`` when it lacks it); made
        once per layout, not per expert."""
        spec = self._manifest.data.get("layouts", {}).get(lid) if isinstance(lid, str) else None
        if not isinstance(spec, dict):
            return None
        if self._layouts.get(lid, (None,))[0] is not spec:  # the manifest was re-read: check its copy again
            self._layouts[lid] = (spec, intern_layout(spec))
        return self._layouts[lid][1]
