"""Twin-Merging at inference: the shared expert always on, the exclusive parts mixed per request.

Use it on a library made by :func:`moerge.library.derive.make_twin_library` (a shared expert named
``twin_shared`` plus one exclusive expert per original expert, under the original names). Per request, the
exclusive experts are scored against the prompt by GLIDER's retriever
(:class:`~moerge.routing.retrieval.ExpertRetriever`: embedding of the prompt against each expert's description
and examples, FAISS top-``candidates``) and mixed by ``softmax(score / temperature)``; the shared expert is never
retrieved and gets weight 1 in every row. The paper trains a small router on the prompt's representation
instead; retrieval needs no training and adapts to experts added later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.adapters.expert import Expert
from moerge.errors import RoutingError
from moerge.routers.glider import GliderConfig, GliderRouter
from moerge.routing import Candidates, RoutingRequest, register_router

__all__ = ["TwinConfig", "TwinRouter"]


@dataclass
class TwinConfig(GliderConfig):
    local: str = field(default="none", metadata={"help": "must be 'none': Twin-Merging mixes per sequence"})
    shared: str = field(default="twin_shared", metadata={"help": "name of the always-on shared expert"})
    shared_weight: float = field(default=1.0, metadata={"help": "weight of the shared expert in every row"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.local != "none":
            raise ValueError(f"twin mixes per sequence: local must be 'none', got {self.local!r}")


@register_router("twin")
class TwinRouter(GliderRouter):
    """Shared expert always on + retrieval-weighted exclusive experts, per sequence: GLIDER's global stage with no
    local gate (``local="none"``), the shared expert added to every row.

    Paper: Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging" (NeurIPS 2024),
    arXiv:2406.15479.
    """

    config_class = TwinConfig
    has_local_gate = False

    def on_add_expert(self, expert: Expert, prepared: Any = None) -> None:
        if expert.name != self.config.shared:  # the shared expert is not retrieved: it is always on
            self.retriever.add(expert)

    def select(self, request: RoutingRequest) -> Candidates:
        if self.config.shared not in request.names:
            raise RoutingError(f"router 'twin' needs the shared expert {self.config.shared!r}; build the library "
                               "with moerge.library.derive.make_twin_library", expert=self.config.shared)
        c = super().select(request)  # (B, K) exclusive candidates, sequence weights
        b = c.batch_size
        shared = torch.full((b, 1), request.names.index(self.config.shared), dtype=torch.long)
        return Candidates(ids=torch.cat([shared, c.ids], 1), scores=torch.cat([torch.ones(b, 1), c.scores], 1),
                          names=c.names,
                          weights=torch.cat([torch.full((b, 1), float(self.config.shared_weight)), c.weights], 1))
