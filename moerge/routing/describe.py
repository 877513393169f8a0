"""Task descriptions for the global router (GLIDER): an LLM writes, for each prompt, a short description of the
task it asks for; the router embeds the description and retrieves the experts whose descriptions match.

:class:`TaskDescriber` uses a causal LM through its chat template (default: the base model itself, with no expert
applied), greedy, at most ``max_new_tokens`` new tokens, batched with left padding. Any ``prompts -> descriptions``
callable can stand in for it (another model, an API). Descriptions are cached by the sha256 of the prompt, in
memory (LRU) and optionally in a JSON file, so a prompt is described once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moerge.core.safe_io import atomic_write_json

__all__ = ["TaskDescriber", "DescriptionCache", "DESCRIBE_INSTRUCTION"]

DESCRIBE_INSTRUCTION = (
    "Describe in one short sentence the task that the following request asks for. Say what kind of task it is "
    "(for example: translation, sorting, arithmetic, formatting); do not solve it.\n\nRequest:\n{prompt}"
)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class DescriptionCache:
    """prompt sha256 → description, least recently used first out; saved to ``path`` (JSON) when given."""

    def __init__(self, max_size: int = 100_000, path: str | Path | None = None) -> None:
        self.max_size = max_size
        self.path = Path(path) if path is not None else None
        self._data: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._data.update((str(k), str(v)) for k, v in dict(data.get("descriptions", {})).items())
            except (OSError, ValueError, AttributeError):
                self._data.clear()  # an unreadable cache is only a cache: start empty

    def get(self, prompt: str) -> str | None:
        h = prompt_hash(prompt)
        with self._lock:
            if h in self._data:
                self._data.move_to_end(h)
                self.hits += 1
                return self._data[h]
            self.misses += 1
            return None

    def put(self, prompt: str, description: str) -> None:
        with self._lock:
            self._data[prompt_hash(prompt)] = description
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)

    def save(self) -> None:
        if self.path is not None:
            with self._lock:
                atomic_write_json(self.path, {"format": "moerge-descriptions", "descriptions": dict(self._data)})

    def __len__(self) -> int:
        return len(self._data)


class TaskDescriber:
    """Describe each prompt's task with a causal LM (or any callable), cached by prompt hash.

    Args:
        model: a causal LM with ``generate``; or a callable ``list[str] -> list[str]`` (then ``tokenizer`` is
            not needed).
        tokenizer: the LM's tokenizer (with a chat template, or plain text is used).
        max_new_tokens: the description's length limit.
        instruction: the request sent to the LM; ``{prompt}`` is replaced by the user's prompt.
        batch_size: prompts described per ``generate`` call.
        cache: a :class:`DescriptionCache` (default: a fresh in-memory one).
        max_prompt_chars: longer prompts are cut to their first and last halves of this size before describing.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, max_new_tokens: int = 32,
                 instruction: str = DESCRIBE_INSTRUCTION, batch_size: int = 32,
                 cache: DescriptionCache | None = None, max_prompt_chars: int = 2000) -> None:
        if "{prompt}" not in instruction:
            raise ValueError(f"instruction must contain '{{prompt}}', got {instruction!r}")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.is_lm = hasattr(model, "generate") and not isinstance(model, type)
        if self.is_lm and tokenizer is None:
            raise ValueError("a tokenizer is needed to describe prompts with a language model")
        if not self.is_lm and not callable(model):
            raise TypeError(f"model must be a causal LM or a callable prompts -> descriptions, got {model!r}")
        self.max_new_tokens, self.instruction, self.batch_size = max_new_tokens, instruction, batch_size
        self.cache = cache if cache is not None else DescriptionCache()
        self.max_prompt_chars = max_prompt_chars
        self.calls = 0  # prompts actually described (cache misses)

    def _request(self, prompt: str) -> str:
        if len(prompt) > self.max_prompt_chars:
            half = self.max_prompt_chars // 2
            prompt = prompt[:half] + " … " + prompt[-half:]
        text = self.instruction.replace("{prompt}", prompt)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return text + "\nTask:"

    def _generate(self, prompts: list[str]) -> list[str]:
        from moerge.routing.training import greedy_generate

        texts = greedy_generate(self.model, self.tokenizer, [self._request(p) for p in prompts], self.max_new_tokens)
        return [" ".join(t.split()) for t in texts]

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        """One description per prompt (cached ones are not recomputed)."""
        prompts = list(prompts)
        out: list[str | None] = [self.cache.get(p) for p in prompts]
        todo = sorted({p for p, d in zip(prompts, out) if d is None})
        new: dict[str, str] = {}
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            got = self._generate(chunk) if self.is_lm else [str(d) for d in self.model(chunk)]
            if len(got) != len(chunk):
                raise ValueError(f"the describer returned {len(got)} descriptions for {len(chunk)} prompts")
            self.calls += len(chunk)
            for p, d in zip(chunk, got):
                self.cache.put(p, d)
                new[p] = d
        return [d if d is not None else new[p] for p, d in zip(prompts, out)]

    @classmethod
    def from_callable(cls, fn: Callable[[list[str]], list[str]], **kwargs: Any) -> TaskDescriber:
        return cls(fn, **kwargs)
