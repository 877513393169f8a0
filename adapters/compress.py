"""Compressed experts: ComPEFT, BitDelta and low-rank SVD, stored compactly in the library.

A compressed matrix is ``scale · S`` where ``S`` is a sign pattern: ternary ``{−1, 0, +1}`` for ComPEFT (a
bit mask of the kept entries plus one sign bit per kept entry), binary ``{−1, +1}`` for BitDelta (one sign bit per
entry); one ``scale`` per matrix. :func:`compress_expert` compresses every matrix of an expert — a dense ``ΔW``, or
a LoRA expert's ``A`` and ``B`` factors — and returns an expert whose weights are the reconstruction (what the
runtime uses, in the expert's dtype) and which the library stores in packed form (``<key>.mask``, ``<key>.signs``,
uint8; the scale in ``expert.json``). ``method="svd"`` keeps a dense ``ΔW`` as rank-``r`` LoRA factors (truncated
SVD), or cuts a LoRA expert's rank to ``r``.

The default scale is the mean magnitude of the kept entries, the least-squares best scale for a fixed sign
pattern (BitDelta's initial scale); ComPEFT's ``alpha`` gives ``alpha · std(τ)`` instead, as in its paper.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from moerge.adapters.delta import low_rank_factors, truncate_factors
from moerge.adapters.expert import DeltaWeights, Expert, LoRAWeights, ModuleWeights
from moerge.errors import ExpertFormatError

__all__ = ["PackedSigns", "compress_tensor", "compress_expert", "storage_bytes", "COMPRESSION_METHODS"]

COMPRESSION_METHODS = ("compeft", "bitdelta", "svd")
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """Bool ``(n,)`` → uint8 ``(ceil(n/8),)``, most significant bit first."""
    n = bits.numel()
    padded = torch.zeros(8 * math.ceil(n / 8), dtype=torch.uint8)
    padded[:n] = bits.reshape(-1).to(torch.uint8)
    return (padded.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``(ceil(n/8),)`` → bool ``(n,)``."""
    return ((packed.reshape(-1, 1) & _BITS) != 0).reshape(-1)[:n]


@dataclass
class PackedSigns:
    """``scale · S`` for a sign pattern ``S`` of shape ``shape``: ``mask`` (packed, ``None`` = every entry kept)
    marks the non-zero entries; ``signs`` (packed) holds one bit per kept entry, 1 for +."""

    method: str
    shape: tuple[int, ...]
    scale: float
    signs: torch.Tensor  # uint8 (ceil(kept/8),)
    mask: torch.Tensor | None  # uint8 (ceil(numel/8),) or None
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n = self.numel
        keep = torch.ones(n, dtype=torch.bool) if self.mask is None else _unpack(self.mask, n)
        kept = int(keep.sum())
        sign = _unpack(self.signs, kept).to(torch.float32) * 2 - 1  # (kept,) ±1
        out = torch.zeros(n, dtype=torch.float32)
        out[keep] = sign * self.scale
        return out.view(self.shape).to(dtype or self.dtype)

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        out = {f"{key}.signs": self.signs}
        if self.mask is not None:
            out[f"{key}.mask"] = self.mask
        return out

    def spec(self) -> dict[str, Any]:
        return {"method": self.method, "shape": list(self.shape), "scale": float(self.scale),
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_tensors(cls, key: str, spec: dict[str, Any], tensors: dict[str, torch.Tensor], *, expert: str,
                     file: str | None) -> PackedSigns:
        try:
            shape = tuple(int(s) for s in spec["shape"])
            scale = float(spec["scale"])
            dtype = getattr(torch, str(spec.get("dtype", "float32")))
            method = str(spec["method"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ExpertFormatError(f"{key}: bad compression entry {spec!r} ({e})", expert=expert, file=file) from None
        if method not in ("compeft", "bitdelta") or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point \
                or not math.isfinite(scale) or not shape or min(shape) <= 0:
            raise ExpertFormatError(f"{key}: bad compression entry {spec!r}", expert=expert, file=file)
        signs = tensors.get(f"{key}.signs")
        mask = tensors.get(f"{key}.mask")
        n = math.prod(shape)
        if signs is None or signs.dtype != torch.uint8 or (method == "compeft") != (mask is not None):
            raise ExpertFormatError(f"{key}: missing or mistyped packed tensors for {method}", expert=expert,
                                    file=file)
        if mask is not None and (mask.dtype != torch.uint8 or mask.numel() != math.ceil(n / 8)):
            raise ExpertFormatError(f"{key}.mask has {mask.numel()} bytes, expected {math.ceil(n / 8)} for shape "
                                    f"{shape}", expert=expert, file=file)
        kept = n if mask is None else int(_unpack(mask, n).sum())
        if signs.numel() != math.ceil(kept / 8):
            raise ExpertFormatError(f"{key}.signs has {signs.numel()} bytes, expected {math.ceil(kept / 8)}",
                                    expert=expert, file=file)
        return cls(method, shape, scale, signs, mask, dtype)


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
        return PackedSigns("compeft", tuple(t.shape), scale, _pack(kept > 0), _pack(keep), t.dtype)
    if method == "bitdelta":
        return PackedSigns("bitdelta", tuple(t.shape), float(x.abs().mean()), _pack(x > 0), None, t.dtype)
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
