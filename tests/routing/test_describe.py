"""TaskDescriber: cached by prompt hash (memory and file), pluggable callable, LM through its chat template."""

from __future__ import annotations

import pytest

from moerge.routing.describe import DescriptionCache, TaskDescriber

from helpers import tiny_chat_llama, tiny_tokenizer


def test_callable_describer_is_cached_by_prompt():
    seen = []

    def fn(prompts):
        seen.extend(prompts)
        return [f"task of {p}" for p in prompts]

    d = TaskDescriber(fn)
    assert d(["a", "b", "a"]) == ["task of a", "task of b", "task of a"]
    assert sorted(seen) == ["a", "b"]  # "a" described once
    assert d(["b", "c"]) == ["task of b", "task of c"]
    assert sorted(seen) == ["a", "b", "c"] and d.calls == 3 and d.cache.hits == 1


def test_cache_file_roundtrip_and_lru(tmp_path):
    c = DescriptionCache(max_size=2, path=tmp_path / "d.json")
    c.put("x", "1")
    c.put("y", "2")
    c.get("x")  # x is now the most recent
    c.put("z", "3")  # evicts y
    assert c.get("y") is None and c.get("x") == "1"
    c.save()
    again = DescriptionCache(path=tmp_path / "d.json")
    assert again.get("x") == "1" and again.get("z") == "3" and len(again) == 2
    (tmp_path / "d.json").write_text("{not json")
    assert len(DescriptionCache(path=tmp_path / "d.json")) == 0  # an unreadable cache starts empty


def test_describer_refuses_bad_output_and_config():
    with pytest.raises(ValueError, match="2 descriptions for 1"):
        TaskDescriber(lambda ps: ["x", "y"])(["p"])
    with pytest.raises(ValueError, match="{prompt}"):
        TaskDescriber(lambda ps: ps, instruction="no placeholder")
    with pytest.raises(ValueError, match="tokenizer"):
        TaskDescriber(tiny_chat_llama())


def test_lm_describer_generates_at_most_max_new_tokens():
    tok = tiny_tokenizer()
    lm = tiny_chat_llama()
    d = TaskDescriber(lm, tok, max_new_tokens=5)
    out = d(["reverse these words", "add 2 and 3", "reverse these words"])
    assert len(out) == 3 and out[0] == out[2] and d.calls == 2
    for text in out:
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 5
    assert tok.padding_side == "left"  # restored
    # deterministic (greedy) and independent of the batch it came in
    assert TaskDescriber(lm, tok, max_new_tokens=5)(["add 2 and 3"]) == [out[1]]
