"""X-LoRA-style learned gate: a small head per patched module maps the token's hidden state to scalings over
the experts, trained on a mix of the experts' examples with the base and the experts frozen.

Per module, expert ``e`` owns one row ``w_e (in,)`` and a bias ``b_e`` of the head; the logits are
``⟨standardize(x), w_e⟩ / √d + b_e`` and the scalings are their softmax over the row's candidates (dense, as in
X-LoRA, or top-k / top-p / null expert). Unlike PEFT's X-LoRA, which runs the model twice per step (a scaling pass
without adapters, then the real pass) and so cannot keep its KV cache, the head reads each module's own input, so a
routed forward is one pass and generation keeps the KV cache.

The head is trained jointly for the experts present (:func:`train_xlora_head`), and each expert's rows are stored
with it in the library. An expert added later gets only its own rows trained (the others stay frozen), on its
examples mixed with the other experts' examples — the others are never retrained.
"""

from __future__ import annotations

import math
import random
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

__all__ = ["XLoRAConfig", "XLoRARouter", "train_xlora_head", "ROUTING_KIND"]

ROUTING_KIND = "xlora"


@dataclass
class XLoRAConfig(SelectionConfig, GateTrainingConfig):
    top_k: int | None = field(default=None, metadata={"help": "experts mixed per token (None: dense softmax)"})
    peers: int = field(default=8, metadata={
        "help": "when training a new expert's rows: how many other experts' examples to mix in"})

    def __post_init__(self) -> None:
        self._check_selection()
        self._check_training()
        if not isinstance(self.peers, int) or self.peers < 0:
            raise ValueError(f"peers must be a non-negative integer, got {self.peers!r}")


def _head_logits(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x (B, T, in)``, ``W (E, in)``, ``b (E,)`` → ``(B, T, E)``."""
    return standardize(x) @ W.t() / math.sqrt(x.shape[-1]) + b


def train_xlora_head(
    base: torch.nn.Module,
    tokenizer: Any,
    experts: Sequence[Expert],
    pairs: Sequence[tuple[str, str]],
    *,
    init: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
    trainable: set[str] | None = None,
    steps: int = 40,
    lr: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], list[float]]:
    """Train the head's rows on ``pairs`` (a mix of the experts' ``(prompt, answer)`` examples).

    Returns ``(expert → module → (w (in,), b ()), losses)``. ``init`` gives starting rows (default zeros: uniform
    scalings); only the experts in ``trainable`` (default: all) are updated.
    """
    from tqdm.auto import tqdm

    from moerge.routing.training import GatedExperts, frozen, make_batches

    experts = list(experts)
    if not experts or not pairs:
        raise RoutingError("training the X-LoRA head needs experts and examples")
    names = [e.name for e in experts]
    trainable = set(names) if trainable is None else set(trainable)
    init = init or {}
    device = next(base.parameters()).device
    rows: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    params = []
    for e in experts:
        rows[e.name] = {}
        for m, w in e.modules.items():
            w0, b0 = init.get(e.name, {}).get(m, (torch.zeros(w.in_features), torch.zeros(())))
            wv = w0.detach().float().clone().to(device).requires_grad_(e.name in trainable)
            bv = b0.detach().float().clone().reshape(()).to(device).requires_grad_(e.name in trainable)
            rows[e.name][m] = (wv, bv)
            if e.name in trainable:
                params += [wv, bv]
    if not params:
        raise RoutingError(f"none of the experts to train ({sorted(trainable)}) is among {names}")

    def gate(module: str, x: torch.Tensor) -> torch.Tensor:
        present = [i for i, e in enumerate(experts) if module in e.modules]
        W = torch.stack([rows[experts[i].name][module][0] for i in present])  # (E_m, in)
        b = torch.stack([rows[experts[i].name][module][1] for i in present])  # (E_m,)
        p = torch.softmax(_head_logits(x, W, b), dim=-1)  # (B, T, E_m)
        out = x.new_zeros(*x.shape[:2], len(experts))
        return out.index_copy(-1, torch.tensor(present, device=x.device), p)  # (B, T, E)

    rng_state = torch.random.get_rng_state()  # the caller's random state is given back afterwards
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    was_training = base.training
    base.eval()
    bar = tqdm(make_batches(tokenizer, list(pairs), batch_size, steps, seed), total=steps,
               desc=f"x-lora head ({len(trainable)} of {len(names)} experts)", disable=not progress, leave=False)
    try:
        with frozen(base), torch.enable_grad(), GatedExperts(base, experts, gate):
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
    return {n: {m: (w.detach().cpu(), b.detach().cpu()) for m, (w, b) in r.items()} for n, r in rows.items()}, losses


def rows_to_tensors(rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for m, (w, b) in rows.items():
        out[f"{m}.weight"], out[f"{m}.bias"] = w, b.reshape(1)
    return out


def rows_from_tensors(t: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    mods = {k.rsplit(".", 1)[0] for k in t}
    return {m: (t[f"{m}.weight"].float(), t[f"{m}.bias"].float().reshape(())) for m in mods}


@register_router("xlora")
class XLoRARouter(Router):
    """Learned per-module softmax head over the experts, one forward pass, KV cache kept.

    Paper: Buehler & Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts" (2024), arXiv:2402.07148.
    """

    config_class = XLoRAConfig
    has_local_gate = True

    def __init__(self, config: XLoRAConfig | None = None) -> None:
        super().__init__(config)
        self._rows: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # expert -> module -> (w, b)
        self._digest: dict[str, str] = {}
        self._unsaved: set[str] = set()
        self._experts: dict[str, Expert] = {}
        self._answers: dict[str, list[tuple[str, str]]] = {}
        self._head = ExpertVectors()  # module -> expert -> [w (in,), b] (in + 1,)
        self.losses: dict[str, list[float]] = {}
        self._copy: torch.nn.Module | None = None  # the private base of the expert being added

    def set_rows(self, name: str, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], digest: str | None = None,
                 saved: bool = False) -> None:
        """Use ``rows`` (module → (w (in,), b ())) as expert ``name``'s part of the head."""
        self._rows[name] = {m: (w.detach().float().cpu().reshape(-1), b.detach().float().cpu().reshape(()))
                            for m, (w, b) in rows.items()}
        self._head.set(name, {m: torch.cat([w, b.reshape(1)]) for m, (w, b) in self._rows[name].items()})
        if digest is not None:
            self._digest[name] = digest
        (self._unsaved.discard if saved else self._unsaved.add)(name)

    def _training_base(self) -> torch.nn.Module:
        """One private copy of the base per expert added (its examples are answered and its rows trained on it)."""
        if self._copy is None:
            self._copy = self.context.training_base()
        return self._copy

    def _examples(self, expert: Expert) -> list[tuple[str, str]]:
        if expert.name not in self._answers:
            from moerge.routing.training import answers_from_expert

            self._answers[expert.name] = answers_from_expert(self._training_base(), self.context.tokenizer, expert,
                                                             list(expert.metadata.examples))
        return self._answers[expert.name]

    def on_add_expert(self, expert: Expert) -> None:
        try:
            self._add(expert)
        finally:
            self._copy = None  # the private base is dropped once the expert's rows are made

    def _add(self, expert: Expert) -> None:
        digest = expert.digest()
        if self._digest.get(expert.name) == digest and expert.name in self._rows:
            self._experts[expert.name] = expert
            return
        store = self.context.store
        stored = None if store is None else store.routing_for(expert.name, ROUTING_KIND, digest)
        if stored is not None:
            self._experts[expert.name] = expert
            self.set_rows(expert.name, rows_from_tensors(stored), digest, saved=True)
            return
        tok = self.context.tokenizer
        if self.config.train_missing and expert.metadata.examples and tok is not None \
                and self.context.training_base is not None:
            peers = [self._experts[n] for n in self._experts if n != expert.name and self._experts[n].metadata.examples]
            peers = random.Random(expert.name).sample(peers, min(self.config.peers, len(peers)))
            pairs = list(self._examples(expert))
            for p in peers:
                pairs += self._examples(p)
            group = [expert, *peers]
            rows, losses = train_xlora_head(
                self._training_base(), tok, group, pairs, init={n: self._rows[n] for n in self._rows},
                trainable={expert.name}, steps=self.config.train_steps, lr=self.config.train_lr,
                batch_size=self.config.train_batch_size, progress=True)
            self.losses[expert.name] = losses
            self._experts[expert.name] = expert
            self.set_rows(expert.name, rows[expert.name], digest)
            return
        warnings.warn(f"expert {expert.name!r} has no X-LoRA head rows (none stored, and no example prompts or "
                      "tokenizer to train them): it gets logit 0 everywhere", stacklevel=3)
        self._experts[expert.name] = expert
        self.set_rows(expert.name, {m: (torch.zeros(w.in_features), torch.zeros(()))
                                    for m, w in expert.modules.items()}, digest, saved=True)

    def on_remove_expert(self, name: str) -> None:
        for d in (self._rows, self._digest, self._experts, self._answers):
            d.pop(name, None)
        self._head.remove(name)
        self._unsaved.discard(name)

    def persist(self, library: Any) -> None:
        for name in sorted(self._unsaved):
            if name in library and name in self._digest:
                library.put_routing(name, ROUTING_KIND, rows_to_tensors(self._rows[name]),
                                    {"digest": self._digest[name]})
                self._unsaved.discard(name)

    def rows_of(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if name not in self._rows:
            raise RoutingError("no X-LoRA head rows for this expert", expert=name)
        return dict(self._rows[name])

    def select(self, request: RoutingRequest) -> Candidates:
        """Every expert is a candidate of every row; the head decides per token."""
        return all_candidates(request)

    def make_linear_gate(self, candidates: Candidates, layer: LayerInfo, device: torch.device) -> LinearGate | None:
        """The head's logits ``layer_norm(x) @ w / √in + b`` (``-inf`` for candidates without a row)."""
        got = self._head.gate_operands(layer.name, candidates, device, 1.0 / math.sqrt(layer.in_features),
                                       with_bias=True, center=True)
        return None if got is None else LinearGate(*got, finish="standardized")
