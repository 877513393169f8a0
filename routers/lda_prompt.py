"""LDA over the prompt: one mix per sequence from the local gates' statistics, with no embedder and no index.

The statistics are LDA's (:mod:`moerge.routers.lda`), taken of the base alone over every token of each expert's
example prompts and answers (``with_expert=False, positions="all"``; kind ``lda-r8-base-all``): per module, a
Gaussian model of the inputs the base computes on that expert's task. At prefill the router runs the base once
over each prompt (a private copy sharing its weights, :attr:`~moerge.routing.RouterContext.training_base`, so the
hooks never see the calls being served) and, in every module, scores the prompt's last ``window`` tokens under
each expert's model — Fisher's discriminant over the covariance pooled among the experts, at the Gaussian model's
own scale. Each token and module gives the experts a posterior (a log-softmax); their mean over the tokens and
modules is the row's score. A row's experts are the best by that score (``top_k``, or dynamic ``top_p`` and a null
expert: :class:`~moerge.routing.SelectionConfig`), mixed by ``softmax(score / temperature)`` with the same weights
on every token: a decision per sequence, as a speaker is identified by pooling the log-likelihoods of the frames of
an utterance under each speaker's Gaussian model (Reynolds & Rose 1995).

Why the prompt's statistics of the base and not the routed model's: the decision is taken before any expert is
applied, so it must read what a base forward computes; statistics taken with the expert applied
(``with_expert=True``) carry the expert's own shift of the hidden states, which a base forward lacks, and on the
zoo's dev split they identify 12–17% of prompts this way against 84–91% for the base's. Why the last tokens: the
chat template's opening is the same for every task; the prompt's end (and the template's turn change, whose
hidden states have read the whole prompt) is where tasks differ.

Cost: one base forward over the prompt per request, at prefill (a few hundred small matmuls for the discriminants
on top), and every expert's statistics in memory: a local-only router weighs every expert for every request.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.core.targets import gate_input
from moerge.errors import RoutingError
from moerge.routers.lda import Discriminant, LDAConfig, LDARouter
from moerge.routing import Candidates, LinearGate, RoutingRequest, register_router
from moerge.routing.types import all_candidates

__all__ = ["PromptLDAConfig", "PromptLDARouter"]


@dataclass
class PromptLDAConfig(LDAConfig):
    temperature: float = field(default=0.5623, metadata={
        "help": "a row's experts are mixed by softmax(score / temperature), score: the mean log-posterior of its "
                "prompt's tokens and modules (calibrated on the zoo's dev split: python -m moerge.lab.calibrate)"})
    with_expert: bool = field(default=False, metadata={
        "help": "statistics of the base alone (what the prompt's base forward computes); True is refused"})
    positions: str = field(default="all", metadata={
        "help": "tokens the statistics are taken over: 'all' (prompt and answer) or 'answer'"})
    top_k: int | None = field(default=1, metadata={
        "help": "experts per sequence (1: measured best on the dev split; None: all)"})
    window: int = field(default=16, metadata={
        "help": "the prompt's last tokens whose evidence is pooled (the chat template's opening is shared)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.with_expert:
            raise ValueError("lda_prompt reads a base forward over the prompt: with_expert must be False")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window <= 0:
            raise ValueError(f"window must be a positive integer, got {self.window!r}")


@register_router("lda_prompt")
class PromptLDARouter(LDARouter):
    """Per-sequence routing by LDA of the base's module inputs over the prompt's last tokens, pooled over tokens
    and modules; no local gate.

    Paper: Fisher (1936) as in Hastie, Tibshirani & Friedman, *The Elements of Statistical Learning* (2009), §4.3
    (the per-token discriminant, as :class:`~moerge.routers.lda.LDARouter`); the evidence of a sequence's frames
    pooled as in Reynolds & Rose, "Robust Text-Independent Speaker Identification Using Gaussian Mixture Speaker
    Models" (IEEE TSAP 1995).
    """

    config_class = PromptLDAConfig
    has_local_gate = False

    def __init__(self, config: PromptLDAConfig | None = None) -> None:
        super().__init__(config)
        # (data_ptr of the base's first weight, the copy, what of it runs: its decoder or all of it, its sites)
        self._reader: tuple[int, torch.nn.Module, torch.nn.Module, dict[str, list[str]]] | None = None
        self._tap = threading.local()  # the pooling of the forward this thread runs, if any

    def select(self, request: RoutingRequest) -> Candidates:
        names, b = request.names, request.batch_size
        if not names:
            empty = torch.full((b, 1), -1, dtype=torch.long)
            return Candidates(ids=empty, scores=torch.zeros(b, 1), names=names, weights=torch.zeros(b, 1))
        scores = self.prompt_scores(request)  # (B, N)
        weights = self.config.select((scores / self.config.temperature).float())  # (B, N), zeros off the chosen
        k = max(int((weights > 0).sum(-1).max()), 1)
        w, ids = weights.topk(k, dim=-1)
        ids = ids.masked_fill(w <= 0, -1)
        return Candidates(ids=ids, scores=scores.gather(1, ids.clamp(min=0)).float().masked_fill(ids < 0, 0.0),
                          names=names, weights=w)

    @torch.no_grad()
    def prompt_scores(self, request: RoutingRequest) -> torch.Tensor:
        """``(B, N)``: per row, each expert's log-posterior averaged over the prompt's last ``window`` tokens and
        the modules it has statistics for (``-inf`` for an expert with none)."""
        if request.input_ids is None:
            raise RoutingError("router 'lda_prompt' reads the prompt's tokens: call it with input_ids, not "
                               "inputs_embeds")
        names = request.names
        self.vectors.read(names)
        reader, run, sites = self._reader_base()
        device = next(reader.parameters()).device
        ids = request.input_ids.to(device)
        mask = (torch.ones_like(ids) if request.attention_mask is None else request.attention_mask.to(device)) > 0
        from_end = mask.flip(-1).long().cumsum(-1).flip(-1)  # 1 at each row's last real token, 2 before it, ...
        keep = mask & (from_end <= self.config.window)  # (B, T)
        cols = keep.any(0)  # the positions some row pools (left padding: the last window)
        keep = keep[:, cols].unsqueeze(-1)  # (B, T', 1)
        cands = all_candidates(request)
        total = torch.zeros(len(ids), len(names), dtype=torch.float64, device=device)
        seen = torch.zeros_like(total)

        def pool(site: str, x: torch.Tensor) -> None:
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])[:, cols]
            for m in sites[site]:
                d = x3.shape[-1]
                got = self.vectors.gate_operands(m, cands, device, center=True, combine=Discriminant(d, 1.0))
                if got is None:
                    continue
                lg = LinearGate(*got, finish=self.finish)
                lp = torch.log_softmax(lg.logits(x3, torch.bmm(x3.float(), lg.Vt)).double(), dim=-1)  # (B, T, N)
                has = torch.isfinite(lp) & keep
                total.add_(torch.where(has, lp, 0.0).sum(1))
                seen.add_(has.sum(1))

        self._tap.pool = pool
        try:
            run(input_ids=ids, attention_mask=mask.long())
        finally:
            self._tap.pool = None
        return torch.where(seen > 0, total / seen.clamp(min=1), float("-inf")).cpu()

    def _reader_base(self) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, list[str]]]:
        """The private copy of the base the prompts are read with (made again when the base's weights moved), its
        module inputs tapped at every site a statistic is kept for; the part of it to run; and the sites
        (:meth:`_sites`)."""
        make = self.context.training_base
        if make is None or self.context.language_model is None:
            raise RoutingError("router 'lda_prompt' reads the prompt with the base: attach it to a model")
        ptr = next(self.context.language_model.parameters()).data_ptr()
        if self._reader is None or self._reader[0] != ptr:
            reader = make().eval()
            sites = self._sites(reader)
            tapped = [reader.get_submodule(site) for site in sites]
            for site, module in zip(sites, tapped):
                module.register_forward_pre_hook(lambda mod, args, _s=site: self._tapped(_s, args[0]))
            # the decoder alone when every site is in it: the LM head's output is not needed
            decoder = reader.get_decoder() if hasattr(reader, "get_decoder") else None
            inside = {id(m) for m in decoder.modules()} if isinstance(decoder, torch.nn.Module) else set()
            run = decoder if all(id(m) in inside for m in tapped) else reader
            self._reader = (ptr, reader, run, sites)
        _, reader, run, sites = self._reader
        return reader, run, sites

    def _tapped(self, site: str, x: torch.Tensor) -> None:
        pool = getattr(self._tap, "pool", None)
        if pool is not None:
            pool(site, x)

    def _sites(self, base: torch.nn.Module) -> dict[str, list[str]]:
        """Where each module's gate reads its tokens (its own input; an MoE block's input for its router and fused
        expert weights), from the modules of the model: site → modules."""
        by_site: dict[str, list[str]] = defaultdict(list)
        for m in self.context.modules:
            by_site[(gate_input(base, m) or (m,))[0]].append(m)
        return dict(by_site)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # the reader and the thread's tap stay with this process
        state["_reader"] = None
        del state["_tap"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tap = threading.local()
