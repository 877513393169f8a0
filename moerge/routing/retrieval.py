"""Retrieval of experts by text: a global router's stage that picks each prompt's candidate experts.

:class:`ExpertRetriever` keeps, for every expert, the texts it is retrieved by (:func:`expert_texts`: its
description, or its name without one, and its example prompts) and a FAISS
:class:`~moerge.library.index.ExpertIndex` over their embeddings. The index is brought up to date on first use
after a change, incrementally: only an expert whose texts (or the embedder, or ``expert_vectors``) changed is
embedded again. With a library, the index is loaded from and saved to its routing folder (``routing/index``) and
the embedder's id and dimension are recorded in the library, so an index is never queried with another embedder.
Saving merges with the index on disk, which other models and processes on the same library write too: experts
this retriever does not know stay, experts the library no longer lists go.

A query is the prompt's embedding, the embedding of a short task description written by an LLM
(:class:`~moerge.routing.describe.TaskDescriber`, by default the base model itself), or a weighted mix of both
(``query``). Each expert is one vector by default, the normalised centroid of its texts' embeddings
(``expert_vectors="centroid"``): the inputs inside example prompts average out, where with one vector per text
(``"each"``, scored by the best match) a prompt that shares input words with another expert's example is pulled
to it.

Results retrieved elsewhere can be handed to this process (:data:`GIVEN`, a :class:`GivenRetrievals`): moerge on
Ray Serve retrieves each prompt's experts in its ingress, to place the request, and passes the ranking to the model
replica with the request, so the replica's router does not embed and search again. A retriever takes a handed
ranking only for the very text it would embed and only when it was made over the same experts' texts with the same
embedder (:meth:`ExpertRetriever.fingerprint`), so it returns what its own search would.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moerge.errors import ExpertFormatError, LibraryError, RoutingError
from moerge.library.index import ExpertIndex, IndexMismatchError
from moerge.routing.describe import TaskDescriber
from moerge.routing.embed import Embedder, as_embedder
from moerge.routing.router import RouterContext

if TYPE_CHECKING:  # pragma: no cover
    from moerge.adapters.expert import Expert

__all__ = ["ExpertRetriever", "RetrievalConfig", "expert_texts", "INDEX_SUBDIR", "GivenRetrievals", "GIVEN"]

INDEX_SUBDIR = "index"  # the index's folder under the library's routing folder
_QUERIES = ("description", "prompt", "both")
_EXPERT_VECTORS = ("centroid", "each")


@dataclass
class RetrievalConfig:
    """How experts are retrieved by text; mixed into the configs of routers that retrieve (GLIDER, Twin)."""

    query: str = field(default="prompt", metadata={
        "help": "what is embedded to query the index: the 'prompt', the LLM's 'description' of the task, or 'both'"})
    description_weight: float = field(default=0.5, metadata={
        "help": "with query='both': the query is (1-w)·prompt + w·description embedding"})
    describer: Any = field(default=None, metadata={
        "help": "None: the base model describes the task; a callable prompts → descriptions; or a TaskDescriber"})
    describe_tokens: int = field(default=32, metadata={"help": "most new tokens of a task description"})
    embedder: Any = field(default=None, metadata={
        "help": "None: all-MiniLM-L6-v2 (int8 weights, traced, on CPU); a SentenceTransformer, or an object with "
                "id, dim, encode()"})
    rebuild_index: bool = field(default=False, metadata={
        "help": "re-embed every expert when the library's index was made with another embedder (else: an error)"})
    expert_vectors: str = field(default="centroid", metadata={
        "help": "how an expert's texts enter the index: 'centroid' (one vector, the normalised mean of its "
                "description and example embeddings) or 'each' (one vector per text, scored by the best match)"})
    approx_threshold: int = field(default=50_000, metadata={
        "help": "above this many vectors the index is approximate (HNSW) instead of exact"})

    def _check_retrieval(self) -> None:
        if self.expert_vectors not in _EXPERT_VECTORS:
            raise ValueError(f"expert_vectors must be one of {_EXPERT_VECTORS}, got {self.expert_vectors!r}")
        if self.query not in _QUERIES:
            raise ValueError(f"query must be one of {_QUERIES}, got {self.query!r}")
        if not isinstance(self.description_weight, (int, float)) or not 0 <= self.description_weight <= 1:
            raise ValueError(f"description_weight must be in [0, 1], got {self.description_weight!r}")
        if not isinstance(self.describe_tokens, int) or self.describe_tokens <= 0:
            raise ValueError(f"describe_tokens must be a positive integer, got {self.describe_tokens!r}")

    def __post_init__(self) -> None:
        self._check_retrieval()


def expert_texts(expert_name: str, description: str, examples: list[str]) -> list[str]:
    """The texts an expert is retrieved by: its description (or its name, without one) and its example prompts."""
    return [description.strip() or expert_name.replace("_", " ")] + [e for e in examples if e.strip()]


class GivenRetrievals:
    """Rankings retrieved by another process for prompts, which this process's retrievers take instead of
    embedding and searching (see the module's docstring); the most recent ``size`` are kept.

    Only trusted code fills it (moerge on Ray Serve's model replica, with what its ingress retrieved): what it holds
    decides the candidates of every request with that prompt text.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.taken = 0  # rankings used instead of a search

    def __len__(self) -> int:
        return len(self._items)

    def give(self, fingerprint: str, prompt: str, names: list[str], scores: list[float]) -> dict[str, Any]:
        """Hand over the ranking of ``prompt`` (best first, without empty slots) made by a retriever whose
        :meth:`~ExpertRetriever.fingerprint` is ``fingerprint``; returns its entry (``entry["taken"]`` counts the
        times it was used)."""
        if len(names) != len(scores) or not all(isinstance(n, str) and n for n in names):
            raise ValueError("a given ranking needs one score per expert name")
        entry = {"names": tuple(names), "scores": np.asarray(scores, dtype=np.float32), "taken": 0}
        with self._lock:
            self._items[(fingerprint, prompt)] = entry
            self._items.move_to_end((fingerprint, prompt))
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return entry

    def take(self, fingerprint: str, prompt: str, k: int, experts: int) -> tuple[list[str], np.ndarray] | None:
        """The ``k`` best experts of ``prompt`` and their scores ``(k,)`` (padded with ``""`` and ``-inf``), when a
        ranking was handed over for it under ``fingerprint`` that is deep enough: ``k`` experts, or all
        ``experts`` the retriever holds; else ``None``."""
        with self._lock:
            entry = self._items.get((fingerprint, prompt))
            if entry is None or len(entry["names"]) < min(k, experts):
                return None
            entry["taken"] += 1
            self.taken += 1
        names = list(entry["names"][:k])
        scores = np.full((k,), -np.inf, dtype=np.float32)
        scores[: len(names)] = entry["scores"][: len(names)]
        return names + [""] * (k - len(names)), scores

    def clear(self) -> None:
        """Forget every ranking (and the count of those taken)."""
        with self._lock:
            self._items.clear()
            self.taken = 0


GIVEN = GivenRetrievals()
"""This process's handed-over rankings, which every :class:`ExpertRetriever` looks at before it searches."""


class ExpertRetriever:
    """The experts' texts, their FAISS index kept in step with the experts, and top-K retrieval for prompts.

    Args:
        config: the retrieval options (a :class:`RetrievalConfig`, or a router config that mixes it in).
        owner: the router's name, for error messages.

    The embedder and the describer are built on first use; the describer by default generates with the
    context's language model, and the index is kept in the context's store (see :meth:`attach`).
    """

    def __init__(self, config: RetrievalConfig | None = None, *, owner: str = "retrieval") -> None:
        self.config = config if config is not None else RetrievalConfig()
        self.owner = owner
        self.context = RouterContext()
        self.index: ExpertIndex | None = None
        self._embedder: Embedder | None = None
        self._describer: TaskDescriber | None = None
        self._texts: dict[str, tuple[list[str], str]] = {}  # expert -> (texts, key of the vectors made from them)
        self._dirty = False  # experts changed since the index was last brought up to date
        self._unsaved = False  # the index changed since it was last written to the store
        self._fresh: set[str] = set()  # experts embedded since the index was last written
        self._version = 0  # counts the changes to write, so a write under way does not hide a later one
        self._lock = threading.RLock()  # the index is brought up to date by routing and by persist, in any thread
        self._print: tuple[int, str | None] | None = None  # (_version, fingerprint) when last worked out

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles get a lock of their own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.RLock())

    def attach(self, context: RouterContext) -> None:
        """Use ``context``'s store for the index and its language model and tokenizer for the default describer."""
        self.context = context

    # --- parts, built on first use ------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        """The sentence embedder (``config.embedder``; by default all-MiniLM-L6-v2, int8, on CPU)."""
        if self._embedder is None:
            self._embedder = as_embedder(self.config.embedder)
        return self._embedder

    @property
    def describer(self) -> Callable[[list[str]], list[str]]:
        """The task describer (``config.describer``; by default the context's language model, greedy)."""
        if self._describer is None:
            d = self.config.describer
            if isinstance(d, TaskDescriber):
                self._describer = d
            elif d is not None:
                if not callable(d):
                    raise RoutingError(f"router {self.owner!r}: describer must be callable, got {d!r}")
                self._describer = TaskDescriber(d)
            else:
                if self.context.tokenizer is None or self.context.language_model is None:
                    raise RoutingError(f"router {self.owner!r} describes tasks with the base model, which needs a "
                                       "tokenizer: build the model with tokenizer=..., give describer=, or use "
                                       "query='prompt'")
                self._describer = TaskDescriber(self.context.language_model, self.context.tokenizer,
                                                max_new_tokens=self.config.describe_tokens)
        return self._describer

    # --- experts ------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The experts it retrieves."""
        with self._lock:
            return list(self._texts)

    def add(self, expert: Expert) -> None:
        """Retrieve ``expert`` by its description and examples from now on (it replaces an expert of that name);
        embedded when the index is next used."""
        texts = expert_texts(expert.name, expert.metadata.description, list(expert.metadata.examples))
        with self._lock:
            self._texts[expert.name] = (texts, "")  # keyed when the index is synced (the key needs the embedder id)
            self._dirty = True

    def remove(self, name: str) -> None:
        """Stop retrieving ``name`` (nothing happens for a name it does not hold)."""
        with self._lock:
            self._texts.pop(name, None)
            self._fresh.discard(name)
            if self.index is not None and name in self.index:
                self.index.remove(name)
            self._dirty = self._unsaved = True  # when the library no longer lists it, the stored index drops it
            self._version += 1

    def _key(self, texts: list[str]) -> str:
        return hashlib.sha256(json.dumps([self.embedder.id, self.config.expert_vectors, texts]).encode()).hexdigest()

    def _index_dir(self) -> Path | None:
        store = self.context.store
        return None if store is None else store.routing_dir / INDEX_SUBDIR

    def _load(self, emb: Embedder) -> ExpertIndex:
        """The store's index when it holds a usable one for ``emb``, else a new empty one.

        Raises :class:`LibraryError` when the store's index was made with another embedder, unless
        ``rebuild_index``; a damaged index is derived data and is made again (with a warning)."""
        folder, store = self._index_dir(), self.context.store
        recorded = store.embedder if store is not None else None
        other = bool(recorded) and (recorded.get("id"), recorded.get("dim")) != (emb.id, emb.dim)
        if other and not self.config.rebuild_index:
            raise LibraryError(
                f"the library's routing index was made with embedder {recorded.get('id')!r} "
                f"(dimension {recorded.get('dim')}), not {emb.id!r} (dimension {emb.dim}); use that embedder, "
                "or pass rebuild_index=True to re-embed every expert with this one", file=str(store.root))
        if folder is not None and (folder / "index.json").is_file():
            try:
                return ExpertIndex.load(folder, dim=emb.dim, embedder=emb.id)
            except IndexMismatchError as e:  # made with another embedder: only on request
                if not self.config.rebuild_index:
                    raise LibraryError(f"{e.problem}; pass rebuild_index=True to re-embed every expert",
                                       file=e.file) from None
                warnings.warn(f"{e}; re-embedding every expert (rebuild_index=True)", stacklevel=4)
            except (LibraryError, ExpertFormatError) as e:
                warnings.warn(f"{e}; the routing index is rebuilt by re-embedding every expert", stacklevel=4)
        self._unsaved = True
        return ExpertIndex(emb.dim, emb.id, approx_threshold=self.config.approx_threshold)

    def sync(self) -> ExpertIndex:
        """The index, brought up to date with the experts: loaded from the store on first use, then only the
        experts whose texts changed are embedded."""
        with self._lock:
            if self.index is not None and not self._dirty:
                return self.index
            return self._sync()

    def _sync(self) -> ExpertIndex:
        emb = self.embedder
        if self.index is None:
            self.index = self._load(emb)
        for name in [n for n in self.index.names if n not in self._texts]:  # on disk, unknown here
            self.index.remove(name)
        todo = []
        for name, (texts, _) in self._texts.items():
            key = self._key(texts)
            self._texts[name] = (texts, key)
            if self.index.key(name) != key:
                todo.append(name)
        if todo:
            vecs = emb.encode([t for n in todo for t in self._texts[n][0]])  # (sum of texts, dim)
            i = 0
            for n in todo:
                texts, key = self._texts[n]
                v = vecs[i : i + len(texts)]  # (texts, dim)
                if self.config.expert_vectors == "centroid":
                    v = v.mean(axis=0, keepdims=True)
                    v /= max(float(np.linalg.norm(v)), 1e-12)  # (1, dim)
                self.index.add(n, v, key=key)
                i += len(texts)
        self._dirty = False
        if todo:
            self._fresh.update(todo)
            self._unsaved = True
            self._version += 1
        return self.index

    def persist(self, store: Any) -> None:
        """Write the index to ``store``'s routing folder (when it changed since it was last written) and record
        the embedder there. The index on disk is merged, never overwritten from this retriever's view: see
        :meth:`_merged`."""
        if not self._texts and self.index is None:
            return
        with self._lock:
            self.sync()
            if not self._unsaved:
                return
            version = self._version
        with store.locked():  # no other writer meanwhile; the manifest re-read: the experts the library lists now
            store.save_index(self._merged(store))
        if store.embedder != {"id": self.embedder.id, "dim": self.embedder.dim}:
            store.set_embedder(self.embedder.id, self.embedder.dim)
        with self._lock:
            if self._version == version:  # nothing changed while it was written
                self._unsaved = False
                self._fresh.clear()

    def _merged(self, store: Any) -> ExpertIndex:
        """The index to write to ``store`` (under its lock): the one on disk, which other models and processes on
        the library write too, so experts this retriever does not know yet stay; the experts it embedded since it
        last wrote, and those it knows that the disk lacks, put in; experts the library no longer lists taken out.
        An index on disk made with another embedder, or damaged, is replaced by this retriever's."""
        emb, folder = self.embedder, store.routing_dir / INDEX_SUBDIR
        merged = None
        if (folder / "index.json").is_file():
            try:
                merged = ExpertIndex.load(folder, dim=emb.dim, embedder=emb.id)
            except (LibraryError, ExpertFormatError):
                merged = None
        with self._lock:
            index = self.index
            if merged is None:
                merged = ExpertIndex(emb.dim, emb.id, approx_threshold=self.config.approx_threshold)
            for name in index.names:
                if name in self._fresh or name not in merged:
                    merged.add(name, index.vectors(name), key=index.key(name))
        for name in [n for n in merged.names if n not in store]:
            merged.remove(name)
        return merged

    def fingerprint(self) -> str | None:
        """What this retriever's results depend on besides the prompt: the embedder and every expert's texts
        (their keys), as a hash; two retrievers with the same fingerprint rank a prompt alike. ``None`` when a
        ranking cannot be reproduced elsewhere from the prompt alone: queries that embed a task description
        (written by the model), or an approximate (HNSW) index, whose results depend on the order it was built in."""
        if self.config.query != "prompt":
            return None
        with self._lock:
            index = self.sync()
            if self._print is None or self._print[0] != self._version:
                h = hashlib.sha256(json.dumps([self.embedder.id, sorted((n, key) for n, (_, key)
                                                                         in self._texts.items())]).encode())
                self._print = (self._version, None if index.approximate else h.hexdigest())
            return self._print[1]

    def ranking(self, prompt: str, k: int) -> tuple[list[str], list[float], str | None]:
        """The ``k`` best experts of ``prompt`` (empty slots left out), their scores, and the :meth:`fingerprint`
        they were ranked under, taken together (another thread may change the experts meanwhile): what is handed
        to another process's retrievers (:meth:`GivenRetrievals.give`)."""
        q = self.query_vectors([prompt])
        with self._lock:
            names, scores = self.sync().search(q, k)
            fingerprint = self.fingerprint()
        kept = [(n, float(s)) for n, s in zip(names[0], scores[0]) if n]
        return [n for n, _ in kept], [s for _, s in kept], fingerprint

    def _given(self, prompts: list[str], k: int) -> list[tuple[list[str], np.ndarray] | None]:
        """Per prompt, the ranking handed over for it (:data:`GIVEN`) that this retriever can take, or ``None``."""
        if not len(GIVEN):
            return [None] * len(prompts)
        fingerprint = self.fingerprint()
        if fingerprint is None:
            return [None] * len(prompts)
        experts = len(self._texts)
        return [GIVEN.take(fingerprint, p, k, experts) for p in prompts]

    # --- queries --------------------------------------------------------------------------------------------------
    def query_vectors(self, prompts: list[str]) -> np.ndarray:
        """The ``(B, dim)`` unit query vectors of ``prompts`` (per ``config.query``)."""
        emb = self.embedder
        w = {"prompt": 0.0, "description": 1.0, "both": float(self.config.description_weight)}[self.config.query]
        q = np.zeros((len(prompts), emb.dim), dtype=np.float32)
        if w > 0:
            q += w * emb.encode(self.describer(prompts))
        if w < 1:
            q += (1 - w) * emb.encode(prompts)
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)

    def retrieve(self, prompts: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` best experts per prompt and their cosine scores ``(B, k)`` (rows padded with ``""`` and
        ``-inf`` when there are fewer than ``k`` experts). A prompt whose ranking was handed over (:data:`GIVEN`)
        is neither embedded nor searched."""
        given = self._given(prompts, k)
        todo = [i for i, g in enumerate(given) if g is None]
        if todo:
            q = self.query_vectors([prompts[i] for i in todo])
            with self._lock:  # not searched while persist brings it up to date in another thread
                names, scores = self.sync().search(q, k)
            if len(todo) == len(prompts):
                return names, scores
            for j, i in enumerate(todo):
                given[i] = (names[j], scores[j])
        return [g[0] for g in given], np.stack([g[1] for g in given]).astype(np.float32, copy=False)
