"""GLIDER: a global router over the experts' descriptions, then a local gate among each row's candidates.

Global stage, once per request at prefill: an LLM writes a short description of each prompt's task (default: the
base model itself, no expert applied, greedy, ``describe_tokens`` new tokens at most; cached by prompt hash); the
description — and/or the prompt itself (``query``) — is embedded with a sentence embedder (default
all-MiniLM-L6-v2) and a FAISS index over the experts' description and example-prompt embeddings
(:class:`~moerge.library.index.ExpertIndex`, stored in the library under ``routing/index``) returns the ``top_k`` candidate
experts per row with their cosine scores. By default each expert is one vector, the normalised centroid of its
texts' embeddings (``expert_vectors="centroid"``): the inputs inside example prompts average out, where with one
vector per text (``"each"``) a prompt that shares input words with another expert's example is pulled to it
(measured on the zoo: unseen-phrasing top-1 99.2% with centroids vs 95.6% with best-match over texts).

Local stage, per token and module: a local gate (``local``: PHATGOOSE by default, or Arrow) scores the row's
candidates; ``global_weight × global score`` is added to its logits (as in the paper) and the result is mixed by
top-k softmax (or dynamic top-p / null expert). With ``local="none"`` the candidates are mixed per sequence by
``softmax(score / temperature)``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moerge.adapters.expert import Expert
from moerge.errors import ExpertFormatError, LibraryError, RoutingError
from moerge.library.index import ExpertIndex, IndexMismatchError
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
from moerge.routing.router import build_router

__all__ = ["GliderConfig", "GliderRouter", "expert_texts"]

INDEX_SUBDIR = "index"
_QUERIES = ("description", "prompt", "both")
_EXPERT_VECTORS = ("centroid", "each")


@dataclass
class GliderConfig(SelectionConfig):
    candidates: int = field(default=3, metadata={"help": "K: candidate experts per row from the global stage"})
    local: str = field(default="phatgoose", metadata={"help": "local gate: 'phatgoose', 'arrow' or 'none'"})
    local_config: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "options of the local gate's router (e.g. {'train_steps': 50})"})
    global_weight: float = field(default=300.0, metadata={
        "help": "weight of the global cosine score added to the local logits (300: tuned on the zoo's dev split)"})
    temperature: float = field(default=0.05, metadata={
        "help": "with local='none': candidates mixed by softmax(score / temperature)"})
    query: str = field(default="prompt", metadata={
        "help": "what is embedded to query the index: the 'prompt', the LLM's 'description' of the task, or 'both'"})
    description_weight: float = field(default=0.5, metadata={
        "help": "with query='both': the query is (1-w)·prompt + w·description embedding"})
    describer: Any = field(default=None, metadata={
        "help": "None: the base model describes the task; a callable prompts → descriptions; or a TaskDescriber"})
    describe_tokens: int = field(default=32, metadata={"help": "most new tokens of a task description"})
    embedder: Any = field(default=None, metadata={
        "help": "None: all-MiniLM-L6-v2 (int8, traced: ~2 ms per prompt on CPU); a SentenceTransformer, or an "
                "object with id, dim, encode()"})
    rebuild_index: bool = field(default=False, metadata={
        "help": "re-embed every expert when the library's index was made with another embedder (else: an error)"})
    expert_vectors: str = field(default="centroid", metadata={
        "help": "how an expert's texts enter the index: 'centroid' (one vector, the normalised mean of its "
                "description and example embeddings) or 'each' (one vector per text, scored by the best match)"})
    approx_threshold: int = field(default=50_000, metadata={
        "help": "above this many vectors the index is approximate (HNSW) instead of exact"})

    def __post_init__(self) -> None:
        self._check_selection()
        if not isinstance(self.candidates, int) or self.candidates <= 0:
            raise ValueError(f"candidates must be a positive integer, got {self.candidates!r}")
        if self.local not in ("phatgoose", "arrow", "none"):
            raise ValueError(f"local must be 'phatgoose', 'arrow' or 'none', got {self.local!r}")
        if self.expert_vectors not in _EXPERT_VECTORS:
            raise ValueError(f"expert_vectors must be one of {_EXPERT_VECTORS}, got {self.expert_vectors!r}")
        if self.query not in _QUERIES:
            raise ValueError(f"query must be one of {_QUERIES}, got {self.query!r}")
        if not isinstance(self.global_weight, (int, float)) or not np.isfinite(self.global_weight):
            raise ValueError(f"global_weight must be a finite number, got {self.global_weight!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.description_weight, (int, float)) or not 0 <= self.description_weight <= 1:
            raise ValueError(f"description_weight must be in [0, 1], got {self.description_weight!r}")
        if not isinstance(self.describe_tokens, int) or self.describe_tokens <= 0:
            raise ValueError(f"describe_tokens must be a positive integer, got {self.describe_tokens!r}")
        if not isinstance(self.local_config, dict):
            raise ValueError(f"local_config must be a dict, got {self.local_config!r}")


def expert_texts(expert_name: str, description: str, examples: list[str]) -> list[str]:
    """The texts an expert is retrieved by: its description (or its name, without one) and its example prompts."""
    return [description.strip() or expert_name.replace("_", " ")] + [e for e in examples if e.strip()]


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
        self.local: Router | None = None
        if cfg.local != "none":
            opts = {"top_k": cfg.top_k, "top_p": cfg.top_p, "null_logit": cfg.null_logit, **cfg.local_config}
            self.local = build_router(cfg.local, **opts)
        self._embedder = None
        self._describer = None
        self.index: ExpertIndex | None = None
        self._texts: dict[str, tuple[list[str], str]] = {}  # expert -> (texts, key)
        self._dirty = False  # experts changed since the index was last brought up to date
        self._unsaved_index = False  # the index changed since it was last written to the library

    # --- parts, built on first use ------------------------------------------------------------------------------
    @property
    def embedder(self):
        if self._embedder is None:
            from moerge.routing.embed import as_embedder

            self._embedder = as_embedder(self.config.embedder)
        return self._embedder

    @property
    def describer(self) -> Callable[[list[str]], list[str]]:
        if self._describer is None:
            from moerge.routing.describe import TaskDescriber

            d = self.config.describer
            if isinstance(d, TaskDescriber):
                self._describer = d
            elif d is not None:
                if not callable(d):
                    raise RoutingError(f"router 'glider': describer must be callable, got {d!r}")
                self._describer = TaskDescriber(d)
            else:
                if self.context.tokenizer is None or self.context.language_model is None:
                    raise RoutingError("router 'glider' describes tasks with the base model, which needs a tokenizer: "
                                       "build the model with tokenizer=..., give describer=, or use query='prompt'")
                self._describer = TaskDescriber(self.context.language_model, self.context.tokenizer,
                                                max_new_tokens=self.config.describe_tokens)
        return self._describer

    def attach(self, context: RouterContext) -> None:
        super().attach(context)
        if self.local is not None:
            self.local.attach(context)

    # --- experts ------------------------------------------------------------------------------------------------
    def _key(self, texts: list[str]) -> str:
        return hashlib.sha256(json.dumps([self.embedder.id, self.config.expert_vectors, texts]).encode()).hexdigest()

    def on_add_expert(self, expert: Expert) -> None:
        if self.local is not None:
            self.local.on_add_expert(expert)
        texts = expert_texts(expert.name, expert.metadata.description, list(expert.metadata.examples))
        self._texts[expert.name] = (texts, "")  # key computed when the index is synced (needs the embedder id)
        self._dirty = True

    def on_remove_expert(self, name: str) -> None:
        if self.local is not None:
            self.local.on_remove_expert(name)
        self._texts.pop(name, None)
        if self.index is not None and name in self.index:
            self.index.remove(name)
            self._unsaved_index = True
        self._dirty = True

    def _index_dir(self):
        store = self.context.store
        return None if store is None else store.routing_dir / INDEX_SUBDIR

    def _sync_index(self) -> ExpertIndex:
        """Bring the index up to date with the experts: load the library's, embed only what changed."""
        if self.index is not None and not self._dirty:
            return self.index
        emb = self.embedder
        if self.index is None:
            folder = self._index_dir()
            lib = self.context.store if folder is not None else None
            recorded = lib.embedder if lib is not None else None
            if recorded and (recorded.get("id"), recorded.get("dim")) != (emb.id, emb.dim) \
                    and not self.config.rebuild_index:
                raise LibraryError(
                    f"the library's routing index was made with embedder {recorded.get('id')!r} "
                    f"(dimension {recorded.get('dim')}), not {emb.id!r} (dimension {emb.dim}); use that embedder, "
                    "or pass rebuild_index=True to re-embed every expert with this one", file=str(lib.root))
            if folder is not None and (folder / "index.json").is_file():
                try:
                    self.index = ExpertIndex.load(folder, dim=emb.dim, embedder=emb.id)
                except IndexMismatchError as e:  # made with another embedder: only on request
                    if not self.config.rebuild_index:
                        raise LibraryError(f"{e.problem}; pass rebuild_index=True to re-embed every expert",
                                           file=e.file) from None
                    warnings.warn(f"{e}; re-embedding every expert (rebuild_index=True)", stacklevel=2)
                except (LibraryError, ExpertFormatError) as e:  # damaged: the index is derived data, made again
                    warnings.warn(f"{e}; the routing index is rebuilt by re-embedding every expert", stacklevel=2)
            if self.index is None:
                self.index = ExpertIndex(emb.dim, emb.id, approx_threshold=self.config.approx_threshold)
                self._unsaved_index = True
        stale = [n for n in self.index.names if n not in self._texts]
        for name in stale:
            self.index.remove(name)
        todo = []
        for name, (texts, _) in self._texts.items():
            key = self._key(texts)
            self._texts[name] = (texts, key)
            if self.index.key(name) != key:
                todo.append(name)
        if todo:
            flat = [t for n in todo for t in self._texts[n][0]]
            vecs = emb.encode(flat)  # (sum of texts, dim)
            i = 0
            for n in todo:
                k = len(self._texts[n][0])
                v = vecs[i : i + k]  # (texts, dim)
                if self.config.expert_vectors == "centroid":
                    v = v.mean(axis=0, keepdims=True)
                    v /= max(float(np.linalg.norm(v)), 1e-12)  # (1, dim)
                self.index.add(n, v, key=self._texts[n][1])
                i += k
        self._dirty = False
        self._unsaved_index = self._unsaved_index or bool(stale or todo)
        return self.index

    def persist(self, library: Any) -> None:
        if self.local is not None:
            self.local.persist(library)
        if not self._texts and self.index is None:
            return
        index = self._sync_index()
        if self._unsaved_index:
            with library.locked():
                index.save(library.routing_dir / INDEX_SUBDIR)
            if library.embedder != {"id": self.embedder.id, "dim": self.embedder.dim}:
                library.set_embedder(self.embedder.id, self.embedder.dim)
            self._unsaved_index = False

    # --- routing --------------------------------------------------------------------------------------------------
    def query_vectors(self, prompts: list[str]) -> np.ndarray:
        """The ``(B, dim)`` unit query vectors of ``prompts`` (per ``config.query``)."""
        emb, mode = self.embedder, self.config.query
        w = {"prompt": 0.0, "description": 1.0, "both": float(self.config.description_weight)}[mode]
        q = np.zeros((len(prompts), emb.dim), dtype=np.float32)
        if w > 0:
            q += w * emb.encode(self.describer(prompts))
        if w < 1:
            q += (1 - w) * emb.encode(prompts)
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)

    def retrieve(self, prompts: list[str], k: int | None = None) -> tuple[list[list[str]], np.ndarray]:
        """The global stage alone: the ``k`` best experts per prompt and their cosine scores ``(B, k)``."""
        index = self._sync_index()
        return index.search(self.query_vectors(prompts), k or self.config.candidates)

    def select(self, request: RoutingRequest) -> Candidates:
        if request.prompts is None:
            raise RoutingError("router 'glider' reads the prompts as text: build the model with a tokenizer")
        b, k = request.batch_size, self.config.candidates
        position = {n: i for i, n in enumerate(request.names)}
        ids = torch.full((b, k), -1, dtype=torch.long)
        scores = torch.zeros((b, k))
        if request.names:
            names, sims = self.retrieve(list(request.prompts), k)
            for r in range(b):
                for j, (n, s) in enumerate(zip(names[r], sims[r])):
                    if n and n in position:
                        ids[r, j], scores[r, j] = position[n], float(s)
        weights = None
        if self.local is None:
            z = (scores / self.config.temperature).masked_fill(ids < 0, float("-inf"))
            weights = torch.nan_to_num(torch.softmax(z, dim=-1), nan=0.0)  # (B, K)
        return Candidates(ids=ids, scores=scores, names=request.names, weights=weights)

    def make_linear_gate(self, candidates: Candidates, layer: LayerInfo, device: torch.device) -> LinearGate | None:
        """The local router's gate plus the global term ``global_weight · score`` in its bias."""
        lg = self.local.linear_gate(candidates, layer, device)
        if lg is None:
            return None
        return lg.with_bias((self.config.global_weight * candidates.scores.to(device).float()).unsqueeze(1))
