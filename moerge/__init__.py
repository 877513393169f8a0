"""moerge: one model from a base causal LM and a library of expert adapters, routed at inference time.

>>> from moerge import ExpertLibrary, MoErgeModel
>>> lib = ExpertLibrary.create("libs/demo", base_model=base)
>>> lib.add_peft("adapters/sql", name="sql", description="Write SQL for a question")
>>> model = MoErgeModel.from_library(base, lib)
>>> out = model.generate(**batch, experts=[{"sql": 1.0}], max_new_tokens=64)
"""

from moerge.adapters.expert import DeltaWeights, Expert, ExpertMetadata, LoRAWeights
from moerge.errors import BaseMismatchError, ExpertFormatError, LibraryError, MoErgeError, RoutingError
from moerge.library import ExpertLibrary
from moerge.routers import build_router, list_routers
from moerge.routing import Candidates, Router, RoutingRequest, RowRouting, register_router
from moerge.runtime.model import MoErgeModel

__version__ = "0.1.0"

__all__ = [
    "MoErgeModel", "ExpertLibrary", "Expert", "ExpertMetadata", "LoRAWeights", "DeltaWeights",
    "Candidates", "RoutingRequest", "RowRouting", "Router", "build_router", "list_routers", "register_router",
    "MoErgeError", "ExpertFormatError", "LibraryError", "BaseMismatchError", "RoutingError", "__version__",
]
