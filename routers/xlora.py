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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.adapters.expert import Expert
from moerge.core.targets import gate_input
from moerge.errors import RoutingError
from moerge.routing import LayerInfo, register_router, standardize
from moerge.routing.training import GatedExperts, fit, make_batches
from moerge.routing.vector_gate import TrainedGateConfig, TrainedGateRouter

__all__ = ["XLoRAConfig", "XLoRARouter", "train_xlora_head", "ROUTING_KIND"]

ROUTING_KIND = "xlora"

Rows = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (w (in,), b ()): one expert's rows of the head


@dataclass
class XLoRAConfig(TrainedGateConfig):
    top_k: int | None = field(default=None, metadata={"help": "experts mixed per token (None: dense softmax)"})
    peers: int = field(default=8, metadata={
        "help": "when training a new expert's rows: how many other experts' examples to mix in"})

    def __post_init__(self) -> None:
        super().__post_init__()
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
    init: dict[str, Rows] | None = None,
    trainable: set[str] | None = None,
    steps: int = 40,
    lr: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Rows], list[float]]:
    """Train the head's rows on ``pairs`` (a mix of the experts' ``(prompt, answer)`` examples).

    Returns ``(expert → module → (w (in,), b ()), losses)``. ``init`` gives starting rows (default zeros: uniform
    scalings); only the experts in ``trainable`` (default: all) are updated, with Adam and the LM loss on the
    answers (:func:`~moerge.routing.training.fit`).
    """
    experts = [e.load() for e in experts]  # a stored expert's weights, read once
    if not experts or not pairs:
        raise RoutingError("training the X-LoRA head needs experts and examples")
    names = [e.name for e in experts]
    trainable = set(names) if trainable is None else set(trainable)
    init = init or {}
    device = next(base.parameters()).device
    rows: dict[str, Rows] = {}
    params = []
    for e in experts:
        rows[e.name] = {}
        for m, w in e.modules.items():
            dim = (gate_input(base, m) or (m, w.in_features))[1]  # an MoE target's gate reads the MoE block's input
            w0, b0 = init.get(e.name, {}).get(m, (torch.zeros(dim), torch.zeros(())))
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

    with GatedExperts(base, experts, gate):
        losses = fit(base, params, make_batches(tokenizer, list(pairs), batch_size, steps, seed), steps=steps, lr=lr,
                     progress=progress, desc=f"x-lora head ({len(trainable)} of {len(names)} experts)")
    return {n: {m: (w.detach().cpu(), b.detach().cpu()) for m, (w, b) in r.items()} for n, r in rows.items()}, losses


def rows_to_tensors(rows: Rows) -> dict[str, torch.Tensor]:
    """One expert's rows as the tensors stored in the library (``<module>.weight``, ``<module>.bias``)."""
    out = {}
    for m, (w, b) in rows.items():
        out[f"{m}.weight"], out[f"{m}.bias"] = w, b.reshape(1)
    return out


def rows_from_tensors(t: dict[str, torch.Tensor]) -> Rows:
    """The inverse of :func:`rows_to_tensors`, in float32."""
    mods = {k.rsplit(".", 1)[0] for k in t}
    return {m: (t[f"{m}.weight"].float(), t[f"{m}.bias"].float().reshape(())) for m in mods}


@register_router("xlora")
class XLoRARouter(TrainedGateRouter):
    """Learned per-module softmax head over the experts, one forward pass, KV cache kept: the logits are
    ``layer_norm(x) @ w / √in + b``, ``-inf`` for candidates without a row.

    Paper: Buehler & Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts" (2024), arXiv:2402.07148.
    """

    config_class = XLoRAConfig
    finish = "standardized"
    with_bias = True
    routing_kind = ROUTING_KIND
    data_label = "X-LoRA head rows"
    keeps_peers = True

    def set_rows(self, name: str, rows: Rows, digest: str | None = None, saved: bool = False) -> None:
        """Use ``rows`` (module → (w (in,), b ())) as expert ``name``'s part of the head."""
        self._set_data(name, rows, digest, saved)

    def rows_of(self, name: str) -> Rows:
        """Expert ``name``'s rows of the head (module → (w (in,), b ()))."""
        return self._data_of(name)

    def gate_scale(self, layer: LayerInfo) -> float:
        return 1.0 / math.sqrt(layer.in_features)

    def _prepare(self, data: Rows) -> tuple[Rows, dict[str, torch.Tensor]]:
        rows = {m: (w.detach().float().cpu().reshape(-1), b.detach().float().cpu().reshape(()))
                for m, (w, b) in data.items()}
        return rows, {m: torch.cat([w, b.reshape(1)]) for m, (w, b) in rows.items()}  # (in + 1,)

    def _zeros(self, expert: Expert) -> Rows:
        return {m: (torch.zeros(self.context.gate_dim(m, in_f)), torch.zeros(()))
                for m, (_, in_f) in expert.shapes().items()}

    def _to_tensors(self, data: Rows) -> dict[str, torch.Tensor]:
        return rows_to_tensors(data)

    def _from_tensors(self, tensors: dict[str, torch.Tensor]) -> Rows:
        return rows_from_tensors(tensors)

    def _train(self, expert: Expert) -> tuple[Rows, list[float]]:
        """Only the new expert's rows are trained, on its examples mixed with up to ``peers`` other experts'
        (whose rows stay as they are)."""
        peers = self._peers(expert, self.config.peers)
        base = self.context.training_base()  # a private base: answers and training never touch the serving one
        pairs = list(self._examples(expert, base))
        for p in peers:
            pairs += self._examples(p, base)
        rows, losses = train_xlora_head(
            base, self.context.tokenizer, [expert, *peers], pairs, init=dict(self._data),
            trainable={expert.name}, steps=self.config.train_steps, lr=self.config.train_lr,
            batch_size=self.config.train_batch_size, progress=True)
        return rows[expert.name], losses
