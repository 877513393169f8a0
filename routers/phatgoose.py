"""PHATGOOSE: per-token routing by gate vectors trained post hoc, one expert at a time.

For each expert and each module it targets, a gate vector ``v`` is trained in front of the frozen expert:
``y = W x + σ(⟨v, x⟩) · ΔW x``, with the base and the expert frozen (a few hundred steps at most;
:func:`train_phatgoose_gates`). The paper trains it on the expert's own examples only (the default). On the zoo that
recipe learns next to nothing: its experts reach near-zero loss with the gate half open, so the gate gets no signal,
and Adam's per-coordinate steps then move every feature alike, so the few features of huge magnitude in a
transformer's hidden states decide every dot product. With ``negatives`` the gates are trained contrastively
(:data:`CLOSED_START`): every other step is a batch of other experts' examples, on whose answer-writing tokens the gate
is taught to close (``−log(1 − σ)``); the gate starts closed (a trained offset from −3, dropped afterwards), so its
own examples' LM loss says where the expert is needed; and it reads its inputs standardized as at inference and
each feature divided by its spread over the first batch, so Adam's equal steps are equal steps in features of
equal scale (the scale is folded back into ``v``). At inference, inside each module, the token ``x`` and the
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.adapters.expert import Expert
from moerge.core.targets import gate_input
from moerge.errors import RoutingError
from moerge.routing import LayerInfo, register_router, standardize
from moerge.routing.training import (
    GatedExperts,
    answer_positions,
    answers_from_expert,
    fit,
    lm_loss,
    make_batches,
)
from moerge.routing.vector_gate import TrainedGateConfig, TrainedGateRouter

__all__ = ["PhatgooseConfig", "PhatgooseRouter", "train_phatgoose_gates", "ROUTING_KIND", "routing_kind"]

ROUTING_KIND = "phatgoose"
CLOSED_START = -3.0  # the contrastive recipe's initial gate offset: σ(−3) ≈ 0.05, the expert nearly off


def routing_kind(negatives: int) -> str:
    """The kind gates are stored under: ``"phatgoose"`` for the paper's recipe (its own examples only),
    ``"phatgoose-contrast"`` for the contrastive one (also taught where to close; closed start, scaled inputs)."""
    return ROUTING_KIND if negatives == 0 else f"{ROUTING_KIND}-contrast"


@dataclass
class PhatgooseConfig(TrainedGateConfig):
    temperature: float | None = field(default=None, metadata={
        "help": "logits are standardized dot products divided by this (None: √d, as in the paper)"})
    negatives: int = field(default=0, metadata={
        "help": "when training a new expert's gates: how many other experts' examples teach them where to close, "
                "with a closed start and scaled inputs (0: its own examples only, as in the paper)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature is not None and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 or None, got {self.temperature!r}")
        if not isinstance(self.negatives, int) or isinstance(self.negatives, bool) or self.negatives < 0:
            raise ValueError(f"negatives must be a non-negative integer, got {self.negatives!r}")


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
    negatives: Sequence[tuple[str, str]] = (),
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train PHATGOOSE gate vectors for ``expert`` on its own examples; returns ``(module → (in,) gate, losses)``.

    ``examples`` are ``(prompt, answer)`` pairs, or prompts alone (then answered by the expert itself). The base and
    the expert are frozen; only one vector per module is trained (with ``negatives``, also an offset, below), from
    zeros (σ = 0.5), with Adam and the LM loss on the answers (:func:`~moerge.routing.training.fit`).

    ``negatives``: other experts' ``(prompt, answer)`` pairs; the contrastive recipe. Every other step is then a
    batch of them, scored by how open the gates are at the tokens that write their answers (``−log(1 − σ)``,
    averaged over tokens and modules): on its own data alone nothing tells a gate where its expert does not belong,
    and the LM loss may even reward opening it there. The gate is then ``σ(⟨z / s, u⟩ + b)`` with ``z`` the
    standardized input (as at inference), ``s`` each feature's spread over the first batch's tokens, ``b`` a trained
    offset from :data:`CLOSED_START`; ``v = u / s`` is returned and ``b`` dropped (the inference logits have no
    offset).
    """
    examples = list(examples)
    if not examples:
        raise RoutingError("no examples to train its PHATGOOSE gates on", expert=expert.name)
    expert = expert.load()  # a stored expert's weights, read once
    if isinstance(examples[0], str):
        pairs = answers_from_expert(base, tokenizer, expert, examples)
    else:
        pairs = [(str(p), str(a)) for p, a in examples]
    device = next(base.parameters()).device
    gates = {m: torch.zeros((gate_input(base, m) or (m, w.in_features))[1], device=device, requires_grad=True)
             for m, w in expert.modules.items()}  # an MoE target's gate reads the MoE block's input
    contrast = bool(negatives)
    offsets = {m: torch.full((), CLOSED_START, device=device, requires_grad=True) for m in gates} if contrast else {}
    scales: dict[str, torch.Tensor] = {}  # per module, each standardized feature's spread over the first batch
    closing: list[torch.Tensor] = []  # −log(1 − σ) where a negative batch's answers are written, per module
    answers: list[torch.Tensor] = []

    def gate(module: str, x: torch.Tensor) -> torch.Tensor:
        if contrast:
            x = standardize(x)
            if module not in scales:
                scales[module] = x.detach().reshape(-1, x.shape[-1]).std(0).clamp_min(1e-3)
            z = (x / scales[module]) @ gates[module] + offsets[module]  # (B, T)
        else:
            z = x @ gates[module]  # (B, T)
        if answers:
            closing.append(torch.nn.functional.softplus(z)[answers[0]].mean())
        return torch.sigmoid(z).unsqueeze(-1)  # (B, T, 1)

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "negative" not in batch:
            return lm_loss(model, batch)
        closing.clear()
        answers[:] = [answer_positions(batch["labels"])]
        try:  # the forward fills ``closing``; lm_loss runs the output layer on the answer-writing tokens alone
            lm_loss(model, {k: v for k, v in batch.items() if k != "negative"})
        finally:
            answers.clear()
        return torch.stack(closing).mean()

    batches = make_batches(tokenizer, pairs, batch_size, steps, seed)
    if negatives:
        others = make_batches(tokenizer, [(str(p), str(a)) for p, a in negatives], batch_size, steps, seed + 1)
        batches = (b if s % 2 == 0 else {**n, "negative": torch.ones(1)}
                   for s, (b, n) in enumerate(zip(batches, others)))
    with GatedExperts(base, [expert], gate):
        losses = fit(base, [*gates.values(), *offsets.values()], batches, steps=steps, lr=lr, progress=progress,
                     desc=f"phatgoose gates {expert.name}", loss=loss)
    return {m: (g.detach() / scales[m] if m in scales else g.detach()).cpu() for m, g in gates.items()}, losses


@register_router("phatgoose")
class PhatgooseRouter(TrainedGateRouter):
    """Per-token top-k routing by standardized dot products with post-hoc trained gate vectors: the logits are
    ``⟨layer_norm(x), g⟩ / temperature``, ``-inf`` for candidates that do not target the module (the gates are
    centred, so ``x @ g / σ(x)`` is that dot product).

    Paper: Muqeeth et al., "Learning to Route Among Specialized Experts for Zero-Shot Generalization" (ICML 2024),
    arXiv:2402.05859.
    """

    config_class = PhatgooseConfig
    finish = "standardized"
    routing_kind = ROUTING_KIND
    data_label = "PHATGOOSE gates"
    lazy_data = True  # under a global stage (GLIDER) only the candidates' gates are read

    def __init__(self, config: PhatgooseConfig | None = None) -> None:
        super().__init__(config)
        self.keeps_peers = self.config.negatives > 0
        self.routing_kind = routing_kind(self.config.negatives)

    def set_gates(self, name: str, gates: dict[str, torch.Tensor], digest: str | None = None) -> None:
        """Use ``gates`` (module → (in,)) for expert ``name`` (e.g. trained with :func:`train_phatgoose_gates`)."""
        self._set_data(name, gates, digest)

    def gates_of(self, name: str) -> dict[str, torch.Tensor]:
        """Expert ``name``'s gate vectors as trained (module → (in,))."""
        return self._data_of(name)

    def gate_scale(self, layer: LayerInfo) -> float:
        return 1.0 / (self.config.temperature or math.sqrt(layer.in_features))

    def _prepare(self, data: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        gates = {m: g.detach().float().cpu().reshape(-1) for m, g in data.items()}
        return gates, {m: standardize(g) for m, g in gates.items()}

    def _zeros(self, expert: Expert) -> dict[str, torch.Tensor]:
        return {m: torch.zeros(self.context.gate_dim(m, in_f)) for m, (_, in_f) in expert.shapes().items()}

    def _train(self, expert: Expert) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Trained on the expert's examples, with up to ``negatives`` other experts' examples (answered by those
        experts) to close on; the other experts' gates stay as they are."""
        cfg, ctx = self.config, self.context
        base = ctx.training_base()  # a private base: answers and training never touch the serving one
        negatives = [pair for p in self._peers(expert, cfg.negatives) for pair in self._examples(p, base)]
        return train_phatgoose_gates(base, ctx.tokenizer, expert, self._examples(expert, base),
                                     steps=cfg.train_steps, lr=cfg.train_lr, batch_size=cfg.train_batch_size,
                                     negatives=negatives)
