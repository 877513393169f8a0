"""The packed storage of a compressed matrix: ``scale · S`` with ``S`` a sign pattern kept as bits.

Ternary ``{−1, 0, +1}`` (ComPEFT: the kept entries' positions as a bit mask or gap bytes, plus one sign bit per kept
entry) or binary ``{−1, +1}`` (BitDelta: one sign bit per entry); one ``scale`` per matrix. :mod:`moerge.adapters.compress`
makes them; :class:`~moerge.adapters.expert.Expert` stores and reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from moerge.errors import ExpertFormatError

__all__ = ["PackedSigns", "COMPRESSION_METHODS", "COMPRESSION_FORMAT", "pack_bits", "encode_gaps"]


COMPRESSION_METHODS = ("compeft", "bitdelta", "svd")
COMPRESSION_FORMAT = 2  # 2: ComPEFT positions as a bit mask or gap bytes, whichever is smaller
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool ``(n,)`` → uint8 ``(ceil(n/8),)``, most significant bit first."""
    n = bits.numel()
    padded = torch.zeros(8 * math.ceil(n / 8), dtype=torch.uint8)
    padded[:n] = bits.reshape(-1).to(torch.uint8)
    return (padded.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``(ceil(n/8),)`` → bool ``(n,)``."""
    return ((packed.reshape(-1, 1) & _BITS) != 0).reshape(-1)[:n]


def encode_gaps(positions: torch.Tensor) -> torch.Tensor:
    """Sorted positions ``(k,)`` → uint8 gap bytes: each gap ``g = p_i − p_{i−1}`` (``p_{−1} = −1``) is written as
    ``(g − 1) // 255`` zero bytes (each "+255, no entry") and one byte ``1..255``."""
    prev = torch.cat([torch.tensor([-1]), positions[:-1]])
    g = positions - prev  # (k,) ≥ 1
    escapes = (g - 1) // 255
    out = torch.zeros(int((escapes + 1).sum()), dtype=torch.uint8)
    out[(escapes + 1).cumsum(0) - 1] = (g - 255 * escapes).to(torch.uint8)
    return out


def _decode_gaps(gaps: torch.Tensor) -> torch.Tensor:
    """uint8 gap bytes → the positions ``(k,)`` they encode (see :func:`encode_gaps`)."""
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
