"""PHATGOOSE: per-token routing by gate vectors trained post hoc, one expert at a time.

For each expert and each module it targets, a gate vector ``v`` is trained in front of the frozen expert:
``y = W x + σ(⟨v, x⟩) · ΔW x``, on that expert's own examples only, with the base and the expert frozen (a few
hundred steps at most; :func:`train_phatgoose_gates`). At inference, inside each module, the token ``x`` and the
candidates' gate vectors are standardized (zero mean, unit variance over features), their dot products divided by
the temperature (default ``√d``) are the logits, and the ``top_k`` best are mixed by softmax (or dynamic ``top_p``
and a null expert, see :class:`~moerge.routing.SelectionConfig`).

Gate vectors are computed when an expert is added — loaded from the library when it holds gates made for the same
weights, trained otherwise (from the expert's example prompts, answered by the expert itself) — and stored in the
library, so adding an expert never retrains the others. An expert without gates (no examples to train on, and
``train_missing=False``) gets zero gate vectors: a logit of 0 in every module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.adapters.expert import Expert
from moerge.errors import RoutingError
from moerge.routing import (
    Candidates,
    ExpertVectors,
    LayerInfo,
    LinearGate,
    Router,
    RoutingRequest,
    SelectionConfig,
    all_candidates,
    register_router,
    standardize,
)
from moerge.routing.training import GateTrainingConfig

__all__ = ["PhatgooseConfig", "PhatgooseRouter", "train_phatgoose_gates", "ROUTING_KIND"]

ROUTING_KIND = "phatgoose"


@dataclass
class PhatgooseConfig(SelectionConfig, GateTrainingConfig):
    temperature: float | None = field(default=None, metadata={
        "help": "logits are standardized dot products divided by this (None: √d, as in the paper)"})

    def __post_init__(self) -> None:
        self._check_selection()
        self._check_training()
        if self.temperature is not None and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 or None, got {self.temperature!r}")


def train_phatgoose_gates(
    base: torch.nn.Module,
    tokenizer: Any,
    expert: Expert,
    examples: Sequence[str] | Sequence[tuple[str, str]],
    *,
    steps: int = 100,
    lr: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train PHATGOOSE gate vectors for ``expert`` on its own examples; returns ``(module → (in,) gate, losses)``.

    ``examples`` are ``(prompt, answer)`` pairs, or prompts alone (then answered by the expert itself). The base and
    the expert are frozen; only one vector per module is trained, from zeros (σ = 0.5), with Adam and the LM loss
    on the answers.
    """
    from tqdm.auto import tqdm

    from moerge.routing.training import GatedExperts, answers_from_expert, frozen, make_batches

    examples = list(examples)
    if not examples:
        raise RoutingError("no examples to train its PHATGOOSE gates on", expert=expert.name)
    if isinstance(examples[0], str):
        pairs = answers_from_expert(base, tokenizer, expert, examples)
    else:
        pairs = [(str(p), str(a)) for p, a in examples]
    device = next(base.parameters()).device
    rng_state = torch.random.get_rng_state()  # the caller's random state is given back afterwards
    torch.manual_seed(seed)
    gates = {m: torch.zeros(w.in_features, device=device, requires_grad=True) for m, w in expert.modules.items()}
    opt = torch.optim.Adam(list(gates.values()), lr=lr)
    losses: list[float] = []
    was_training = base.training
    base.eval()

    def gate(module: str, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x @ gates[module]).unsqueeze(-1)  # (B, T, 1)

    bar = tqdm(make_batches(tokenizer, pairs, batch_size, steps, seed), total=steps,
               desc=f"phatgoose gates {expert.name}", disable=not progress, leave=False)
    try:
        with frozen(base), torch.enable_grad(), GatedExperts(base, [expert], gate):
            for batch in bar:
                loss = base(**{k: v.to(device) for k, v in batch.items()}).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        base.train(was_training)
        torch.random.set_rng_state(rng_state)
    return {m: g.detach().cpu() for m, g in gates.items()}, losses


@register_router("phatgoose")
class PhatgooseRouter(Router):
    """Per-token top-k routing by standardized dot products with post-hoc trained gate vectors.

    Paper: Muqeeth et al., "Learning to Route Among Specialized Experts for Zero-Shot Generalization" (ICML 2024),
    arXiv:2402.05859.
    """

    config_class = PhatgooseConfig
    has_local_gate = True

    def __init__(self, config: PhatgooseConfig | None = None) -> None:
        super().__init__(config)
        self._gates = ExpertVectors()  # module -> expert -> standardized gate (in,)
        self._raw: dict[str, dict[str, torch.Tensor]] = {}  # expert -> module -> gate as trained
        self._digest: dict[str, str] = {}
        self._unsaved: set[str] = set()
        self.losses: dict[str, list[float]] = {}

    # --- routing data -------------------------------------------------------------------------------------------
    def set_gates(self, name: str, gates: dict[str, torch.Tensor], digest: str | None = None) -> None:
        """Use ``gates`` (module → (in,)) for expert ``name`` (e.g. trained with :func:`train_phatgoose_gates`)."""
        gates = {m: g.detach().float().cpu().reshape(-1) for m, g in gates.items()}
        self._gates.set(name, {m: standardize(g) for m, g in gates.items()})
        self._raw[name] = gates
        if digest is not None:
            self._digest[name] = digest
        self._unsaved.add(name)

    def _stored(self, expert: Expert, digest: str) -> dict[str, torch.Tensor] | None:
        store = self.context.store
        return None if store is None else store.routing_for(expert.name, ROUTING_KIND, digest)

    def on_add_expert(self, expert: Expert) -> None:
        digest = expert.digest()
        if self._digest.get(expert.name) == digest and expert.name in self._raw:
            return  # same weights, gates already known (e.g. set_gates before adding)
        gates = self._stored(expert, digest)
        fresh = gates is None
        ctx = self.context
        if gates is None and self.config.train_missing and expert.metadata.examples and ctx.tokenizer is not None \
                and ctx.training_base is not None:
            gates, losses = train_phatgoose_gates(
                ctx.training_base(), ctx.tokenizer, expert, expert.metadata.examples,
                steps=self.config.train_steps, lr=self.config.train_lr, batch_size=self.config.train_batch_size)
            self.losses[expert.name] = losses
        if gates is None:
            warnings.warn(f"expert {expert.name!r} has no PHATGOOSE gates (none stored, and no example prompts or "
                          "tokenizer to train them): its local logit is 0 everywhere", stacklevel=3)
            gates = {m: torch.zeros(w.in_features) for m, w in expert.modules.items()}
            fresh = False
        self.set_gates(expert.name, gates, digest)
        if not fresh:
            self._unsaved.discard(expert.name)

    def on_remove_expert(self, name: str) -> None:
        self._gates.remove(name)
        self._raw.pop(name, None)
        self._digest.pop(name, None)
        self._unsaved.discard(name)

    def persist(self, library: Any) -> None:
        for name in sorted(self._unsaved):
            if name in library and name in self._digest:
                library.put_routing(name, ROUTING_KIND, self._raw[name], {"digest": self._digest[name]})
                self._unsaved.discard(name)

    def gates_of(self, name: str) -> dict[str, torch.Tensor]:
        """Expert ``name``'s gate vectors as trained (module → (in,))."""
        if name not in self._raw:
            raise RoutingError("no PHATGOOSE gates for this expert", expert=name)
        return dict(self._raw[name])

    # --- routing --------------------------------------------------------------------------------------------------
    def select(self, request: RoutingRequest) -> Candidates:
        """Every expert is a candidate of every row; the gates decide per token."""
        return all_candidates(request)

    def make_linear_gate(self, candidates: Candidates, layer: LayerInfo, device: torch.device) -> LinearGate | None:
        """Standardized-dot-product logits ``⟨layer_norm(x), g⟩ / temperature``; ``-inf`` for candidates that do not
        target the module. (The gates are centred, so ``x @ g / σ(x)`` is that dot product.)"""
        temp = self.config.temperature or math.sqrt(layer.in_features)
        got = self._gates.gate_operands(layer.name, candidates, device, 1.0 / temp, center=True)
        return None if got is None else LinearGate(*got, finish="standardized")
