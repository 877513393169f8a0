"""GLIDER: a global router over the experts' descriptions, then a local gate among each row's candidates.

Global stage, once per request at prefill: an :class:`~moerge.routing.retrieval.ExpertRetriever` embeds each
prompt (and/or a short description of its task written by an LLM, by default the base model itself: ``query``)
with a sentence embedder (default all-MiniLM-L6-v2) and returns the ``top_k`` candidate experts per row, with
their cosine scores, from a FAISS index over the experts' descriptions and example prompts, kept in the library
under ``routing/index``.

Local stage, per token and module: a local gate (``local``: LDA by default, or PHATGOOSE or Arrow) scores the row's
candidates, and the global stage's belief is added to its logits as a log-prior: ``log softmax(score /
global_temperature)`` over the row's candidates. With the LDA gate, whose logits are log-likelihoods, the sum is
the log-posterior of Bayes' rule (global evidence from the prompt, local evidence from the token): where the
retrieval is sure, its prior dominates; on near ties it is flat and the token decides. ``global_temperature`` and
the local gate's temperature are calibrated on the dev split by maximum likelihood (temperature scaling, Guo et al.
2017: ``python -m moerge.lab.calibrate``), not tuned by hand — the local one within GLIDER, on its own rows and
against the fixed log-prior. GLIDER's LDA takes its statistics over every token it routes (``positions="all"``),
prompt tokens too, where LDA alone takes the tokens that write the answer: within GLIDER the prompt has already told
the candidates apart, and what costs answers is a prompt token pulled away from the right expert by statistics that
never saw such tokens (measured on the dev split: ``count_words``, whose counted words often come before the
instruction). The result is mixed by top-k softmax (or dynamic top-p / null expert). With ``local="none"`` the
candidates are mixed per sequence by ``softmax(score / temperature)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moerge.adapters.expert import Expert
from moerge.errors import RoutingError
from moerge.library.index import ExpertIndex
from moerge.routing import (
    Candidates,
    LayerInfo,
    LinearGate,
    Router,
    RouterContext,
    RoutingRequest,
    SelectionConfig,
    register_router,
)
from moerge.routing.embed import Embedder
from moerge.routing.retrieval import ExpertRetriever, RetrievalConfig, expert_texts
from moerge.routing.router import build_router

__all__ = ["GliderConfig", "GliderRouter", "expert_texts", "local_options"]


LOCAL_GATES = ("lda", "phatgoose", "arrow")
# the local gate's options within GLIDER, unless local_config names them: LDA's statistics over every token the gate
# routes, prompt tokens too (among three candidates the prompt already told apart, what matters is that no prompt
# token is pulled from the right expert; LDA alone does better on the answer-writing tokens)
LOCAL_DEFAULTS: dict[str, dict[str, Any]] = {"lda": {"positions": "all"}}
# calibrated on the zoo's dev split by maximum likelihood (python -m moerge.lab.calibrate; results/calibration.json):
# the global stage's, and then the local gate's within GLIDER (against the global log-prior, on GLIDER's own rows),
# for each kind of LDA statistics
GLOBAL_TEMPERATURE = 0.0316
LOCAL_TEMPERATURE: dict[str, dict[str, float]] = {"lda": {"all": 75.0, "answer": 177.8}}
PROMPT_POOL = 64  # with prompt_weight: the retrieval's best this many are scored exactly, the rest at its floor


def local_options(local: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The options GLIDER builds its local gate ``local`` with: :data:`LOCAL_DEFAULTS`, then ``config``, and the
    temperature calibrated within GLIDER for the statistics so chosen unless ``config`` names one."""
    opts = {**LOCAL_DEFAULTS.get(local, {}), **config}
    calibrated = LOCAL_TEMPERATURE.get(local, {}).get(opts.get("positions", "answer"))
    if "temperature" not in config and calibrated is not None:
        opts["temperature"] = calibrated
    return opts


@dataclass
class GliderConfig(RetrievalConfig, SelectionConfig):
    candidates: int = field(default=3, metadata={"help": "K: candidate experts per row from the global stage"})
    local: str = field(default="lda", metadata={"help": "local gate: 'lda', 'phatgoose', 'arrow' or 'none'"})
    local_config: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "options of the local gate's router (e.g. {'temperature': 20}); LDA's default here takes its "
                "statistics over every token (positions 'all') and the temperature calibrated within GLIDER for "
                "them (LOCAL_TEMPERATURE), not LDA alone's"})
    global_temperature: float = field(default=GLOBAL_TEMPERATURE, metadata={
        "help": "the global log-prior added to the local logits is log softmax(score / global_temperature)"})
    temperature: float = field(default=0.05, metadata={
        "help": "with local='none': candidates mixed by softmax(score / temperature)"})
    prompt_weight: float = field(default=0.0, metadata={
        "help": "weight of lda_prompt's per-sequence log-probabilities (LDA of the base's inputs over the prompt) "
                "added to the global stage's log-probabilities before the candidates are chosen; 0: off (each "
                "request then costs one more base forward over its prompt)"})

    def __post_init__(self) -> None:
        self._check_selection()
        self._check_retrieval()
        if not isinstance(self.candidates, int) or self.candidates <= 0:
            raise ValueError(f"candidates must be a positive integer, got {self.candidates!r}")
        if self.local not in LOCAL_GATES + ("none",):
            raise ValueError(f"local must be one of {LOCAL_GATES + ('none',)}, got {self.local!r}")
        if not isinstance(self.global_temperature, (int, float)) or not self.global_temperature > 0 \
                or not np.isfinite(self.global_temperature):
            raise ValueError(f"global_temperature must be a finite number > 0, got {self.global_temperature!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.prompt_weight, (int, float)) or not self.prompt_weight >= 0 \
                or not np.isfinite(self.prompt_weight):
            raise ValueError(f"prompt_weight must be a finite number >= 0, got {self.prompt_weight!r}")
        if not isinstance(self.local_config, dict):
            raise ValueError(f"local_config must be a dict, got {self.local_config!r}")


@register_router("glider")
class GliderRouter(Router):
    """Global top-K retrieval over the experts' descriptions, then a local gate among the candidates.

    Paper: Li et al., "Glider: Global and Local Instruction-Driven Expert Router" (2024), arXiv:2410.07172.
    """

    config_class = GliderConfig
    has_local_gate = True

    def __init__(self, config: GliderConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.retriever = ExpertRetriever(cfg, owner=self.name)
        self.local: Router | None = None
        if cfg.local != "none":
            opts = {"top_k": cfg.top_k, "top_p": cfg.top_p, "null_logit": cfg.null_logit,
                    **local_options(cfg.local, cfg.local_config)}
            self.local = build_router(cfg.local, **opts)
        # the prompt's own evidence, from the local gates' kind of statistics (lda_prompt), when asked for
        self.prompt: Router | None = build_router("lda_prompt") if cfg.prompt_weight > 0 else None

    @property
    def _parts(self) -> list[Router]:
        """The routers whose routing data GLIDER keeps besides its index: the local gate's and the prompt's."""
        return [r for r in (self.local, self.prompt) if r is not None]

    # --- the retriever's parts ------------------------------------------------------------------------------------
    @property
    def index(self) -> ExpertIndex | None:
        """The experts' FAISS index (``None`` until first used)."""
        return self.retriever.index

    @property
    def embedder(self) -> Embedder:
        """The sentence embedder of the experts' texts and the queries."""
        return self.retriever.embedder

    @property
    def describer(self) -> Callable[[list[str]], list[str]]:
        """The task describer (prompts → descriptions) used with ``query="description"`` or ``"both"``."""
        return self.retriever.describer

    def attach(self, context: RouterContext) -> None:
        super().attach(context)
        self.retriever.attach(context)
        for part in self._parts:
            part.attach(context)

    # --- experts ------------------------------------------------------------------------------------------------
    def prepare_expert(self, expert: Expert) -> Any:
        return [part.prepare_expert(expert) for part in self._parts]  # in the order of _parts

    def needs_training(self, expert: Expert) -> bool:
        return any(part.needs_training(expert) for part in self._parts)

    def defer_expert(self, expert: Expert) -> None:
        """The global stage retrieves ``expert`` at once; until its local gate data is trained, a row that has it
        as a candidate gives it a local logit of 0, so it is weighed by its global score alone (and, with
        ``prompt_weight``, by the prompt's evidence once its statistics are in; none before)."""
        for part in self._parts:
            if part.needs_training(expert):
                part.defer_expert(expert, placeholder=True)
            else:
                part.on_add_expert(expert)
        self.retriever.add(expert)

    def on_add_expert(self, expert: Expert, prepared: Any = None) -> None:
        for part, got in zip(self._parts, prepared or [None] * len(self._parts)):
            part.on_add_expert(expert, got)
        self.retriever.add(expert)

    def on_remove_expert(self, name: str) -> None:
        for part in self._parts:
            part.on_remove_expert(name)
        self.retriever.remove(name)

    def unread_routing(self, candidates: Candidates) -> list[str]:
        return [] if self.local is None else self.local.unread_routing(candidates)

    def read_routing(self, names: Sequence[str], loaded: Mapping[str, tuple[Expert, Expert]] | None = None) -> None:
        if self.local is not None:
            self.local.read_routing(names, loaded)

    def persist(self, store: Any) -> None:
        for part in self._parts:
            part.persist(store)
        self.retriever.persist(store)

    # --- routing --------------------------------------------------------------------------------------------------
    def query_vectors(self, prompts: list[str]) -> np.ndarray:
        """The ``(B, dim)`` unit query vectors of ``prompts`` (per ``config.query``)."""
        return self.retriever.query_vectors(prompts)

    def retrieve(self, prompts: list[str], k: int | None = None) -> tuple[list[list[str]], np.ndarray]:
        """The global stage alone: the ``k`` (default ``candidates``) best experts per prompt and their cosine
        scores ``(B, k)``."""
        return self.retriever.retrieve(prompts, k or self.config.candidates)

    def select(self, request: RoutingRequest) -> Candidates:
        if request.prompts is None:
            raise RoutingError("router 'glider' reads the prompts as text: build the model with a tokenizer")
        b, k = request.batch_size, self.config.candidates
        position = {n: i for i, n in enumerate(request.names)}
        ids = torch.full((b, k), -1, dtype=torch.long)
        scores = torch.zeros((b, k))
        if request.names and self.prompt is None:
            names, sims = self.retrieve(list(request.prompts), k)
            for r in range(b):
                for j, (n, s) in enumerate(zip(names[r], sims[r])):
                    if n and n in position:
                        ids[r, j], scores[r, j] = position[n], float(s)
        elif request.names:
            ids, scores = self._with_prompt_evidence(request, k)
        weights = None
        if self.local is None:
            z = (scores / self.config.temperature).masked_fill(ids < 0, float("-inf"))
            weights = torch.nan_to_num(torch.softmax(z, dim=-1), nan=0.0)  # (B, K)
        return Candidates(ids=ids, scores=scores, names=request.names, weights=weights)

    def _with_prompt_evidence(self, request: RoutingRequest, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, scores)`` of each row's ``k`` best experts by ``log softmax(cosine / global_temperature) +
        prompt_weight · log softmax(lda_prompt score / its temperature)`` over every expert, with each candidate's
        score the cosine plus its prompt evidence on the cosine scale (``global_temperature · prompt_weight ·
        log-probability``), so the log-prior of the local stage and the sequence weights of ``local="none"`` take
        both. Experts beyond the retrieval's ``PROMPT_POOL`` best get the lowest cosine retrieved."""
        names = request.names
        n, b = len(names), request.batch_size
        position = {x: i for i, x in enumerate(names)}
        pool = min(n, max(k, PROMPT_POOL))
        got, sims = self.retrieve(list(request.prompts), pool)
        cos = torch.full((b, n), float("nan"), dtype=torch.float64)
        for r in range(b):
            for x, v in zip(got[r], sims[r]):
                if x and x in position:
                    cos[r, position[x]] = float(v)
        floor = torch.nan_to_num(cos, nan=float("inf")).min(-1, keepdim=True).values  # (B, 1)
        cos = torch.where(torch.isnan(cos), floor, cos)
        tg, tp = float(self.config.global_temperature), float(self.prompt.config.temperature)
        score = self.prompt.prompt_scores(request).double()  # (B, N), -inf for an expert without statistics
        have = torch.isfinite(score)
        average = torch.where(have, score, 0.0).sum(-1, keepdim=True) / have.sum(-1, keepdim=True).clamp(min=1)
        score = torch.where(have, score, average)  # no evidence for or against it (one still being computed)
        lp = torch.log_softmax(score / tp, dim=-1)
        total = cos + tg * float(self.config.prompt_weight) * lp  # on the cosine scale
        top = total.topk(min(k, n), dim=-1)
        ids = torch.full((b, k), -1, dtype=torch.long)
        scores = torch.zeros((b, k))
        ids[:, : top.indices.shape[1]] = top.indices
        scores[:, : top.values.shape[1]] = top.values.float()
        return ids, scores

    @property
    def has_linear_gate(self) -> bool:
        return self.local is not None and self.local.has_linear_gate

    def make_linear_gate(self, candidates: Candidates, layer: LayerInfo, device: torch.device) -> LinearGate | None:
        """The local router's gate plus the global log-prior ``log softmax(score / global_temperature)`` over the
        row's candidates in its bias."""
        lg = self.local.linear_gate(candidates, layer, device)
        if lg is None:
            return None
        key = (id(self), "biased", id(lg.bias))  # modules whose local gates share a bias share the sum too
        got = candidates.memo.get(key)
        if got is None or got[0] is not lg.bias:
            got = candidates.memo[key] = (lg.bias, lg.bias + self.log_prior(candidates).to(device).unsqueeze(1))
        return dataclasses.replace(lg, bias=got[1])

    def log_prior(self, candidates: Candidates) -> torch.Tensor:
        """``(B, K)``: the global stage's log-probabilities of each row's candidates (0 in empty slots, whose
        logits are ``-inf`` anyway), kept in ``candidates.memo``."""
        got = candidates.memo.get((id(self), "log_prior"))
        if got is None:
            filled = candidates.ids >= 0
            z = (candidates.scores.float() / self.config.global_temperature).masked_fill(~filled, float("-inf"))
            got = torch.where(filled, torch.log_softmax(z, dim=-1), torch.zeros_like(z))
            candidates.memo[(id(self), "log_prior")] = got
        return got
