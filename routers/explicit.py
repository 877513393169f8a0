"""Explicit routing: each row's mix of experts is given with the call.

``model.generate(**batch, experts=[{"sql": 1.0}, {"math": .5, "sql": .5}])`` — one mix per row, or one mix for
all rows. This is how multi-adapter servers (LoRAX, vLLM multi-LoRA) serve requests that name their adapter, and
what any model does when a call passes ``experts=``, whatever its router.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moerge.errors import RoutingError
from moerge.routing import Candidates, Router, RoutingRequest, candidates_from_mixes, register_router

__all__ = ["ExplicitConfig", "ExplicitRouter"]


@dataclass
class ExplicitConfig:
    normalize: bool = field(default=False, metadata={"help": "rescale each row's weights to sum to 1"})

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")


@register_router("explicit")
class ExplicitRouter(Router):
    """Per-row mixes given with each call (``experts=``); weights are used as given unless ``normalize``.

    Paper: none (the per-request adapter choice of multi-LoRA serving, e.g. Punica / S-LoRA).
    """

    config_class = ExplicitConfig

    def select(self, request: RoutingRequest) -> Candidates:
        if request.experts is None:
            raise RoutingError(
                "router 'explicit' routes only by the experts= argument: pass experts=[{name: weight}, ...] with "
                "one mix per row (or one mix for all rows), or build the model with another router"
            )
        cands = candidates_from_mixes(request.experts, request.names, batch_size=request.batch_size)
        if self.config.normalize:
            w = cands.weights
            total = w.sum(1, keepdim=True)  # (B, 1)
            if bool((total == 0).any()):
                raise RoutingError("normalize=True: a row's weights sum to 0")
            w = w / total
            cands = Candidates(cands.ids, cands.scores, cands.names, w)
        return cands
