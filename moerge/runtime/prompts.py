"""Reading a batch's prompts: each row as text for the routers, and the checks every prompt must pass."""

from __future__ import annotations

from typing import Any

import torch

from moerge.errors import RoutingError

__all__ = ["PromptReader"]


class PromptReader:
    """Decodes each row's prompt for the routers and refuses prompts the model cannot take.

    Args:
        tokenizer: the base's tokenizer, or ``None`` (then routers get no text).
        context_length: the base's context in tokens, or ``None`` when its config gives none.
    """

    def __init__(self, tokenizer: Any, context_length: int | None) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self._markers: tuple[str, str] | None | bool = False  # False: not looked up yet

    def chat_markers(self) -> tuple[str, str] | None:
        """The text that opens and closes a user turn in the tokenizer's chat template (``None`` without one)."""
        if self._markers is False:
            markers = None
            tok = self.tokenizer
            if getattr(tok, "chat_template", None):
                try:
                    s = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                                add_generation_prompt=True)
                    pre, post = s.split("\x00", 1)
                    i = pre.rfind("user")
                    opener = pre[pre.rfind("\n", 0, i) + 1 :] if i >= 0 else ""
                    closer = post.split("\n", 1)[0] if "\n" in post else post
                    if opener and closer:
                        markers = (opener, closer)
                except Exception:  # noqa: BLE001 - a template that cannot render: use the whole text
                    markers = None
            self._markers = markers
        return self._markers

    def texts(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> list[str] | None:
        """Each row's prompt as text: the last user message when the tokenizer has a chat template and the prompt
        follows it, else the whole decoded prompt; ``None`` without a tokenizer or token ids."""
        if self.tokenizer is None or input_ids is None:
            return None
        markers = self.chat_markers()
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            text = None
            if markers is not None:
                raw = self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
                start = raw.rfind(markers[0])
                if start >= 0:
                    body = raw[start + len(markers[0]) :]
                    end = body.find(markers[1])
                    text = (body[:end] if end >= 0 else body).strip()
            if text is None:
                text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            rows.append(text)
        return rows

    def check(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, new_tokens: int = 0) -> None:
        """Refuse an empty prompt (no tokens, or a row of padding only) and one that does not fit the context."""
        if input_ids is None:
            return
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise RoutingError(f"the prompt is empty (input_ids of shape {tuple(input_ids.shape)})")
        if attention_mask is not None:
            lengths = attention_mask.reshape(input_ids.shape[0], -1).sum(-1).tolist()
            empty = [b for b, n in enumerate(lengths) if n == 0]
            if empty:
                raise RoutingError(f"row {empty[0]}: the prompt is empty (only padding)")
        ctx = self.context_length
        if ctx is not None and input_ids.shape[1] + new_tokens > ctx:
            what = f"the prompt has {input_ids.shape[1]} tokens" + (f" and {new_tokens} are to be generated"
                                                                  if new_tokens else "")
            raise RoutingError(f"{what}: longer than the model's context of {ctx} tokens")
