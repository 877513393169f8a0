"""The zoo trainer (on a tiny model) and the committed zoo (on the real base)."""

from __future__ import annotations

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.lab.zoo import DEFAULT_ZOO, ZooConfig, build_zoo, encode_example

from conftest import tiny_llama


@pytest.fixture(scope="module")
def tok():
    from moerge.lab.defaults import default_tokenizer

    return default_tokenizer()


def test_labels_score_only_the_answer(tok):
    from moerge.lab.tasks import get_task

    ex = get_task("uppercase").examples(1, "train")[0]
    ids, labels = encode_example(tok, ex)
    answer = [t for t in labels if t != -100]
    assert len(ids) == len(labels) and labels[0] == -100
    assert tok.decode(answer) == ex.target + "<|im_end|>\n"


def test_build_trains_stores_and_resumes(tmp_path, tok):
    base = tiny_llama(0, vocab_size=len(tok))
    cfg = ZooConfig(rank=2, alpha=4, steps=3, batch_size=4, lr=1e-2, target_modules=["q_proj", "v_proj"])
    logs: list[str] = []
    lib = build_zoo(tmp_path / "zoo", ["uppercase", "plural"], cfg, base=base, tokenizer=tok, progress=False,
                    log=logs.append)
    assert lib.names() == ["uppercase", "plural"]
    e = lib["plural"]
    assert e.description == "Give the plural form of an English noun."
    assert len(e.metadata.examples) == 5 and all("\n\n" in x for x in e.metadata.examples)
    assert e.metadata.source["train"]["steps"] == 3 and e.metadata.source["task"] == "plural"
    assert set(e.ranks.values()) == {2} and next(iter(e.modules.values())).A.dtype == torch.bfloat16
    assert not list(tmp_path.glob(".adapter-*"))  # the temporary PEFT folder is gone
    logs.clear()
    build_zoo(tmp_path / "zoo", ["uppercase", "plural", "acronym"], cfg, base=base, tokenizer=tok, progress=False,
              log=logs.append)
    assert "training 1: ['acronym']" in logs[0]


@pytest.mark.parametrize("kwargs,match", [({"rank": 0}, "positive"), ({"dtype": "int8"}, "dtype")])
def test_zoo_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZooConfig(**kwargs)


@pytest.mark.slow
def test_committed_zoo_is_complete_and_small():
    from moerge.lab.tasks import HELD_IN

    lib = ExpertLibrary.open(DEFAULT_ZOO)
    assert lib.names() == HELD_IN and lib.verify() == []
    size = sum(p.stat().st_size for p in DEFAULT_ZOO.rglob("*") if p.is_file())
    assert size <= 40 * 2**20, f"zoo is {size / 2**20:.1f} MiB"


@pytest.mark.slow
def test_zoo_experts_beat_the_base_on_their_task(tok):
    from moerge.lab.defaults import default_base
    from moerge.lab.eval import evaluate

    base, _ = default_base()
    model = MoErgeModel.from_library(base, DEFAULT_ZOO, tokenizer=tok)
    res = evaluate(model, tok, ["base", "oracle"], ["reverse_words", "date_format"], limit=8, progress=False)
    for task in ("reverse_words", "date_format"):
        assert res.scores["oracle"][task] >= res.scores["base"][task] + 0.5, res.scores
