"""How the next token of one row is chosen: OpenAI's sampling fields, applied per row.

Each row of a batch has its own :class:`RowSampler`: its temperature and nucleus, its penalties (presence and
frequency, over the tokens it generated), its logit bias and its own random generator, seeded from the request's
``seed`` — so a seeded row draws the same tokens whatever else runs in the batch, streamed or not, and no other
code's use of torch's global generator changes it. Log-probabilities are those of the model's distribution
(``log_softmax`` of its logits, before temperature, penalties and bias), as vLLM reports them by default.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = ["Pick", "RowSampler", "Sampling"]


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings (OpenAI's fields). ``temperature == 0`` is greedy; ``top_logprobs``: ``None``
    for no log-probabilities, else how many alternatives to report with each token's own (0: none)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    top_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it (below 1e-5, as vLLM) that dividing by it would overflow."""
        return self.temperature < 1e-5


class Pick(NamedTuple):
    """The token chosen for a row, its log-probability, and the most likely alternatives (``(id, logprob)``)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def _seed(seed: int | None, index: int) -> int:
    """The generator seed of sample ``index`` of a request seeded with ``seed`` (random without one)."""
    if seed is None:
        return secrets.randbits(63)
    return seed % (1 << 63) if index == 0 else hash((seed, index)) % (1 << 63)


def top_of(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of a ``(V,)`` log-probability vector, most likely first."""
    if k <= 0:
        return []
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))


class RowSampler:
    """Chooses one row's tokens (see the module's docstring); ``index``: the sample's number within its request
    (``n > 1``), which gives each sample its own seeded draws; ``vocab``: ids at or above it are never chosen (a
    model's embedding is often padded past its tokenizer's vocabulary, and those ids have no text)."""

    def __init__(self, sampling: Sampling, device: torch.device | str = "cpu", index: int = 0,
                 vocab: int | None = None) -> None:
        self.sampling, self.vocab = sampling, vocab
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(_seed(sampling.seed, index))
        self._counts: torch.Tensor | None = None  # (V,) how often the row generated each token (penalties)
        self._bias: torch.Tensor | None = None

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        if s.logit_bias:
            if self._bias is None:
                self._bias = torch.zeros_like(logits)
                ids = torch.tensor(list(s.logit_bias), device=logits.device)
                self._bias[ids] = torch.tensor(list(s.logit_bias.values()), device=logits.device,
                                               dtype=logits.dtype)
            logits = logits + self._bias
        if self._counts is not None:
            logits = logits - s.frequency_penalty * self._counts - s.presence_penalty * (self._counts > 0)
        return logits

    def __call__(self, logits: torch.Tensor, mask: Callable[[torch.Tensor], None] | None = None) -> Pick:
        """The next token from the row's ``(V,)`` float32 logits; ``mask``, when given, sets the logits of the
        tokens a constraint does not allow to ``-inf`` (in place, on a copy)."""
        s = self.sampling
        z = self._adjusted(logits)
        if (self.vocab is not None and self.vocab < z.shape[-1]) or mask is not None:
            z = z.clone() if z is logits else z
        if self.vocab is not None and self.vocab < z.shape[-1]:
            z[self.vocab:] = float("-inf")
        if mask is not None:
            mask(z)
        if s.greedy:
            token = int(z.argmax())
        else:
            probs = torch.softmax(z / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p >= s.top_p  # the fewest tokens reaching top_p stay
                drop[0] = False  # the likeliest always (a top_p below float32's smallest number rounds to 0)
                probs = probs.scatter(0, order[drop], 0.0)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self._count(token, logits)
        if s.top_logprobs is None:
            return Pick(token, None, None)
        lp = torch.log_softmax(logits, dim=-1)
        return Pick(token, float(lp[token]), top_of(lp, s.top_logprobs))

    def _count(self, token: int, logits: torch.Tensor) -> None:
        s = self.sampling
        if not (s.presence_penalty or s.frequency_penalty):
            return
        if self._counts is None:
            self._counts = torch.zeros_like(logits)
        self._counts[token] += 1
