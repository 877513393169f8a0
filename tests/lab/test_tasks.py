"""The task suite: generators are seeded and correct, metadata is complete, the metric is exact match."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from moerge.lab.tasks import (
    HELD_IN,
    HELD_OUT,
    LAYOUTS,
    POLITE,
    TASKS,
    _typos,
    exact_match,
    get_task,
    make_examples,
    number_words,
    phrasings,
    routing_examples,
    unseen_examples,
)


def test_suite_size():
    assert len(HELD_IN) >= 12 and len(HELD_OUT) >= 4
    assert not set(HELD_IN) & set(HELD_OUT)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_metadata_and_determinism(name):
    t = TASKS[name]
    assert len(set(t.instructions)) >= 5
    assert t.description.endswith(".") and t.description.count(". ") == 0  # one sentence
    a, b = t.examples(20, "train"), t.examples(20, "train")
    assert a == b  # seeded
    test = t.examples(20, "test")
    assert [e.input for e in test] != [e.input for e in a]  # splits use other seeds
    assert {e.phrasing for e in t.examples(300, "train")} == set(t.instructions)
    for e in a:
        assert e.target and e.task == name and e.input in e.prompt
    plain = t.examples(20, "train", styles=False)
    assert all(e.prompt == f"{e.instruction}\n\n{e.input}" and e.instruction == e.phrasing for e in plain)
    if t.held_out:
        assert t.related and all(r in HELD_IN for r in t.related)


@pytest.mark.parametrize("name", HELD_IN)
def test_phrasing_sets_are_disjoint_and_dev_and_test_share_no_input(name):
    sets = {w: set(phrasings(name, w)) for w in ("train", "dev", "unseen")}
    assert all(len(v) >= 4 for v in sets.values())
    assert not (sets["train"] & sets["dev"]) and not (sets["train"] & sets["unseen"]) and not (sets["dev"] & sets["unseen"])
    t = TASKS[name]
    dev, test = t.examples(200, "dev"), t.examples(200, "test")
    assert {e.phrasing for e in dev} <= sets["dev"] and {e.phrasing for e in test} <= sets["train"]
    assert {e.phrasing for e in unseen_examples(name, 200)} <= sets["unseen"]
    assert not {e.input for e in dev} & {e.input for e in test}
    stored = {e.input for e in routing_examples(name, 12)}  # the experts' stored examples: neither dev nor test
    assert len(routing_examples(name, 12)) == 12 and not stored & ({e.input for e in dev} | {e.input for e in test})
    assert not {e.input for e in dev} & {e.input for e in unseen_examples(name, 200)}


def test_styles_cover_every_layout_politeness_and_typos():
    exs = [e for n in HELD_IN for e in TASKS[n].examples(100, "test", instructions="unseen")]
    layouts = Counter(e.layout for e in exs)
    assert set(layouts) == set(LAYOUTS) and all(v / len(exs) > 0.1 for v in layouts.values())
    for e in exs:
        if e.layout == "after":
            assert e.prompt == f"{e.input}\n\n{e.instruction}"
        elif e.layout == "inline":
            assert e.prompt.endswith(f": {e.input}") and "\n" not in e.prompt.replace(e.input, "")
    polite = sum(e.instruction != e.phrasing and any(p.format(i="").strip(" .!:") in e.instruction
                                                   for p in POLITE) for e in exs)
    typos = sum(e.instruction.split() != e.phrasing.split() and len(e.instruction.split()) == len(e.phrasing.split())
                for e in exs)
    assert 0.1 < polite / len(exs) < 0.35 and 0.05 < typos / len(exs) < 0.35


def test_typos_leave_formats_and_acronyms_alone():
    rng = random.Random(0)
    for _ in range(200):
        out = _typos("Rewrite the date in DD/MM/YYYY format as JSON please", rng)
        assert "DD/MM/YYYY" in out and "JSON" in out and out != "Rewrite the date in DD/MM/YYYY format as JSON please"
        assert "positive or negative" in _typos("Answer positive or negative: how does the writer feel?", rng)


@pytest.mark.parametrize("name,check", [
    ("reverse_words", lambda x, y: y.split() == x.split()[::-1]),
    ("uppercase", lambda x, y: y == x.upper()),
    ("sort_numbers", lambda x, y: [int(v) for v in y.split(", ")] == sorted(int(v) for v in x.split(", "))),
    ("add_integers", lambda x, y: int(y) == eval(x)),  # noqa: S307 - "a + b" from our own generator
    ("subtract_integers", lambda x, y: int(y) == eval(x)),  # noqa: S307
    ("date_format", lambda x, y: y.split("/")[::-1] == x.split("-")),
    ("extract_email", lambda x, y: y in x and "@" in y),
    ("count_words", lambda x, y: int(y) == len(x.split())),
    ("kv_to_json", lambda x, y: json.loads(y) == dict(p.split(": ") for p in x.split("; "))),
    ("acronym", lambda x, y: y == "".join(w[0] for w in x.split()).upper()),
    ("reverse_then_uppercase", lambda x, y: y == " ".join(x.split()[::-1]).upper()),
    ("sort_descending", lambda x, y: [int(v) for v in y.split(", ")] == sorted((int(v) for v in x.split(", ")),
                                                                               reverse=True)),
    ("count_uppercase_words", lambda x, y: int(y) == sum(w.isupper() for w in x.split())),
])
def test_generators_are_correct(name, check):
    for e in get_task(name).examples(100, "test"):
        assert check(e.input, e.target), (e.input, e.target)


@pytest.mark.parametrize("n,words", [(0, "zero"), (7, "seven"), (15, "fifteen"), (40, "forty"), (42, "forty-two"),
                                     (100, "one hundred"), (342, "three hundred forty-two"),
                                     (999, "nine hundred ninety-nine")])
def test_number_words(n, words):
    assert number_words(n) == words


def test_sentiment_is_balanced():
    labels = [e.target for e in get_task("sentiment").examples(400, "train")]
    assert set(labels) == {"positive", "negative"} and 0.4 < labels.count("positive") / 400 < 0.6


@pytest.mark.parametrize("pred,target,ok", [
    ("PARIS", "PARIS", True), ("  42\n", "42", True), ("42.", "42", True), ("paris", "Paris", False),
    ("42 is the answer", "42", False), ("", "x", False), ("a.b@c.io.", "a.b@c.io", True),
])
def test_exact_match(pred, target, ok):
    assert exact_match(pred, target) is ok


def test_make_examples_and_unknown_task():
    ex = make_examples(["uppercase", "plural"], 3, "dev")
    assert [e.task for e in ex] == ["uppercase"] * 3 + ["plural"] * 3
    with pytest.raises(KeyError, match="unknown task"):
        get_task("nope")
    assert random.Random(0).random() == random.Random(0).random()
