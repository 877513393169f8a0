"""Twin-Merging's split of a set of experts into shared and exclusive knowledge.

The **shared** expert is the average of all experts' updates, ``S = (1/N) Σ_e ΔW_e`` per module (kept exactly:
for LoRA experts it is a LoRA whose factors are the experts' factors side by side). Each expert's **exclusive**
part is what it adds to the shared one, ``ΔW_e − S``, compressed to rank ``rank`` by truncated SVD. At inference
(router ``twin``) the shared expert is always on and the exclusive parts are mixed per request.

Paper: Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging" (NeurIPS 2024),
arXiv:2406.15479.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from moerge.adapters.delta import low_rank_factors, truncate_factors
from moerge.adapters.expert import DeltaWeights, Expert, ExpertMetadata, LoRAWeights, ModuleWeights

__all__ = ["SHARED_NAME", "twin_split"]

SHARED_NAME = "twin_shared"


def _shared_module(ws: list[ModuleWeights], n: int) -> ModuleWeights:
    if all(isinstance(w, LoRAWeights) for w in ws):
        A = torch.cat([w.A.float() for w in ws])  # (Σr, in)
        B = torch.cat([w.B.float() * (float(w.scale) / n) for w in ws], dim=1)  # (out, Σr)
        return LoRAWeights(A, B, 1.0)
    return DeltaWeights(sum(w.delta_weight(torch.float32) for w in ws) / n)


def _exclusive_module(w: ModuleWeights, shared: ModuleWeights, rank: int) -> LoRAWeights:
    if isinstance(w, LoRAWeights) and isinstance(shared, LoRAWeights):
        A = torch.cat([w.A.float(), shared.A])  # (r_e + Σr, in)
        B = torch.cat([w.B.float() * float(w.scale), -shared.B], dim=1)  # (out, r_e + Σr)
        return truncate_factors(A, B, rank)
    return low_rank_factors(w.delta_weight(torch.float32) - shared.delta_weight(torch.float32), rank)


def twin_split(experts: Sequence[Expert], rank: int = 8, dtype: torch.dtype = torch.float32,
               shared_name: str = SHARED_NAME) -> tuple[Expert, list[Expert]]:
    """``(shared expert, exclusive experts)`` of ``experts``; the exclusive ones keep the experts' names and
    metadata (so they are retrieved by the same descriptions)."""
    for e in experts:
        e.refuse_stacked("Twin-Merging's shared/exclusive split")
    experts = list(experts)
    if len(experts) < 2:
        raise ValueError(f"Twin-Merging needs at least 2 experts, got {len(experts)}")
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank!r}")
    n = len(experts)
    modules = sorted({m for e in experts for m in e.modules})
    shared = {m: _shared_module([e.modules[m] for e in experts if m in e.modules], n) for m in modules}
    to = lambda w: dataclasses.replace(w, A=w.A.to(dtype), B=w.B.to(dtype))  # noqa: E731
    exclusive = []
    for e in experts:
        mods = {m: to(_exclusive_module(e.modules.get(m, None) or LoRAWeights(
            torch.zeros(1, shared[m].in_features), torch.zeros(shared[m].out_features, 1)), shared[m], rank))
                for m in modules}
        meta = dataclasses.replace(e.metadata, source={"type": "twin-exclusive", "of": e.name, "rank": rank,
                                                       "original": e.metadata.source})
        exclusive.append(Expert(e.name, mods, meta))
    shared_mods = {m: (to(w) if isinstance(w, LoRAWeights) else DeltaWeights(w.delta.to(dtype)))
                   for m, w in shared.items()}
    shared_meta = ExpertMetadata(description="Knowledge shared by all experts (their average, Twin-Merging).",
                                 base_model=experts[0].metadata.base_model,
                                 base_fingerprint=experts[0].metadata.base_fingerprint,
                                 source={"type": "twin-shared", "of": [e.name for e in experts]},
                                 extra={"twin": "shared"})
    return Expert(shared_name, shared_mods, shared_meta), exclusive

