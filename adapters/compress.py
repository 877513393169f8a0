"""Compressed experts: ComPEFT, BitDelta and low-rank SVD, stored compactly in the library.

A compressed matrix is ``scale · S`` where ``S`` is a sign pattern: ternary ``{−1, 0, +1}`` for ComPEFT (the
kept entries' positions — a bit mask, or one gap byte per kept entry when that is smaller, i.e. below a density of
about 1/8 — plus one sign bit per kept entry), binary ``{−1, +1}`` for BitDelta (one sign bit per entry); one
``scale`` per matrix. :func:`compress_expert` compresses every matrix of an expert — a dense ``ΔW``, or a LoRA
expert's ``A`` and ``B`` factors — and returns an expert whose weights are the reconstruction (what the runtime
uses, in the expert's dtype) and which the library stores in packed form (``<key>.signs`` and ``<key>.mask`` or
``<key>.gaps``, uint8; the scale in ``expert.json``). ``method="svd"`` keeps a dense ``ΔW`` as rank-``r`` LoRA factors (truncated
SVD), or cuts a LoRA expert's rank to ``r``.

The default scale is the mean magnitude of the kept entries, the least-squares best scale for a fixed sign
pattern (BitDelta's initial scale); ComPEFT's ``alpha`` gives ``alpha · std(τ)`` instead, as in its paper.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from moerge.adapters.delta import low_rank_factors, truncate_factors
from moerge.adapters.expert import DeltaWeights, Expert, LoRAWeights, ModuleWeights
from moerge.adapters.packed import (
    COMPRESSION_FORMAT,
    COMPRESSION_METHODS,
    PackedSigns,
    encode_gaps,
    pack_bits,
)

__all__ = ["PackedSigns", "compress_tensor", "compress_expert", "storage_bytes", "COMPRESSION_METHODS", "COMPRESSION_FORMAT"]


def compress_tensor(t: torch.Tensor, method: str, density: float = 0.1, alpha: float | None = None) -> PackedSigns:
    """Compress one matrix.

    ``"compeft"``: keep the ``density`` fraction of entries of largest magnitude, ternary signs, scale = the mean
    kept magnitude (or ``alpha · std(t)``). Paper: Yadav et al., "ComPEFT: Compression for Communicating Parameter
    Efficient Updates via Sparsification and Quantization", 2023.

    ``"bitdelta"``: every entry's sign, scale = mean ``|t|``. Paper: Liu et al., "BitDelta: Your Fine-Tune May
    Only Be Worth One Bit", NeurIPS 2024 (the scale before its optional distillation step).
    """
    x = t.detach().float().reshape(-1)
    n = x.numel()
    if method == "compeft":
        if not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        k = max(1, int(round(density * n)))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.topk(x.abs(), k).indices] = True
        kept = x[keep]
        scale = float(alpha * x.std()) if alpha is not None else float(kept.abs().mean())
        gaps = encode_gaps(keep.nonzero().reshape(-1))
        if gaps.numel() < math.ceil(n / 8):  # positions as gap bytes when that is smaller than a bit mask
            return PackedSigns("compeft", tuple(t.shape), scale, pack_bits(kept > 0), None, t.dtype, gaps)
        return PackedSigns("compeft", tuple(t.shape), scale, pack_bits(kept > 0), pack_bits(keep), t.dtype)
    if method == "bitdelta":
        return PackedSigns("bitdelta", tuple(t.shape), float(x.abs().mean()), pack_bits(x > 0), None, t.dtype)
    raise ValueError(f"unknown compression method {method!r}; available: {COMPRESSION_METHODS}")


def storage_bytes(expert: Expert) -> int:
    """Bytes of the expert's tensors as the library stores them (packed where compressed)."""
    return sum(t.numel() * t.element_size() for t in expert.state_dict().values())


def compress_expert(expert: Expert, method: str = "compeft", *, density: float = 0.1, alpha: float | None = None,
                    rank: int | None = None, name: str | None = None) -> Expert:
    """A compressed copy of ``expert`` (see the module docstring). ``rank`` is for ``method="svd"``.

    The copy's weights are the reconstruction, so it routes and merges like any expert; the library stores the
    packed form. Its metadata records the method, its settings and the size ratio.
    """
    expert.refuse_stacked("compression")
    if method not in COMPRESSION_METHODS:
        raise ValueError(f"unknown compression method {method!r}; available: {COMPRESSION_METHODS}")
    if expert.compressed:
        raise ValueError(f"expert {expert.name!r} is already compressed ({expert.metadata.source.get('compression')})")
    mods: dict[str, ModuleWeights] = {}
    packed: dict[str, PackedSigns] = {}
    if method == "svd":
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"method 'svd' needs a positive integer rank, got {rank!r}")
        for m, w in expert.modules.items():
            if isinstance(w, LoRAWeights):
                if w.rank <= rank:
                    mods[m] = w
                    continue
                lw = truncate_factors(w.A, w.B, rank)
                mods[m] = LoRAWeights(lw.A.to(w.A.dtype), lw.B.to(w.B.dtype), w.scale)
            else:
                if w.bias is not None:
                    raise ValueError(f"expert {expert.name!r}, module {m!r}: a bias delta cannot be kept by "
                                     "low-rank factors; compress with 'compeft' or 'bitdelta'")
                mods[m] = low_rank_factors(w.delta, rank)
    else:
        for m, w in expert.modules.items():
            if isinstance(w, LoRAWeights):
                pa = compress_tensor(w.A, method, density, alpha)
                pb = compress_tensor(w.B, method, density, alpha)
                packed[f"{m}.lora_A"], packed[f"{m}.lora_B"] = pa, pb
                mods[m] = LoRAWeights(pa.dense(), pb.dense(), w.scale)
            else:
                pd = compress_tensor(w.delta, method, density, alpha)
                packed[f"{m}.delta"] = pd
                mods[m] = DeltaWeights(pd.dense(), w.bias)
    settings: dict[str, Any] = {"method": method}
    settings.update({"density": density} if method == "compeft" else {})
    settings.update({"alpha": alpha} if method == "compeft" and alpha is not None else {})
    settings.update({"rank": rank} if method == "svd" else {})
    source = dict(expert.metadata.source, compression=settings, compressed_from=expert.name)
    out = Expert(name or expert.name, mods, dataclasses.replace(expert.metadata, source=source), compressed=packed)
    settings["size_ratio"] = storage_bytes(expert) / max(storage_bytes(out), 1)
    return out
