"""Continuous batching: rows that join a running batch at the next decode step and leave it when they are done.

:class:`DecodeBatch` holds the rows being generated, one KV cache for all of them (transformers' ``DynamicCache``,
left-padded: each row's tokens end at the last column, and an attention mask hides the padding), and a
:class:`~moerge.runtime.joined.JoinedState` that gives every row its own call's routing. Requests are routed and
prefilled when they join (:meth:`DecodeBatch.prefill`; several prompts share one forward), their first token is
chosen from the prefill's logits, and their cache rows are padded into the batch's (:meth:`DecodeBatch.join`);
:meth:`DecodeBatch.step` runs one decode step for every row and :meth:`DecodeBatch.leave` drops the rows that are
done (their cache rows freed, and columns no row needs any more cut off). Each row's tokens are chosen by its own
:class:`~moerge.runtime.sampling.RowSampler`. The batch is driven by one thread (the server's engine).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moerge.routing import RoutingState
from moerge.runtime.joined import JoinedState
from moerge.runtime.sampling import Pick, RowSampler, Sampling, top_of

__all__ = ["DecodeBatch", "Prefilled", "Prompt", "Row", "cache_joinable"]


@dataclass
class Prompt:
    """A request's prompt to prefill: its token ids, its routing (``experts``: a forced mix, ``exclude``), its
    sampling, how many rows (samples) it becomes, and whether its prompt's log-probabilities are wanted (``echo``).
    ``owner`` is the caller's (the server's job), carried to each of its rows."""

    ids: list[int]
    sampling: Sampling
    max_new: int
    n: int = 1
    experts: dict[str, float] | None = None
    exclude: tuple[str, ...] = ()
    echo: bool = False
    owner: Any = None
    constraint: Callable[[], Any] | None = None  # makes each row's constraint (``mask(logits)``, ``accept(id)``)


@dataclass
class Row:
    """One row being generated: its request, its sample ``index``, its sampler and the tokens chosen so far (with
    their picks, for log-probabilities)."""

    prompt: Prompt
    index: int
    sampler: RowSampler
    state: RoutingState  # its call's routing (its trace is the request's routing)
    picks: list[Pick] = field(default_factory=list)
    prompt_logprobs: list[Pick | None] | None = None  # echo: per prompt token (the first has none)
    done: bool = False
    error: BaseException | None = None  # why its token could not be chosen (it is done; the others go on)
    constraint: Any = None  # what the row's text must follow (structured output), made by its prompt's factory

    def pick(self, logits: torch.Tensor, pad_id: int) -> None:
        """Choose the row's next token from its ``(V,)`` logits; a failure ends this row alone."""
        try:
            c = self.constraint
            self.picks.append(self.sampler(logits, None if c is None else c.mask))
            if c is not None:
                c.accept(self.picks[-1].token)
        except Exception as e:  # noqa: BLE001 - one row's sampling failure is its request's, not the batch's
            self.error, self.done = e, True
            self.picks.append(Pick(pad_id, None, None))

    @property
    def tokens(self) -> list[int]:
        return [p.token for p in self.picks]

    @property
    def budget_left(self) -> int:
        return self.prompt.max_new - len(self.picks)


@dataclass
class Prefilled:
    """Prefilled rows, with their KV cache and attention mask (row ``i`` of each is ``rows[i]``)."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor


def cache_joinable(cache: Any) -> bool:
    """Whether rows of ``cache`` can be padded into another batch's: every layer a plain ``DynamicLayer`` (no
    sliding window or static buffer, whose columns do not line up with the tokens)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """The rows being generated together (see the module's docstring) on ``model`` (a :class:`MoErgeModel`);
    ``pad_id`` fills the left of shorter prompts, ``vocab`` (the tokenizer's size) bounds the ids chosen."""

    def __init__(self, model: Any, pad_id: int, vocab: int | None = None) -> None:
        self.model, self.pad_id, self.vocab = model, pad_id, vocab
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 where the cache holds a token of the row
        self.next_ids: torch.Tensor | None = None  # (B,) each row's last token, the next step's input
        self._joined: JoinedState | None = None
        params = inspect.signature(model.base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def open(self) -> bool:
        """Whether rows may join now: the batch is empty, or its cache's rows can be padded (:func:`cache_joinable`)."""
        return not self.rows or cache_joinable(self.cache)

    # --- joining ----------------------------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Prompt]) -> Prefilled:
        """Route each prompt on its own and run their prompts as one left-padded forward (each with its routing):
        their rows (``n`` per prompt, their first token chosen) with their KV cache and attention mask, for
        :meth:`join`. Raises what routing raises (a forced mix naming no expert, a prompt over the context…)."""
        states = []
        for p in prompts:
            ids = torch.tensor([p.ids], device=self.device)
            states.append(self.model.route(ids, torch.ones_like(ids), experts=p.experts,
                                           exclude=p.exclude or None, new_tokens=p.max_new))
        width = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p.ids):] = torch.tensor(p.ids, device=self.device)
            mask[i, width - len(p.ids):] = 1
        from transformers import DynamicCache

        cache = DynamicCache()
        joined = JoinedState([(s, 1) for s in states], lengths=[len(p.ids) for p in prompts])
        echo = any(p.echo for p in prompts)
        with torch.no_grad(), self.model.context.activate(joined):
            out = self.model.base(input_ids=ids, attention_mask=mask, position_ids=self._positions(mask),
                                  use_cache=True, logits_to_keep=0 if echo else 1, **{self._cache_kw: cache})
        joined.settle()
        logits = out.logits.float()  # (P, width or 1, V)
        rows: list[Row] = []
        keep: list[int] = []
        for i, p in enumerate(prompts):
            echoed = self._prompt_logprobs(p, logits[i, width - len(p.ids):]) if p.echo else None
            for j in range(p.n):
                row = Row(p, j, RowSampler(p.sampling, self.device, j, self.vocab), states[i], prompt_logprobs=echoed,
                          constraint=None if p.constraint is None else p.constraint())
                if p.max_new > 0:
                    row.pick(logits[i, -1], self.pad_id)
                else:
                    row.done = True
                rows.append(row)
                keep.append(i)
        if len(keep) != len(prompts):  # n samples: the prompt's cache row repeated
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            mask = mask.index_select(0, index)
        return Prefilled(rows, cache, mask)

    @staticmethod
    def _prompt_logprobs(p: Prompt, logits: torch.Tensor) -> list[Pick | None]:
        """Each prompt token's log-probability given the tokens before it (``None`` for the first)."""
        lp = F.log_softmax(logits[:-1], dim=-1)  # (T-1, V): position t predicts token t + 1
        k = p.sampling.top_logprobs or 0
        out: list[Pick | None] = [None]
        for t, token in enumerate(p.ids[1:]):
            out.append(Pick(token, float(lp[t, token]), top_of(lp[t], k)))
        return out

    def join(self, prefilled: Prefilled) -> None:
        """Add the prefilled rows not already done (finished by their first token, cancelled, or ``max_new == 0``)
        to the batch: their cache rows left-padded to the batch's columns (or the batch's to theirs)."""
        live = [i for i, r in enumerate(prefilled.rows) if not r.done]
        if not live:
            return
        rows, cache, mask = [prefilled.rows[i] for i in live], prefilled.cache, prefilled.mask
        if len(live) != len(prefilled.rows):
            index = torch.tensor(live, device=self.device)
            cache.batch_select_indices(index)
            mask = mask.index_select(0, index)
        if not self.rows:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
                mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
            self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.rows.extend(rows)
        last = torch.tensor([r.picks[-1].token for r in rows], device=self.device)
        self.next_ids = last if self.next_ids is None else torch.cat([self.next_ids, last])
        self._rejoin()

    def _rejoin(self) -> None:
        if self._joined is not None:
            self._joined.settle()
        parts: list[list] = []  # a request's rows (its samples) are side by side: one part, its tokens counted once
        for r in self.rows:
            if parts and parts[-1][0] is r.state:
                parts[-1][1] += 1
            else:
                parts.append([r.state, 1])
        self._joined = JoinedState([(s, n) for s, n in parts]) if parts else None

    # --- stepping ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        pos = mask.long().cumsum(-1) - 1
        return pos.masked_fill_(mask == 0, 1)

    def step(self) -> list[Row]:
        """One decode step for every row: each gets its next token. Returns the rows."""
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        position = (mask.sum(1, keepdim=True) - 1).long()
        with torch.no_grad(), self.model.context.activate(self._joined):
            out = self.model.base(input_ids=self.next_ids.unsqueeze(1), attention_mask=mask, position_ids=position,
                                  use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache})
        self.mask = mask
        logits = out.logits[:, -1].float()
        for i, row in enumerate(self.rows):
            row.pick(logits[i], self.pad_id)
        self.next_ids = torch.tensor([r.picks[-1].token for r in self.rows], device=self.device)
        return self.rows

    def leave(self, done: Sequence[Row]) -> None:
        """Drop ``done`` rows from the batch (their routing's recorded weights handed back first), and cut the
        columns no remaining row uses."""
        if not done:
            return
        gone = {id(r) for r in done}
        if self._joined is not None:
            self._joined.settle()
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.rows = [self.rows[i] for i in keep]
        self._joined = None
        if not self.rows:
            self.cache = self.mask = self.next_ids = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask.index_select(0, index)
        self.next_ids = self.next_ids.index_select(0, index)
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = self.mask[:, first:]
        self._rejoin()
