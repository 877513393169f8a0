"""LDA: per-token routing by linear discriminant analysis of the module inputs, training-free.

For each expert and each module it targets, the routing data are statistics of the module's standardized inputs
``z = layer_norm(x)`` over the tokens that write the answers to the expert's example prompts (answered by the expert
itself; :func:`~moerge.routing.training.answer_positions`, or every token with ``positions="all"``): their
mean ``μ_e``, the top ``rank`` principal directions of their spread around it (scaled by their standard deviations),
the rest of the spread as one variance per dimension, and the token count (:func:`expert_statistics`). Nothing is
trained: one forward pass over a dozen examples when the expert is added, never touching any other expert's data.

A request's candidates are told apart by the Gaussian classifier with a covariance shared among them — Fisher's
linear discriminant (Hastie, Tibshirani & Friedman, *The Elements of Statistical Learning*, §4.3): the
candidates' covariances are pooled (weighted by their token counts) into ``Σ = U Uᵀ + σ² I`` (low rank plus the
pooled remaining variance, a probabilistic-PCA form that keeps ``Σ`` well conditioned), and each candidate's logit
is its log-likelihood up to a shared constant::

    logit_e = ( ⟨z, Σ⁻¹ μ_e⟩ − ½ ⟨μ_e, Σ⁻¹ μ_e⟩ ) / temperature

(``Σ⁻¹`` by the Woodbury identity, once per module and set of candidates, cached). The pooled covariance is what
makes it work: directions along which every expert's own tokens vary (which word is being copied, where in the
answer a token is) are discounted, and what is left is what sets one expert's tokens apart from another's. On the
zoo, nearest-mean routing identifies the right expert for 60–80% of answer tokens, this for 92–98% (dev split,
base hidden states). Because the logit is linear in ``z``, the gate is a :class:`~moerge.routing.LinearGate` fused
with the experts' first matmul like every other local gate here. With ``temperature`` 1 its logits are the
Gaussian model's log-likelihoods, which are far too sure of themselves (tokens are not independent Gaussians);
the default divides them by the temperature that maximises the likelihood of the true expert on the zoo's dev
split (``python -m moerge.lab.calibrate``), the scale GLIDER adds its global log-probabilities to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.adapters.expert import Expert
from moerge.core.targets import gate_input
from moerge.errors import RoutingError
from moerge.routing import LayerInfo, LinearGate, register_router, standardize
from moerge.routing.training import GatedExperts, answer_positions, answers_from_expert, collate
from moerge.routing.types import Candidates
from moerge.routing.vector_gate import TrainedGateConfig, TrainedGateRouter

__all__ = ["LDAConfig", "LDARouter", "expert_statistics", "Discriminant", "ROUTING_KIND"]

ROUTING_KIND = "lda"


@dataclass
class LDAConfig(TrainedGateConfig):
    temperature: float = field(default=100.0, metadata={
        "help": "logits are the discriminant's log-likelihoods divided by this (100: the maximum-likelihood "
                "temperature on the zoo's dev split; 1: the Gaussian model's own)"})
    rank: int = field(default=8, metadata={"help": "principal directions kept of each expert's spread per module"})
    with_expert: bool = field(default=True, metadata={
        "help": "statistics of the hidden states with the expert applied (else of the base alone)"})
    positions: str = field(default="answer", metadata={
        "help": "tokens the statistics are taken over: 'answer' (those that write the answer) or 'all' (the "
                "prompt's too: every token the gate routes)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.positions not in ("answer", "all"):
            raise ValueError(f"positions must be 'answer' or 'all', got {self.positions!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")


def pack(mean: torch.Tensor, factors: torch.Tensor, count: int, residual: float) -> torch.Tensor:
    """One module's statistics as the stored vector ``[μ (d) | factors (r·d) | count | residual variance]``."""
    return torch.cat([mean.float(), factors.float().reshape(-1), torch.tensor([float(count), float(residual)])])


def unpack(v: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(μ (..., d), factors (..., r, d), count (...), residual (...))`` of stored vectors ``(..., (r+1)·d + 2)``."""
    r = (v.shape[-1] - 2) // d - 1
    return v[..., :d], v[..., d : d * (r + 1)].reshape(*v.shape[:-1], r, d), v[..., -2], v[..., -1]


@torch.no_grad()
def expert_statistics(base: torch.nn.Module, tokenizer: Any, expert: Expert,
                      examples: Sequence[str] | Sequence[tuple[str, str]], *, rank: int = 8,
                      with_expert: bool = True, positions: str = "answer",
                      batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``module → packed statistics`` (:func:`pack`) of ``layer_norm(x)`` over the tokens that write the answers
    (``positions="answer"``: :func:`~moerge.routing.training.answer_positions`) or every token (``"all"``) of
    ``examples`` (prompts, answered by the expert; or ``(prompt, answer)`` pairs), with the expert applied
    (``with_expert``) or on the base alone."""
    examples = list(examples)
    if not examples:
        raise RoutingError("no examples to compute its routing statistics from", expert=expert.name)
    expert = expert.load()
    if isinstance(examples[0], str):
        pairs = answers_from_expert(base, tokenizer, expert, examples)
    else:
        pairs = [(str(p), str(a)) for p, a in examples]
    device = next(base.parameters()).device
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in expert.modules}
    mask: list[torch.Tensor] = []

    def hook(module: Any, args: tuple, _m: str) -> None:
        x = args[0]
        seen[_m].append(standardize(x.reshape(x.shape[0], -1, x.shape[-1]))[mask[0]].cpu())  # (N, in)

    # an MoE router's or fused expert weight's tokens are read at the MoE block's input (see gate_input)
    sites = {m: (gate_input(base, m) or (m,))[0] for m in seen}
    handles = [base.get_submodule(sites[m]).register_forward_pre_hook(lambda mod, a, _m=m: hook(mod, a, _m))
               for m in seen]
    applied = (GatedExperts(base, [expert], lambda m, x: torch.ones(*x.shape[:2], 1, device=x.device))
               if with_expert else contextlib.nullcontext())
    try:
        with applied:
            for i in range(0, len(pairs), batch_size):
                b = collate(tokenizer, pairs[i : i + batch_size])
                keep = answer_positions(b["labels"]) if positions == "answer" else b["attention_mask"] == 1
                mask[:] = [keep.to(device)]
                base(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for m, parts in seen.items():
        z = torch.cat(parts).double()  # (N, d)
        n, d = z.shape
        mean = z.mean(0)
        _, s, vh = torch.linalg.svd(z - mean, full_matrices=False)  # the spread's principal directions
        k = min(rank, len(s))
        factors = torch.zeros(rank, d, dtype=torch.float64)
        factors[:k] = vh[:k] * (s[:k] / n ** 0.5).unsqueeze(1)  # rows f with Σ_e = Σ f fᵀ + residual·I
        residual = float((s[k:] ** 2).sum()) / n / max(d - k, 1)
        floor = 1e-3 * float((s ** 2).sum()) / n / d  # a thousandth of the mean variance: few tokens, no blow-up
        out[m] = pack(mean, factors, n, max(residual, floor, 1e-8))
    return out


@dataclass(frozen=True)
class Discriminant:
    """Gate vectors and biases of a set of experts from their stored statistics (the ``combine`` of
    :meth:`~moerge.routing.selection.ExpertVectors.gate_operands`): the LDA logits over the pooled covariance."""

    d: int
    temperature: float

    def __call__(self, data: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, factors, count, residual = unpack(data.double(), self.d)
        use = present & (count > 0)  # experts without statistics (placeholders, zeros) get a logit of 0
        w = torch.zeros(len(data), self.d)
        b = torch.zeros(len(data))
        if not bool(use.any()):
            return w, b
        share = count[use] / count[use].sum()  # (E,)
        U = (factors[use] * share.sqrt()[:, None, None]).reshape(-1, self.d).t()  # (d, E·r)
        s2 = float((share * residual[use]).sum())  # the pooled remaining variance
        mu = mean[use]  # (E, d)
        # Σ⁻¹ μ with Σ = U Uᵀ + s2·I, by Woodbury: (μ − U (s2·I + UᵀU)⁻¹ Uᵀ μ) / s2
        inner = s2 * torch.eye(U.shape[1], dtype=U.dtype) + U.t() @ U
        v = (mu - (U @ torch.linalg.solve(inner, U.t() @ mu.t())).t()) / s2  # (E, d)
        bias = -0.5 * (mu * v).sum(1)
        # less the candidates' mean vector and bias: the same for every candidate, so the softmax is unchanged,
        # the logits stay small (log-likelihood ratios to the average candidate, not hundreds of nats each), and a
        # candidate without statistics (0, 0) scores as the average one
        w[use] = ((v - v.mean(0)) / self.temperature).float()
        b[use] = ((bias - bias.mean()) / self.temperature).float()
        return w, b


@register_router("lda")
class LDARouter(TrainedGateRouter):
    """Per-token top-k routing by linear discriminant analysis of the standardized module input among the request's
    candidates (their covariances pooled): ``⟨z, Σ⁻¹μ_e⟩ − ½⟨μ_e, Σ⁻¹μ_e⟩``; ``-inf`` for candidates that do not
    target the module.

    Paper: Fisher, "The Use of Multiple Measurements in Taxonomic Problems" (1936), as in Hastie, Tibshirani &
    Friedman, *The Elements of Statistical Learning* (2009), §4.3; the covariance kept low rank plus isotropic as in
    Tipping & Bishop, "Probabilistic Principal Component Analysis" (1999).
    """

    config_class = LDAConfig
    finish = "standardized"
    routing_kind = ROUTING_KIND
    data_label = "LDA statistics"
    lazy_data = True

    def __init__(self, config: LDAConfig | None = None) -> None:
        super().__init__(config)
        # statistics made another way are stored apart
        # (with another rank, or of the base alone): a library may hold several kinds
        cfg = self.config
        self.routing_kind = (f"{ROUTING_KIND}-r{cfg.rank}" + ("" if cfg.with_expert else "-base")
                             + ("" if cfg.positions == "answer" else f"-{cfg.positions}"))

    def make_linear_gate(self, candidates: Candidates, layer: LayerInfo, device: torch.device) -> LinearGate | None:
        got = self.vectors.gate_operands(layer.name, candidates, device, center=True,
                                         combine=Discriminant(layer.in_features, float(self.config.temperature)))
        return None if got is None else LinearGate(*got, finish=self.finish)

    def _prepare(self, data: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        kept = {m: v.detach().float().cpu().reshape(-1) for m, v in data.items()}
        return kept, kept  # the gate vectors are made per set of candidates (Discriminant)

    def _to_tensors(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Once for modules that read the same input (a block's q/k/v projections, its gate/up projections), under
        their names joined by ``+``: the mean and factors in float16 (they are O(1)), the token count and the
        residual variance in float32 under ``<key>@n``."""
        groups: dict[tuple, list[str]] = {}
        for m in sorted(data):
            key = (data[m].numel(), data[m].numpy().tobytes())
            groups.setdefault(key, []).append(m)
        out = {}
        for ms in groups.values():
            v = data[ms[0]].float()
            out["+".join(ms)], out["+".join(ms) + "@n"] = v[:-2].to(torch.float16), v[-2:].clone()
        return out

    def _from_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: torch.cat([v.float(), tensors[f"{key}@n"].float()])
                for key, v in tensors.items() if not key.endswith("@n") for m in key.split("+")}

    def _zeros(self, expert: Expert) -> dict[str, torch.Tensor]:
        return {m: torch.zeros((self.config.rank + 1) * self.context.gate_dim(m, in_f) + 2)
                for m, (_, in_f) in expert.shapes().items()}

    def _train(self, expert: Expert) -> tuple[dict[str, torch.Tensor], list[float]]:
        ctx = self.context
        base = ctx.training_base()
        data = expert_statistics(base, ctx.tokenizer, expert, self._examples(expert, base),
                                 rank=self.config.rank, with_expert=self.config.with_expert,
                                 positions=self.config.positions)
        return data, []

    def statistics_of(self, name: str) -> dict[str, torch.Tensor]:
        """Expert ``name``'s routing data (module → packed statistics, :func:`unpack`)."""
        return self._data_of(name)
