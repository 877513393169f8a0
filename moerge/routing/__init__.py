"""Routing core: the types routers exchange with the runtime, local-gate selection, per-call state, the Router
interface with its registry, retrieval and routing-data training.

Retrieval (:mod:`moerge.routing.retrieval`: the experts' texts, the FAISS index kept in step with them and stored
in the library, top-K search, over :mod:`~moerge.routing.embed` embedders and the :mod:`~moerge.routing.describe`
task describer) serves GLIDER and Twin. Nothing here knows the model: a router is given a :class:`RouterContext`.
Routers themselves live in :mod:`moerge.routers`, one per file; :func:`moerge.routers.build_router` builds one.
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
