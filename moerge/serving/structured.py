"""``response_format`` through constrained decoding, with xgrammar.

xgrammar (used by vLLM, SGLang and TensorRT-LLM as their default structured-output backend) compiles a JSON schema,
or its built-in JSON grammar for ``json_object``, against the tokenizer's vocabulary once per request, and then, at
every step, fills a bitmask of the tokens that keep the text valid in microseconds; it is maintained, ships wheels for
CPU and CUDA, and needs no per-token Python search over the vocabulary (outlines builds an index per schema up front;
lm-format-enforcer walks the vocabulary's prefix tree in Python at each step). Each row gets its own matcher
(:class:`Constraint`); ``json_object`` is the schema of any object. The row's logits outside the mask are set to ``-inf`` before sampling, and once the grammar is
complete only an end token is allowed, so the row ends there (``finish_reason: "stop"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["Constraint", "Grammars"]


class Constraint:
    """One row's matcher: masks the tokens the grammar does not allow next, and follows the tokens chosen."""

    def __init__(self, compiled: Any, vocab: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)
        self.vocab = vocab

    def mask(self, logits: torch.Tensor) -> None:
        """Set the ``(V,)`` logits of the tokens the grammar does not allow now to ``-inf`` (in place)."""
        if self.matcher.fill_next_token_bitmask(self.bitmask):
            self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), self.bitmask.to(logits.device),
                                                  vocab_size=self.vocab)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


class Grammars:
    """Compiles requests' ``response_format`` for one tokenizer (``vocab``: the model's logits' size; ``ends``:
    the ids that end a completion)."""

    def __init__(self, tokenizer: Any, vocab: int, ends: Iterable[int]) -> None:
        import xgrammar as xgr

        self.vocab = vocab
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=sorted(ends))
        self.compiler = xgr.GrammarCompiler(info)

    def constraint(self, response_format: dict[str, Any] | None) -> Callable[[], Constraint] | None:
        """A factory of row constraints for ``response_format`` (``None`` for plain text). Raises ``ValueError``
        naming what is wrong with a schema xgrammar cannot compile."""
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":  # OpenAI's: a JSON object (the built-in JSON grammar would allow any value)
            spec: dict[str, Any] = {"schema": {"type": "object"}, "strict": False}
        else:
            spec = response_format["json_schema"]
        try:
            compiled = self.compiler.compile_json_schema(json.dumps(spec.get("schema") or {}), any_whitespace=False,
                                                         strict_mode=bool(spec.get("strict", True)))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"the JSON schema cannot be used: {e}") from None
        return lambda: Constraint(compiled, self.vocab)
