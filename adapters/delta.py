"""Experts from full fine-tunes: the fine-tuning "diff vector" ``finetuned − base``.

Every linear module (``nn.Linear`` or GPT-2 ``Conv1D``) whose weight or bias changed becomes a dense
:class:`~moerge.adapters.expert.DeltaWeights`, or, with ``rank=r``, LoRA factors from the truncated SVD of its
``ΔW`` (``B = U_r·S_r``, ``A = V_rᵀ``, scale 1). The diff can be applied to any base of the same architecture,
e.g. an updated version of the base it was made on (the library checks architecture and shapes; see
:mod:`moerge.core.fingerprint`).

Parameters outside linear modules (norms, embeddings) cannot be routed per token; when they changed,
``on_other_params`` decides: ``"warn"`` (default: drop them with a warning and record their names in the
expert's metadata), ``"error"`` or ``"ignore"``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from moerge.adapters.expert import (
    DeltaWeights,
    Expert,
    ExpertMetadata,
    LoRAWeights,
    ModuleWeights,
    validate_name,
)
from moerge.core.fingerprint import (
    base_parameters,
    compact_fingerprint,
    fingerprint,
    is_linear_like,
    oriented,
    unwrap_linear,
)
from moerge.errors import BaseMismatchError, ExpertFormatError

__all__ = ["truncate_factors", "expert_from_diff", "low_rank_factors"]


def low_rank_factors(delta: torch.Tensor, rank: int) -> LoRAWeights:
    """Best rank-``rank`` approximation of ``delta (out, in)`` as LoRA factors (truncated SVD, scale 1)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank!r}")
    d = delta.float()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)  # U (out, q), S (q,), Vh (q, in)
    r = min(rank, S.numel())
    B = U[:, :r] * S[:r]  # (out, r)
    A = Vh[:r, :]  # (r, in)
    return LoRAWeights(A.contiguous().to(delta.dtype), B.contiguous().to(delta.dtype), 1.0)


def truncate_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> LoRAWeights:
    """Best rank-``rank`` approximation of ``B @ A`` (``A (q, in)``, ``B (out, q)``) as LoRA factors, without forming
    the ``(out, in)`` product: with ``Aᵀ = Q_a R_a`` and ``B = Q_b R_b``, ``B A = Q_b (R_b R_aᵀ) Q_aᵀ`` and only the
    small ``q × q`` core is decomposed (exact truncated SVD)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank!r}")
    Qa, Ra = torch.linalg.qr(A.float().t())  # (in, q), (q, q)
    Qb, Rb = torch.linalg.qr(B.float())  # (out, q), (q, q)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t())  # (q, q) each
    r = min(rank, S.numel())
    return LoRAWeights((Vh[:r] @ Qa.t()).contiguous(), (Qb @ (U[:, :r] * S[:r])).contiguous(), 1.0)  # (r, in), (out, r)


def expert_from_diff(
    finetuned: nn.Module,
    base: nn.Module,
    name: str,
    *,
    rank: int | None = None,
    description: str = "",
    examples: list[str] | None = None,
    dtype: torch.dtype | None = None,
    on_other_params: Literal["warn", "error", "ignore"] = "warn",
    atol: float = 0.0,
) -> Expert:
    """The expert ``finetuned − base``.

    Args:
        finetuned, base: two models of the same architecture (``base`` may be patched by moerge; its original
            weights are used).
        name: the expert's name.
        rank: if given, store each module's ``ΔW`` as its best rank-``rank`` LoRA approximation instead of dense
            (modules whose bias changed stay dense, since a LoRA update has no bias).
        description, examples: metadata for routing.
        dtype: store the deltas in this dtype (default: the fine-tuned model's).
        on_other_params: what to do with changed parameters outside linear modules (see module docstring).
        atol: modules whose largest absolute change is ``<= atol`` are left out (0: only exactly equal ones).

    Raises:
        BaseMismatchError: the two models' module names or shapes differ.
        ExpertFormatError: nothing changed, or other parameters changed with ``on_other_params="error"``.
    """
    validate_name(name)
    if on_other_params not in ("warn", "error", "ignore"):
        raise ValueError(f"on_other_params must be 'warn', 'error' or 'ignore', got {on_other_params!r}")
    base_mods = dict(base.named_modules())
    ft_mods = dict(finetuned.named_modules())
    modules: dict[str, ModuleWeights] = {}
    covered: set[str] = set()
    with torch.no_grad():
        for mname, module in base_mods.items():
            bmod = unwrap_linear(mname, module)
            if bmod is None:
                continue
            fmod = ft_mods.get(mname)
            if fmod is None or not is_linear_like(fmod):
                raise BaseMismatchError(f"the fine-tuned model has no linear module {mname!r}", expert=name)
            if fmod.weight.shape != bmod.weight.shape:
                raise BaseMismatchError(
                    f"module {mname!r} has shape {tuple(fmod.weight.shape)} in the fine-tuned model but "
                    f"{tuple(bmod.weight.shape)} in the base", expert=name,
                )
            covered |= {f"{mname}.weight", f"{mname}.bias"}
            dw = oriented(fmod, fmod.weight.detach().float() - bmod.weight.detach().float())  # (out, in)
            db = None
            if getattr(fmod, "bias", None) is not None and getattr(bmod, "bias", None) is not None:
                db = fmod.bias.detach().float() - bmod.bias.detach().float()  # (out,)
                if float(db.abs().max()) <= atol:
                    db = None
            elif (getattr(fmod, "bias", None) is None) != (getattr(bmod, "bias", None) is None):
                raise BaseMismatchError(f"module {mname!r} has a bias in only one of the two models", expert=name)
            if float(dw.abs().max()) <= atol and db is None:
                continue
            out_dtype = dtype or fmod.weight.dtype
            if rank is not None and db is None:
                modules[mname] = _cast_lora(low_rank_factors(dw, rank), out_dtype)
            else:
                modules[mname] = DeltaWeights(dw.to(out_dtype), None if db is None else db.to(out_dtype))

        base_params = base_parameters(base)  # a patched base's parameters under the plain base's names
        other: list[str] = []
        for pname, fp in finetuned.named_parameters():
            if pname in covered:
                continue
            bp = base_params.get(pname)
            if bp is None or bp.shape != fp.shape:
                raise BaseMismatchError(f"parameter {pname!r} is missing or has another shape in the base",
                                        expert=name)
            if not torch.equal(fp.detach().float(), bp.detach().float()):
                other.append(pname)
    if other:
        msg = (f"{len(other)} changed parameter(s) outside linear modules cannot be routed and are left out: "
               f"{other[:5]}{' …' if len(other) > 5 else ''}")
        if on_other_params == "error":
            raise ExpertFormatError(msg, expert=name)
        if on_other_params == "warn":
            warnings.warn(f"expert {name!r}: {msg}", stacklevel=2)
    if not modules:
        raise ExpertFormatError("the fine-tuned model does not differ from the base in any linear module",
                                expert=name)
    base_id = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    meta = ExpertMetadata(
        description=description,
        examples=list(examples or []),
        base_model=base_id,
        base_fingerprint=compact_fingerprint(fingerprint(base)),
        source={"type": "diff", "finetuned": getattr(getattr(finetuned, "config", None), "_name_or_path", None),
                "rank": rank},
        extra={"dropped_params": other} if other else {},
    )
    return Expert(name=name, modules=modules, metadata=meta)


def _cast_lora(w: LoRAWeights, dtype: torch.dtype) -> LoRAWeights:
    return LoRAWeights(w.A.to(dtype), w.B.to(dtype), w.scale)
