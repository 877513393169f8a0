"""Static merges of experts' module updates.

A merge method takes, for one module, each chosen expert's dense update ``ΔW_e (out, in)`` and its weight, and
returns one update. :meth:`moerge.MoErgeModel.merge` folds the result into the base weights. Methods register by
name with :func:`register_merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["register_merge", "merge_module", "list_merge_methods"]

MergeFn = Callable[..., torch.Tensor]
_METHODS: dict[str, MergeFn] = {}


def register_merge(name: str) -> Callable[[MergeFn], MergeFn]:
    """Register a merge function ``fn(deltas, weights, **options) -> ΔW`` under ``name``."""

    def wrap(fn: MergeFn) -> MergeFn:
        _METHODS[name] = fn
        return fn

    return wrap


def list_merge_methods() -> list[str]:
    return sorted(_METHODS)


def merge_module(
    deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], method: str = "linear", **options: Any
) -> torch.Tensor:
    """Merge one module's updates ``deltas`` (expert → ``ΔW (out, in)``) with ``weights`` by ``method``."""
    if method not in _METHODS:
        raise ValueError(f"unknown merge method {method!r}; available: {list_merge_methods()}")
    missing = sorted(set(weights) - set(deltas))
    if missing:
        raise ValueError(f"no update given for experts {missing}")
    return _METHODS[method](deltas, weights, **options)


@register_merge("linear")
def linear_merge(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum ``Σ_e w_e ΔW_e`` (weights used as given; task arithmetic is this with one shared weight).

    Paper: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
    """
    out: torch.Tensor | None = None
    for name, w in weights.items():
        term = deltas[name].float() * float(w)  # (out, in)
        out = term if out is None else out + term
    assert out is not None, "no experts to merge"
    return out
