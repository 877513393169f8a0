"""Libraries derived from another library by a transform of its experts."""

from __future__ import annotations

from pathlib import Path

import torch

from moerge.adapters.twin_split import twin_split
from moerge.library.store import ExpertLibrary

__all__ = ["make_twin_library"]


def make_twin_library(source: ExpertLibrary | str | Path, root: str | Path, rank: int = 8,
                      dtype: torch.dtype = torch.bfloat16) -> ExpertLibrary:
    """A new library at ``root`` holding the Twin-Merging split of every expert of library ``source``: the shared
    expert (:data:`~moerge.adapters.twin_split.SHARED_NAME`) and each expert's rank-``rank`` exclusive part, for
    the ``twin`` router."""
    src = source if isinstance(source, ExpertLibrary) else ExpertLibrary.open(source)
    shared, exclusive = twin_split([src.get(n) for n in src.names()], rank=rank, dtype=dtype)
    lib = ExpertLibrary.create(root, base_model=src.base_model, base_fingerprint=src.base_fingerprint)
    lib.add(shared)
    for e in exclusive:
        lib.add(e)
    return lib
