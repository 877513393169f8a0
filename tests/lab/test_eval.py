"""The evaluation harness on a tiny model with the real tokenizer (chat template), and on the real zoo."""

from __future__ import annotations

import json

import pytest

from moerge import ExpertLibrary, MoErgeModel
from moerge.lab.eval import EvalResult, evaluate, list_methods, retrieval_accuracy, to_markdown
from moerge.lab.tasks import get_task

from helpers import save_peft_lora


@pytest.fixture(scope="module")
def tok():
    from moerge.lab.defaults import default_tokenizer

    return default_tokenizer()


@pytest.fixture
def tiny_routed(tmp_path, tok):
    from helpers import tiny_llama

    base = tiny_llama(0, vocab_size=len(tok))
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, name in enumerate(["uppercase", "plural"]):
        lib.add_peft(save_peft_lora(base, tmp_path / name, seed=i), name=name,
                     description=get_task(name).description)
    return MoErgeModel.from_library(base, lib, tokenizer=tok, router="explicit")


def test_evaluate_runs_every_method_and_task(tiny_routed, tok):
    res = evaluate(tiny_routed, tok, ["base", "oracle", "uniform", "router:fixed"],
                   ["uppercase", "plural", "sort_descending"], limit=3, batch_size=2, progress=False)
    assert set(res.scores) == {"base", "oracle", "uniform", "router:fixed"}
    assert set(res.scores["base"]) == {"uppercase", "plural", "sort_descending"}
    assert set(res.scores["oracle"]) == {"uppercase", "plural"}  # held-out tasks have no own expert
    for by_task in res.scores.values():
        assert all(0.0 <= v <= 1.0 for v in by_task.values())
    sample = res.samples["oracle"]["plural"][0]
    assert set(sample) == {"prompt", "target", "answer", "correct"}
    md = to_markdown(res)
    assert "| plural (held-in) |" in md and "| sort_descending (held-out) |" in md and "average held-out" in md
    row = next(line for line in md.splitlines() if line.startswith("| sort_descending"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "—" and cells[1] != "—"  # the oracle has no held-out cell; the base has one
    json.dumps(res.to_json())
    assert tiny_routed.router.name == "explicit"  # the model's own router is restored


def test_methods_route_as_described(tiny_routed, tok, monkeypatch):
    import moerge.lab.eval as ev

    seen = []
    real = ev.generate_answers

    def spy(model, tokenizer, examples, experts, max_new_tokens):
        seen.append((examples[0].task, experts))
        return real(model, tokenizer, examples, experts, max_new_tokens)

    monkeypatch.setattr(ev, "generate_answers", spy)
    evaluate(tiny_routed, tok, ["base", "oracle", "uniform"], ["plural"], limit=2, batch_size=2, progress=False)
    assert seen == [("plural", [{}, {}]), ("plural", [{"plural": 1.0}] * 2),
                    ("plural", [{"uppercase": 0.5, "plural": 0.5}] * 2)]


def test_averages_and_unknown_method(tiny_routed, tok):
    r = EvalResult(scores={"m": {"uppercase": 1.0, "plural": 0.5, "sort_descending": 0.25}})
    assert r.average("m", ["uppercase", "plural"]) == 0.75
    assert r.to_json()["averages"]["m"]["held_out"] == 0.25
    assert "router:fixed" in list_methods()
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(tiny_routed, tok, ["nope"], ["plural"], limit=1, progress=False)


def test_generation_uses_the_chat_template(tiny_routed, tok):
    from moerge.lab.eval import generate_answers
    from moerge.lab.tasks import get_task

    ex = get_task("plural").examples(2, "test")
    answers = generate_answers(tiny_routed, tok, ex, [{"plural": 1.0}, {}], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    prompt = tok.apply_chat_template([{"role": "user", "content": ex[0].prompt}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and ex[0].input in prompt


def test_router_methods_twin_and_retrieval(tiny_routed, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))
    res = evaluate(tiny_routed, tok, ["glider_global", "twin"], ["uppercase", "plural"], limit=2, batch_size=2,
                   progress=False)
    assert set(res.scores) == {"glider_global", "twin"}
    assert (tmp_path / "cache" / "twin").is_dir()  # the derived Twin-Merging library, built once
    assert tiny_routed.router.name == "explicit"
    from moerge.routers import build_router

    glider = build_router("glider", local="none")
    tiny_routed.set_router(glider)
    r = retrieval_accuracy(glider, ["uppercase", "plural"], limit=5)
    assert r["prompts"] == 10 and r["k"] == 3 and 0.5 <= r["top1"] <= r["top3"] == 1.0
    u = retrieval_accuracy(glider, ["uppercase", "plural"], limit=5, unseen=True)
    assert u["prompts"] == 10
    res.retrieval["seen"] = r
    assert "| seen |" in to_markdown(res)


def test_merge_compress_and_configured_router_methods(tiny_routed, tok, tmp_path, monkeypatch):
    import moerge.lab.eval as ev

    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))
    used = {}
    real = ev.generate_answers

    def spy(model, tokenizer, examples, experts, max_new_tokens):
        used.setdefault(type(model).__name__, 0)
        used[type(model).__name__] += 1
        return real(model, tokenizer, examples, experts, max_new_tokens)

    monkeypatch.setattr(ev, "generate_answers", spy)
    methods = ["oracle", "merge:ties?density=0.5", "merge:dare_linear?density=0.5&weight=0.5&rank=2",
               "compress:compeft?density=0.2", 'router:fixed?weights={"plural": 1.0}']
    res = evaluate(tiny_routed, tok, methods, ["uppercase", "plural", "sort_descending"], limit=2, batch_size=2,
                   progress=False)
    assert set(res.scores) == set(methods)
    assert used["LlamaForCausalLM"] == 2 * 3  # the merges run as plain models, on every task
    assert set(res.scores["compress:compeft?density=0.2"]) == {"uppercase", "plural"}  # oracle routing: held-in
    info = res.info["compress:compeft?density=0.2"]
    assert info["size_ratio"] > 3 and info["bytes"] < info["bytes_original"]
    assert (tmp_path / "cache" / "compressed").is_dir()
    md = to_markdown(res)
    assert "| static merge of all experts |" in md and "| ties?density=0.5 |" in md
    assert "| compression (each task's own expert) |" in md and "| compeft?density=0.2 |" in md
    main_header = md.splitlines()[0]
    assert "merge:" not in main_header and "router:fixed" in main_header
    with pytest.raises(ValueError, match="key=value"):
        evaluate(tiny_routed, tok, ["router:fixed?oops"], ["plural"], limit=1, progress=False)


def test_update_adds_methods_to_a_saved_table():
    a = EvalResult({"base": {"plural": 0.0}}, config={"limit": 3, "split": "test", "methods": ["base"]})
    b = EvalResult({"merge:ties": {"plural": 0.5}}, config={"limit": 3, "split": "test", "command": "x"},
                   info={"merge:ties": {"k": 1}})
    c = EvalResult.from_json(json.loads(json.dumps(a.to_json()))).updated(b)
    assert c.scores == {"base": {"plural": 0.0}, "merge:ties": {"plural": 0.5}} and c.info["merge:ties"] == {"k": 1}
    assert c.config["methods"] == ["base", "merge:ties"] and c.config["updates"][0]["command"] == "x"
    with pytest.raises(ValueError, match="limit"):
        a.updated(EvalResult({}, config={"limit": 5, "split": "test"}))


def test_method_lists_keep_commas_inside_brackets():
    from moerge.lab.eval import split_methods

    assert split_methods('base, merge:ties?layer_scaling=[0.5,0.5]&density=0.2,router:fixed?weights={"a":1,"b":2} ,'
                         ) == ["base", "merge:ties?layer_scaling=[0.5,0.5]&density=0.2",
                               'router:fixed?weights={"a":1,"b":2}']


def test_bootstrap_interval_brackets_the_average_and_shrinks_with_more_prompts():
    few = EvalResult(scores={"m": {"uppercase": 0.5, "plural": 0.5}},
                     correct={"m": {"uppercase": [1, 0] * 5, "plural": [0, 1] * 5}})
    many = EvalResult(scores={"m": {"uppercase": 0.5, "plural": 0.5}},
                      correct={"m": {"uppercase": [1, 0] * 200, "plural": [0, 1] * 200}})
    lo, hi = few.interval("m", ["uppercase", "plural"])
    lo2, hi2 = many.interval("m", ["uppercase", "plural"])
    assert lo < 0.5 < hi and lo2 < 0.5 < hi2 and hi2 - lo2 < (hi - lo) / 3
    assert few.interval("m", ["uppercase", "plural"]) == (lo, hi)  # seeded
    sure = EvalResult(scores={"m": {"plural": 1.0}}, correct={"m": {"plural": [1] * 10}})
    assert sure.interval("m", ["plural"]) == (1.0, 1.0)
    assert few.interval("other", ["plural"]) is None
    assert "95% interval" in to_markdown(few)


def test_unseen_phrasings_ask_the_held_in_tasks_in_words_no_expert_saw(tiny_routed, tok):
    from moerge.lab.tasks import UNSEEN_PHRASINGS, unseen_examples

    res = evaluate(tiny_routed, tok, ["base", "oracle"], ["uppercase", "plural", "sort_descending"], limit=3,
                   batch_size=3, progress=False, phrasing="unseen", samples_per_task=3)
    assert set(res.scores["base"]) == {"uppercase", "plural"}  # held-out tasks have no unseen phrasings
    assert res.config["phrasing"] == "unseen" and len(res.correct["oracle"]["plural"]) == 3
    asked = unseen_examples("plural", 3, "test")
    assert [s["prompt"] for s in res.samples["base"]["plural"]] == [e.prompt for e in asked]
    assert all(e.phrasing in UNSEEN_PHRASINGS["plural"] for e in asked)
    seen = evaluate(tiny_routed, tok, ["base"], ["plural"], limit=3, batch_size=3, progress=False)
    with pytest.raises(ValueError, match="phrasing"):
        seen.updated(res)
    older = EvalResult.from_json({**seen.to_json(), "config": {k: v for k, v in seen.config.items()
                                                               if k != "phrasing"}})
    assert set(older.updated(seen).scores) == {"base"}  # a table from before phrasings were chosen: the seen ones
