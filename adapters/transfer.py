"""Fine-tuning transfer: an expert made on one version of a base, applied to another version of it.

An expert's update ``ΔW`` (LoRA factors or a fine-tune's diff vector) was learned on a source base ``W_s``;
PortLLM's observation is that the same patch, added to an updated base ``W_t`` of the same architecture, carries
most of the fine-tune over without training. :func:`transfer_expert` checks that the two bases share architecture
and shapes (a clear :class:`~moerge.errors.BaseMismatchError` otherwise), that the expert was made on the source,
measures how far apart the bases are (:func:`base_distance`), and returns the expert re-tagged for the target.

Paper: Khan et al., "PortLLM: Personalizing Evolving Large Language Models with Training-Free Portable Model
Patches", ICLR 2025; diff vectors: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from moerge.adapters.expert import Expert
from moerge.core.fingerprint import (
    base_parameters,
    check_expert_shapes,
    compact_fingerprint,
    compare_fingerprints,
    fingerprint,
    linear_modules,
)
from moerge.errors import BaseMismatchError

__all__ = ["BaseDistance", "base_distance", "transfer_expert"]


@dataclass
class BaseDistance:
    """How far a target base is from a source base.

    ``relative``: ``‖θ_t − θ_s‖ / ‖θ_s‖`` over every parameter; ``cosine``: cosine of the two flattened parameter
    vectors; ``per_module``: the relative distance of each linear module's weight; ``changed``: parameters that
    differ at all.
    """

    relative: float
    cosine: float
    per_module: dict[str, float] = field(default_factory=dict)
    changed: int = 0
    total: int = 0

    def worst(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.per_module.items(), key=lambda kv: -kv[1])[:n]

    def summary(self) -> str:
        worst = ", ".join(f"{m} {d:.2%}" for m, d in self.worst())
        return (f"relative distance {self.relative:.3%}, cosine {self.cosine:.6f}, {self.changed}/{self.total} "
                f"parameter tensors changed; most changed modules: {worst or '—'}")

    def to_json(self) -> dict[str, Any]:
        return {"relative": self.relative, "cosine": self.cosine, "changed": self.changed, "total": self.total,
                "worst_modules": dict(self.worst(5))}


def _check_architecture(source_fp: dict[str, Any], target_fp: dict[str, Any], expert: str | None = None) -> None:
    arch, _ = compare_fingerprints(source_fp, target_fp)
    if arch:
        raise BaseMismatchError("the target base is not a version of the source base: " + "; ".join(arch),
                                expert=expert)


def base_distance(source: nn.Module, target: nn.Module) -> BaseDistance:
    """The distance between two versions of a base (same architecture and shapes, else an error)."""
    _check_architecture(fingerprint(source), fingerprint(target))
    return _distance(source, target)


def _distance(source: nn.Module, target: nn.Module) -> BaseDistance:
    """:func:`base_distance` for bases whose architectures were already checked."""
    sp, tp = base_parameters(source), base_parameters(target)  # a patched base reads as the plain one
    if set(sp) != set(tp):
        missing = sorted(set(sp) ^ set(tp))[:3]
        raise BaseMismatchError(f"the bases' parameters differ by name: {missing}")
    diff2 = norm_s2 = norm_t2 = dot = 0.0
    changed = 0
    per_param: dict[str, float] = {}
    for n, ps in sp.items():
        pt = tp[n]
        if ps.shape != pt.shape:
            raise BaseMismatchError(f"parameter {n!r} has shape {tuple(pt.shape)} in the target, "
                                    f"{tuple(ps.shape)} in the source")
        a, b = ps.detach().float(), pt.detach().float()
        d2 = float(((b - a) ** 2).sum())
        s2 = float((a * a).sum())
        diff2 += d2
        norm_s2 += s2
        norm_t2 += float((b * b).sum())
        dot += float((a * b).sum())
        changed += d2 > 0
        per_param[n] = math.sqrt(d2 / s2) if s2 > 0 else (0.0 if d2 == 0 else math.inf)
    per_module = {}
    for m in linear_modules(source):
        key = f"{m}.weight"
        if key in per_param:
            per_module[m] = per_param[key]
    return BaseDistance(
        relative=math.sqrt(diff2 / norm_s2) if norm_s2 > 0 else 0.0,
        cosine=dot / math.sqrt(norm_s2 * norm_t2) if norm_s2 > 0 and norm_t2 > 0 else 1.0,
        per_module=per_module, changed=changed, total=len(sp),
    )


def transfer_expert(expert: Expert, source: nn.Module, target: nn.Module, *, name: str | None = None,
                    strict_source: bool = True) -> tuple[Expert, BaseDistance]:
    """``expert`` (made on ``source``) re-tagged for ``target``, and the distance between the two bases.

    Raises :class:`~moerge.errors.BaseMismatchError` when the bases differ in architecture or shapes, when the
    target lacks a module the expert changes (or maps other sizes), and — with ``strict_source`` — when the
    expert records a base whose weights are not ``source``'s. The weights are unchanged (the patch is portable);
    the metadata records the transfer and the distance.
    """
    expert.refuse_stacked("transfer to another base")
    source_fp, target_fp = fingerprint(source), fingerprint(target)
    _check_architecture(source_fp, target_fp, expert.name)
    recorded = expert.metadata.base_fingerprint
    if recorded and strict_source:
        arch, weights = compare_fingerprints(recorded, source_fp)
        if arch or weights:
            raise BaseMismatchError("the expert was not made on the given source base: " + "; ".join(arch + weights)
                                    + " (pass strict_source=False to transfer it anyway)", expert=expert.name)
    check_expert_shapes(expert, target_fp["modules"], "the target base")
    dist = _distance(source, target)
    target_id = getattr(getattr(target, "config", None), "_name_or_path", None) or type(target).__name__
    source_id = getattr(getattr(source, "config", None), "_name_or_path", None) or type(source).__name__
    meta = dataclasses.replace(
        expert.metadata, base_model=target_id, base_fingerprint=compact_fingerprint(target_fp),
        source=dict(expert.metadata.source, transfer={"from_base": source_id, "distance": dist.to_json()}),
    )
    out = dataclasses.replace(expert, metadata=meta)
    if name is not None:
        out = out.renamed(name)
    return out, dist
