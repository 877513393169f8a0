"""Routing core: the types routers exchange with the runtime, local-gate selection, per-call state, the Router
interface, and the parts of retrieval (embedders, the task describer) and of routing-data training.

Nothing here knows the model: a router is given a :class:`RouterContext`. Routers themselves live in
:mod:`moerge.routers`, one per file; :func:`moerge.routers.build_router` builds one by name.
"""

from moerge.routing.router import Router, RouterContext, register_router
from moerge.routing.selection import (
    ExpertVectors,
    LinearGate,
    SelectionConfig,
    no_candidate_logits,
    select_weights,
    standardize,
)
from moerge.routing.state import RoutingContext, RoutingState
from moerge.routing.types import (
    Candidates,
    LayerInfo,
    RoutingRequest,
    RowRouting,
    all_candidates,
    candidates_from_mixes,
    explain_routing,
)

__all__ = [
    "Candidates", "RoutingRequest", "LayerInfo", "RowRouting", "RoutingState", "RoutingContext", "Router",
    "RouterContext", "register_router", "candidates_from_mixes", "select_weights", "SelectionConfig",
    "all_candidates", "explain_routing", "standardize", "ExpertVectors", "no_candidate_logits", "LinearGate",
]
