"""``ExpertIndex``: a FAISS index over the experts' embeddings, for a global router's top-K retrieval.

Each expert owns one or more unit vectors (its description's embedding, its examples'); an expert's score for a
query is the best inner product (cosine) of its vectors. The stored vectors are the truth: the FAISS index is
derived from them, so a corrupt, truncated or foreign index file is rebuilt rather than trusted. The index is exact
(``IndexFlatIP``) up to ``approx_threshold`` vectors and approximate (HNSW) above, and is updated in place when an
expert is added (and rebuilt from the vectors when one is removed, which HNSW cannot do in place).

On disk (a folder, e.g. ``<library>/routing/index``): ``vectors.safetensors`` (vectors + owner ids),
``index.faiss`` and ``index.json`` (dimension, embedder id, owners, sha256 of the two files).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moerge.core.safe_io import TMP_PREFIX, atomic_write_bytes, atomic_write_json, load_safetensors
from moerge.errors import LibraryError

__all__ = ["ExpertIndex", "IndexMismatchError"]

INDEX_FILE, VECTORS_FILE, META_FILE = "index.faiss", "vectors.safetensors", "index.json"


def _normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    if v.ndim == 1:
        v = v[None]
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(n, 1e-12)


class IndexMismatchError(LibraryError):
    """The index was made with another embedder (another dimension or id): its vectors mean something else."""


class ExpertIndex:
    """Top-K expert retrieval by cosine similarity over FAISS.

    Args:
        dim: embedding dimension.
        embedder: id of the embedder the vectors come from (a query from another embedder is refused).
        approx_threshold: above this many vectors, use an HNSW index instead of the exact flat one.
        hnsw_m: HNSW graph degree.
    """

    def __init__(self, dim: int, embedder: str | None = None, *, approx_threshold: int = 50_000,
                 hnsw_m: int = 32) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim, self.embedder = dim, embedder
        self.approx_threshold, self.hnsw_m = approx_threshold, hnsw_m
        self._buf = np.zeros((0, dim), dtype=np.float32)  # (capacity, dim): rows [0, V) are the unit vectors
        self._obuf = np.zeros((0,), dtype=np.int64)  # (capacity,): rows [0, V) are owner ids into self._names
        self._n = 0
        self._names: list[str] = []
        self._pos: dict[str, int] = {}  # name -> owner id
        self._keys: dict[str, str] = {}  # expert -> key of the texts its vectors were made from
        self._max_per = 0  # most vectors one expert has (how deep a search must look to see k experts)
        self._index: Any = None

    # --- contents ---------------------------------------------------------------------------------------------------
    @property
    def _vectors(self) -> np.ndarray:
        return self._buf[: self._n]

    @property
    def _owner(self) -> np.ndarray:
        return self._obuf[: self._n]

    def _set(self, vectors: np.ndarray, owner: np.ndarray, names: list[str]) -> None:
        self._buf, self._obuf, self._n = np.ascontiguousarray(vectors, dtype=np.float32), owner.astype(np.int64), len(
            vectors)
        self._names = list(names)
        self._pos = {n: i for i, n in enumerate(self._names)}
        self._max_per = int(np.bincount(self._owner).max()) if self._n else 0
        self._index = None

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._pos

    @property
    def approximate(self) -> bool:
        return self._n > self.approx_threshold

    def _check_dim(self, v: np.ndarray, what: str) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"{what} has dimension {v.shape[-1] if v.ndim else '?'}, the index has {self.dim}"
                             f"{f' (embedder {self.embedder})' if self.embedder else ''}")
        if not np.isfinite(v).all():
            raise ValueError(f"{what} contains NaN or Inf")
        return v

    def key(self, name: str) -> str | None:
        """The key given with ``name``'s vectors (e.g. a hash of the texts they embed), to tell if they are stale."""
        return self._keys.get(name) if name in self else None

    def vectors(self, name: str) -> np.ndarray:
        """``name``'s unit vectors ``(n, dim)``."""
        if name not in self:
            raise KeyError(f"no expert {name!r} in the index")
        return self._vectors[self._owner == self._pos[name]].copy()

    def add(self, name: str, vectors: np.ndarray | torch.Tensor, key: str | None = None) -> None:
        """Add (or replace) ``name``'s vectors ``(n, dim)``; other experts' entries are untouched. Amortised O(n):
        the storage grows by doubling, and an exact FAISS index is extended in place."""
        v = _normalize(self._check_dim(vectors.numpy() if isinstance(vectors, torch.Tensor) else vectors,
                                       f"the vectors of expert {name!r}"))
        if len(v) == 0:
            raise ValueError(f"expert {name!r}: no vectors to add")
        if name in self:
            self.remove(name)
        owner = len(self._names)
        self._names.append(name)
        self._pos[name] = owner
        if key is not None:
            self._keys[name] = key
        start, end = self._n, self._n + len(v)
        if end > len(self._buf):  # grow by doubling
            cap = max(end, 2 * len(self._buf), 64)
            buf = np.zeros((cap, self.dim), dtype=np.float32)
            obuf = np.zeros((cap,), dtype=np.int64)
            buf[:start], obuf[:start] = self._buf[:start], self._obuf[:start]
            self._buf, self._obuf = buf, obuf
        self._buf[start:end], self._obuf[start:end] = v, owner
        self._n = end
        self._max_per = max(self._max_per, len(v))
        if self._index is not None and self._index_kind() == self._wanted_kind():
            self._index.add_with_ids(v, np.arange(start, end, dtype=np.int64))
        else:
            self._index = None  # rebuilt lazily (first use, or the exact → approximate switch)

    def remove(self, name: str) -> None:
        """Remove ``name``'s vectors (the FAISS index is rebuilt on the next search)."""
        if name not in self:
            raise KeyError(f"no expert {name!r} in the index")
        gone = self._pos[name]
        keep = self._owner != gone
        owner = self._owner[keep]
        names = self._names[:gone] + self._names[gone + 1 :]
        self._keys.pop(name, None)
        self._set(self._vectors[keep], owner - (owner > gone), names)  # owner ids stay compact

    # --- FAISS ------------------------------------------------------------------------------------------------------
    def _wanted_kind(self) -> str:
        return "hnsw" if self.approximate else "flat"

    def _index_kind(self) -> str:
        import faiss

        inner = faiss.downcast_index(self._index.index) if hasattr(self._index, "index") else self._index
        return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"

    def _build(self) -> Any:
        import faiss

        if self.approximate:
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = 64
        else:
            inner = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIDMap(inner)
        if len(self._vectors):
            index.add_with_ids(self._vectors, np.arange(len(self._vectors), dtype=np.int64))
        return index

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` best experts per query row: ``(names per row, scores (B, k))``; rows are padded with ``""`` and
        ``-inf`` when the index holds fewer than ``k`` experts."""
        q = _normalize(self._check_dim(queries.numpy() if isinstance(queries, torch.Tensor) else queries, "the query"))
        if self._index is None:
            self._index = self._build()
        n_experts = len(self)
        depth = min(self._n, max(k, 1) * max(1, self._max_per))
        names_out: list[list[str]] = []
        scores_out = np.full((len(q), k), -np.inf, dtype=np.float32)
        if depth == 0:
            return [[""] * k for _ in q], scores_out
        sims, ids = self._index.search(q, depth)  # (B, depth)
        for b in range(len(q)):
            best: dict[int, float] = {}
            for s, i in zip(sims[b], ids[b]):
                if i < 0:
                    continue
                o = int(self._owner[i])
                if o not in best:  # results come best first: the first hit of an expert is its max
                    best[o] = float(s)
                if len(best) == min(k, n_experts):
                    break
            ranked = sorted(best.items(), key=lambda t: -t[1])[:k]
            names_out.append([self._names[o] for o, _ in ranked] + [""] * (k - len(ranked)))
            scores_out[b, : len(ranked)] = [s for _, s in ranked]
        return names_out, scores_out

    # --- persistence ------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write the index folder, crash-safe: the vectors and the FAISS index go to new files named by their
        content's sha256, then ``index.json`` (atomic) switches to them, then the files it no longer names are
        removed. A process killed at any point leaves ``index.json`` naming complete files."""
        import faiss
        from safetensors.torch import save as st_save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self._index is None:
            self._index = self._build()
        blobs = {
            "vectors": (st_save({"vectors": torch.from_numpy(self._vectors.copy()),
                                 "owner": torch.from_numpy(self._owner.copy())}), ".safetensors"),
            "faiss": (faiss.serialize_index(self._index).tobytes(), ".faiss"),
        }
        files, digest = {}, {}
        for role, (data, suffix) in blobs.items():
            h = hashlib.sha256(data).hexdigest()
            fname = f"{role}-{h[:16]}{suffix}"
            if not (folder / fname).is_file() or hashlib.sha256((folder / fname).read_bytes()).hexdigest() != h:
                atomic_write_bytes(folder / fname, data)
            files[role], digest[fname] = fname, h
        atomic_write_json(folder / META_FILE, {"format": "moerge-index", "dim": self.dim, "embedder": self.embedder,
                                               "names": self._names, "keys": self._keys,
                                               "approx_threshold": self.approx_threshold, "hnsw_m": self.hnsw_m,
                                               "files": files, "sha256": digest})
        for p in folder.iterdir():  # what an earlier save (or one killed midway) left; nothing else is touched
            ours = (p.name.startswith(("vectors-", "faiss-", TMP_PREFIX)) or p.name in (VECTORS_FILE, INDEX_FILE))
            if p.is_file() and ours and p.name not in digest:
                p.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: str | Path, *, dim: int | None = None, embedder: str | None = None) -> ExpertIndex:
        """Read an index folder. ``dim`` / ``embedder``, when given, must match. A FAISS file that is missing,
        corrupt, of another size or of other contents than its vectors is rebuilt from the vectors (with a
        warning), never trusted."""
        import faiss

        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LibraryError(f"cannot read the index metadata: {e}", file=str(folder / META_FILE)) from None
        if dim is not None and meta.get("dim") != dim:
            raise IndexMismatchError(f"the index was built for dimension {meta.get('dim')}, the embedder gives {dim}; "
                               "rebuild it for this embedder", file=str(folder / META_FILE))
        if embedder is not None and meta.get("embedder") not in (None, embedder):
            raise IndexMismatchError(f"the index was built with embedder {meta.get('embedder')!r}, not {embedder!r}",
                               file=str(folder / META_FILE))
        files = meta.get("files") or {"vectors": VECTORS_FILE, "faiss": INDEX_FILE}  # without a "files" entry: the fixed default names
        vec_path = folder / str(files.get("vectors"))
        try:
            if hashlib.sha256(vec_path.read_bytes()).hexdigest() != meta["sha256"].get(vec_path.name):
                raise LibraryError("the stored vectors do not match their sha256", file=str(vec_path))
        except OSError as e:
            raise LibraryError(f"the stored vectors cannot be read: {e}", file=str(vec_path)) from None
        except (KeyError, TypeError, AttributeError):
            raise LibraryError("the index metadata is incomplete", file=str(folder / META_FILE)) from None
        t = load_safetensors(vec_path)
        idx = cls(int(meta["dim"]), meta.get("embedder"), approx_threshold=int(meta["approx_threshold"]),
                  hnsw_m=int(meta["hnsw_m"]))
        vectors, owner, names = t["vectors"].numpy().astype(np.float32), t["owner"].numpy().astype(np.int64), list(
            meta["names"])
        idx._keys = {str(k): str(v) for k, v in dict(meta.get("keys") or {}).items()}
        if (vectors.ndim != 2 or vectors.shape[1:] != (idx.dim,) or len(owner) != len(vectors)
                or (len(owner) and (owner.min() < 0 or owner.max() >= len(names)))
                or len(set(owner.tolist())) != len(names) or len(set(names)) != len(names)):
            raise LibraryError("the stored vectors do not match the index's names and dimension", file=str(vec_path))
        idx._set(vectors, owner, names)
        index_path = folder / str(files.get("faiss"))
        try:
            data = index_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"].get(index_path.name):
                raise ValueError("sha256 mismatch")
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            if index.ntotal != len(idx._vectors) or index.d != idx.dim:
                raise ValueError(f"it holds {index.ntotal} vectors of dimension {index.d}")
            idx._index = index
        except (OSError, ValueError, RuntimeError) as e:
            warnings.warn(f"{index_path}: FAISS index not usable ({e}); rebuilt from the stored vectors",
                          stacklevel=2)
            idx._index = idx._build()
        return idx
