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
from dataclasses import dataclass
from typing import Any

import torch

from moerge.adapters.delta import low_rank_factors, truncate_factors
from moerge.adapters.expert import DeltaWeights, Expert, LoRAWeights, ModuleWeights
from moerge.errors import ExpertFormatError

__all__ = ["PackedSigns", "compress_tensor", "compress_expert", "storage_bytes", "COMPRESSION_METHODS"]

COMPRESSION_METHODS = ("compeft", "bitdelta", "svd")
COMPRESSION_FORMAT = 2  # 2: ComPEFT positions as a bit mask or gap bytes, whichever is smaller
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


def _encode_gaps(positions: torch.Tensor) -> torch.Tensor:
    """Sorted positions ``(k,)`` → uint8 gap bytes: each gap ``g = p_i − p_{i−1}`` (``p_{−1} = −1``) is written as
    ``(g − 1) // 255`` zero bytes (each "+255, no entry") and one byte ``1..255``."""
    prev = torch.cat([torch.tensor([-1]), positions[:-1]])
    g = positions - prev  # (k,) ≥ 1
    escapes = (g - 1) // 255
    out = torch.zeros(int((escapes + 1).sum()), dtype=torch.uint8)
    out[(escapes + 1).cumsum(0) - 1] = (g - 255 * escapes).to(torch.uint8)
    return out


def _decode_gaps(gaps: torch.Tensor) -> torch.Tensor:
    """uint8 gap bytes → the positions ``(k,)`` they encode (see :func:`_encode_gaps`)."""
    steps = torch.where(gaps == 0, 255, gaps.long())
    return steps.cumsum(0)[gaps != 0] - 1


@dataclass
class PackedSigns:
    """``scale · S`` for a sign pattern ``S`` of shape ``shape``. The non-zero entries are marked by ``mask`` (one
    bit per entry) or by ``gaps`` (one byte per kept entry: the distance from the previous one; smaller below a
    density of about 1/8), or are all entries when both are ``None`` (BitDelta); ``signs`` (packed) holds one bit
    per kept entry, 1 for +."""

    method: str
    shape: tuple[int, ...]
    scale: float
    signs: torch.Tensor  # uint8 (ceil(kept/8),)
    mask: torch.Tensor | None  # uint8 (ceil(numel/8),) or None
    dtype: torch.dtype = torch.float32
    gaps: torch.Tensor | None = None  # uint8 gap bytes, instead of mask

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n = self.numel
        if self.gaps is not None:
            keep = torch.zeros(n, dtype=torch.bool)
            keep[_decode_gaps(self.gaps)] = True
        else:
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
        if self.gaps is not None:
            out[f"{key}.gaps"] = self.gaps
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
        gaps = tensors.get(f"{key}.gaps")
        n = math.prod(shape)
        marked = (mask is not None) + (gaps is not None)
        if signs is None or signs.dtype != torch.uint8 or marked != (1 if method == "compeft" else 0):
            raise ExpertFormatError(f"{key}: missing or mistyped packed tensors for {method}", expert=expert,
                                    file=file)
        if mask is not None and (mask.dtype != torch.uint8 or mask.numel() != math.ceil(n / 8)):
            raise ExpertFormatError(f"{key}.mask has {mask.numel()} bytes, expected {math.ceil(n / 8)} for shape "
                                    f"{shape}", expert=expert, file=file)
        kept = n
        if mask is not None:
            kept = int(_unpack(mask, n).sum())
        if gaps is not None:
            pos = _decode_gaps(gaps) if gaps.dtype == torch.uint8 and gaps.dim() == 1 else None
            if pos is None or (pos.numel() and int(pos[-1]) >= n):
                raise ExpertFormatError(f"{key}.gaps: positions beyond the {n} entries of shape {shape}",
                                        expert=expert, file=file)
            kept = pos.numel()
        if signs.numel() != math.ceil(kept / 8):
            raise ExpertFormatError(f"{key}.signs has {signs.numel()} bytes, expected {math.ceil(kept / 8)}",
                                    expert=expert, file=file)
        return cls(method, shape, scale, signs, mask, dtype, gaps)


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
        gaps = _encode_gaps(keep.nonzero().reshape(-1))
        if gaps.numel() < math.ceil(n / 8):  # positions as gap bytes when that is smaller than a bit mask
            return PackedSigns("compeft", tuple(t.shape), scale, _pack(kept > 0), None, t.dtype, gaps)
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
