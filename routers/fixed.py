"""Fixed routing: one mix of experts for every row of every call.

With no weights given, every expert of the model gets ``1/N`` (the uniform average, a common baseline), and
experts added later are included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moerge.errors import RoutingError
from moerge.routing import Candidates, Router, RoutingRequest, candidates_from_mixes, register_router

__all__ = ["FixedConfig", "FixedRouter"]


@dataclass
class FixedConfig:
    weights: dict[str, float] | None = field(
        default=None, metadata={"help": "expert name → weight for every row; None: uniform 1/N over all experts"}
    )

    def __post_init__(self) -> None:
        if self.weights is None:
            return
        if not isinstance(self.weights, dict) or not self.weights:
            raise ValueError(f"weights must be a non-empty dict of expert name → weight, got {self.weights!r}")
        for name, w in self.weights.items():
            if not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"weight of expert {name!r} must be a finite number, got {w!r}")


@register_router("fixed")
class FixedRouter(Router):
    """The same mix for every row: ``weights`` as given, or uniform over all experts.

    Paper: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023), applied at inference time.
    """

    config_class = FixedConfig

    def select(self, request: RoutingRequest) -> Candidates:
        if self.config.weights is None:
            if not request.names:
                raise RoutingError("router 'fixed' (uniform) has no experts to mix")
            mix = {n: 1.0 / len(request.names) for n in request.names}
        else:
            missing = [n for n in self.config.weights if n not in request.names]
            if missing:
                raise RoutingError(f"router 'fixed' mixes unknown experts {missing}", expert=missing[0])
            mix = dict(self.config.weights)
        return candidates_from_mixes([mix], request.names, batch_size=request.batch_size)
