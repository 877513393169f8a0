"""The zoo trainer (on a tiny model) and the committed zoo (on the real base)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.lab.zoo import (
    DEFAULT_ZOO,
    EXAMPLES_PER_EXPERT,
    ZooConfig,
    build_zoo,
    encode_example,
    train_expert,
)
from moerge.routing.training import fit

from helpers import tiny_llama


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
    assert tok.decode(answer) == ex.target + "<|im_end|>"  # generation stops at the end-of-turn token
    assert tok.decode(ids[-1:]) == "\n" and labels[-1] == -100  # the template's newline after it: context only
    from moerge.routing.training import answer_positions, collate

    b = collate(tok, [(ex.prompt, ex.target), ("hi", "x")])
    writes = answer_positions(b["labels"])  # the tokens whose next token is the answer's
    for r, lab_r in enumerate(b["labels"]):
        first = int((lab_r != -100).nonzero()[0])
        last = int((lab_r != -100).nonzero()[-1])
        assert writes[r].nonzero().flatten().tolist() == list(range(first - 1, last))  # last prompt token on


def test_build_trains_stores_and_resumes(tmp_path, tok):
    base = tiny_llama(0, vocab_size=len(tok))
    cfg = ZooConfig(rank=2, alpha=4, steps=3, batch_size=4, lr=1e-2, target_modules=["q_proj", "v_proj"])
    logs: list[str] = []
    lib = build_zoo(tmp_path / "zoo", ["uppercase", "plural"], cfg, base=base, tokenizer=tok, progress=False,
                    log=logs.append)
    assert lib.names() == ["uppercase", "plural"]
    e = lib["plural"]
    assert e.description == "Give the plural form of an English noun."
    assert len(e.metadata.examples) == EXAMPLES_PER_EXPERT
    from moerge.lab.tasks import routing_examples

    assert e.metadata.examples == [x.prompt for x in routing_examples("plural", EXAMPLES_PER_EXPERT, 99)]
    assert e.metadata.source["train"]["steps"] == 3 and e.metadata.source["task"] == "plural"
    assert set(e.ranks.values()) == {2} and next(iter(e.modules.values())).A.dtype == torch.bfloat16
    assert not list(tmp_path.glob(".adapter-*"))  # the temporary PEFT folder is gone
    logs.clear()
    build_zoo(tmp_path / "zoo", ["uppercase", "plural", "acronym"], cfg, base=base, tokenizer=tok, progress=False,
              log=logs.append)
    assert "training 1: ['acronym']" in logs[0]


def test_expert_training_is_reproducible_and_gives_back_the_random_state(tok):
    base = tiny_llama(0, vocab_size=len(tok))
    cfg = ZooConfig(rank=2, alpha=4, steps=3, batch_size=2, lr=1e-2, target_modules=["q_proj"])
    before = [p.clone() for p in base.parameters()]
    rng = torch.random.get_rng_state()
    (m1, l1), (m2, l2) = (train_expert(base, tok, "plural", cfg, progress=False) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert len(l1) == 3 and l1 == l2
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert any(p.abs().sum() > 0 for n, p in m1.named_parameters() if "lora_B" in n)  # B starts at 0: trained
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), before))


class _Quadratic(torch.nn.Module):
    """``loss = (w·c − x)²``: ``w`` is trained, ``c`` is a parameter ``fit`` must leave frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.c = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=((self.w * self.c - x) ** 2).mean())


@pytest.mark.parametrize("warmup,first_lr", [(None, 0.3), (3, 0.1)])
def test_fit_trains_only_the_given_tensors_on_its_schedule(warmup, first_lr):
    model = _Quadratic().train()
    # one batch: Adam's first step moves w by the learning rate of step 0 (warm-up: a third of lr, cosine at 1)
    losses = fit(model, [model.w], [{"x": torch.ones(1)}], steps=10, lr=0.3, warmup=warmup, progress=False)
    assert losses == [1.0]
    assert float(model.w) == pytest.approx(first_lr, rel=1e-4)
    assert float(model.c) == 1.0 and model.c.requires_grad and model.training  # frozen, flags and mode restored
    losses = fit(model, [model.w], ({"x": torch.ones(1)} for _ in range(100)), steps=60, lr=0.05, warmup=warmup,
                 progress=False)
    assert len(losses) == 60 and losses[-1] < losses[0] / 100 and float(model.c) == 1.0


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
    kinds = {k for name in lib.names() for k in lib.routing_kinds(name)}
    # what the tables compare, so they are made again without training anything: the three LDA kinds (LDA alone's,
    # GLIDER's and lda_prompt's), PHATGOOSE's gates with and without negatives, X-LoRA's rows
    assert {"lda-r8", "lda-r8-all", "lda-r8-base-all", "phatgoose", "phatgoose-contrast", "xlora"} <= kinds
    assert all(set(lib.routing_kinds(name)) == kinds for name in lib.names())
    # 12 experts (28.5 MiB), their routing data (20.5 MiB for each LDA kind, 11 for the rest), the index: 101.8 MiB
    assert size <= 112 * 2**20, f"zoo is {size / 2**20:.1f} MiB"


@pytest.mark.slow
def test_zoo_experts_beat_the_base_on_their_task(tok):
    from moerge.lab.defaults import default_base
    from moerge.lab.eval import evaluate

    base, _ = default_base()
    model = MoErgeModel.from_library(base, DEFAULT_ZOO, tokenizer=tok)
    res = evaluate(model, tok, ["base", "oracle"], ["reverse_words", "date_format"], limit=8, progress=False)
    for task in ("reverse_words", "date_format"):
        assert res.scores["oracle"][task] >= res.scores["base"][task] + 0.5, res.scores
