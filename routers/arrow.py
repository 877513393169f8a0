"""Arrow: training-free per-token routing by the experts' prototypes.

Each expert's prototype for a module is the top right-singular vector of its update ``ΔW = s·B·A`` (computed
exactly, once, when the expert is added). For every token, inside every module, the scores are
``|⟨prototype_e, x⟩|`` over the row's candidates; the ``top_k`` best are mixed with
``softmax(score / temperature)`` and the others get 0. Experts that do not target a module are not candidates
there. With no global stage the candidates are all experts (as in PEFT's Arrow).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.adapters.expert import Expert, LoRAWeights, ModuleWeights, StackedLoRAWeights, StoredExpert
from moerge.errors import RoutingError
from moerge.routing import LayerInfo, SelectionConfig, register_router
from moerge.routing.vector_gate import VectorGateRouter

__all__ = ["ArrowConfig", "ArrowRouter", "prototype", "stacked_prototype"]


@dataclass
class ArrowConfig(SelectionConfig):
    top_k: int | None = field(default=3, metadata={"help": "experts mixed per token and module (None: all)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the prototype scores"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


def prototype(w: ModuleWeights) -> torch.Tensor:
    """Top right-singular vector ``(in,)`` of a module update (its sign is arbitrary; Arrow uses ``|·|``).

    For LoRA, ``B·A = B·Rᵀ·Qᵀ`` with ``Aᵀ = Q·R``, so the right-singular vectors of ``B·A`` are ``Q`` times those of
    the small ``B·Rᵀ (out × r)``: exact, without forming ``ΔW``.
    """
    if isinstance(w, LoRAWeights):
        Q, R = torch.linalg.qr(w.A.float().t())  # Q (in, r), R (r, r)
        _, _, Vh = torch.linalg.svd(w.B.float() @ R.t(), full_matrices=False)  # Vh (r, r)
        return Q @ Vh[0]  # (in,)
    _, _, Vh = torch.linalg.svd(w.delta.float(), full_matrices=False)
    return Vh[0]


def stacked_prototype(w: StackedLoRAWeights) -> torch.Tensor:
    """Top right-singular vector ``(in,)`` of a fused MoE parameter's update with its MoE experts stacked,
    ``[ΔW_1; …; ΔW_E] (E·out, in)``: the input direction the whole parameter's update reads most. Exact without
    forming it: with ``[A_1; …; A_E]ᵀ = Q·R``, it is ``Q`` times the top right-singular vector of the blocks
    ``B_e · R[:, e-th r columns]ᵀ`` stacked."""
    E, r, n_in = w.A.shape
    Q, R = torch.linalg.qr(w.A.float().reshape(E * r, n_in).t())  # Q (in, E·r), R (E·r, E·r)
    blocks = torch.bmm(w.B.float(), R.t().reshape(E, r, -1))  # (E, out, E·r): B_e · (rows e of Rᵀ)
    _, _, Vh = torch.linalg.svd(blocks.reshape(-1, blocks.shape[-1]), full_matrices=False)
    return Q @ Vh[0]


def prototypes(expert: Expert) -> dict[str, torch.Tensor]:
    """Arrow's prototype of each module of ``expert`` (module → (in,)); reads a stored expert's weights. A fused MoE
    parameter's prototype reads the MoE block's input: ``gate_up_proj``'s own (:func:`stacked_prototype`), which
    ``down_proj`` (whose input exists per MoE expert only) shares."""
    mods = expert.modules
    out = {m: prototype(w) if not isinstance(w, StackedLoRAWeights) else stacked_prototype(w)
           for m, w in mods.items() if not m.endswith(".down_proj") or not isinstance(w, StackedLoRAWeights)}
    for m, w in mods.items():
        if isinstance(w, StackedLoRAWeights) and m.endswith(".down_proj"):
            up = m[: -len("down_proj")] + "gate_up_proj"
            if up not in out:
                raise RoutingError(f"Arrow scores {m!r} by the same expert's gate_up_proj prototype (both read the "
                                   "MoE block's input), but the expert does not adapt gate_up_proj", expert=expert.name)
            out[m] = out[up]
    return out


def _stored_prototypes(stored: StoredExpert, loaded: tuple[Expert, Expert] | None = None) -> dict[str, torch.Tensor]:
    """The prototypes of a stored expert: from the model's copy just read from it (``loaded``: (source, copy))
    when it was read from this very stored expert, else read now."""
    return prototypes(loaded[1] if loaded is not None and loaded[0] is stored else stored)


@register_router("arrow")
class ArrowRouter(VectorGateRouter):
    """Per-token top-k routing by |⟨prototype, x⟩|, training-free: the logits are ``|⟨prototype, x⟩| / temperature``,
    ``-inf`` for candidates without the module.

    Paper: Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs" (ICML 2024),
    arXiv:2405.11157.
    """

    config_class = ArrowConfig
    finish = "abs"

    def prepare_expert(self, expert: Expert) -> dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]]:
        """The expert's prototypes (module → (in,)); for an expert whose weights are on disk, how to make them:
        they are made when a request first has it among its candidates (its weights are read then anyway)."""
        if isinstance(expert, StoredExpert):
            return functools.partial(_stored_prototypes, expert)
        return prototypes(expert)

    def on_add_expert(self, expert: Expert, prepared: Any = None) -> None:
        got = self.prepare_expert(expert) if prepared is None else prepared
        if callable(got):
            self.vectors.set_lazy(expert.name, got)
        else:
            self.vectors.set(expert.name, got)

    def gate_scale(self, layer: LayerInfo) -> float:
        return 1.0 / self.config.temperature
