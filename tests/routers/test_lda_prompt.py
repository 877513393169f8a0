"""LDA over the prompt: the sequence score against a hand computation from the base's own module inputs, rows
independent of their padding and batch, prompts routed to the expert whose examples they resemble, generation with
that expert alone, and the base that serves calls never hooked."""

from __future__ import annotations

import pytest
import torch

import moerge.routers.lda as lda
from moerge import ExpertLibrary, MoErgeModel
from moerge.errors import RoutingError
from moerge.routers import build_router
from moerge.routing import RoutingRequest, standardize

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

# three "tasks" whose prompts differ in the characters they are written in
TASKS = {
    "digits": ["7 3 9 1 4 8", "2 6 0 5 5 1", "9 9 4 2 7 3", "1 8 3 6 0 2", "4 0 7 1 9 6", "5 2 8 8 3 0"],
    "upper": ["QWE RTY UIO", "ASD FGH JKL", "ZXC VBN MQP", "POI UYT REW", "LKJ HGF DSA", "MNB VCX ZQA"],
    "punct": ["a.b,c;d:e!f", "g;h.i,j!k:l", "m,n;o.p:q!r", "s!t:u;v,w.x", "y.z;a!b,c:d", "e:f.g;h,i!j"],
}
HELD = {"digits": ["3 1 4 1 5 9", "8 2 7 1 8 2"], "upper": ["HJK TRE WQA", "BVC XZL KJH"],
        "punct": ["k.l;m,n!o:p", "q!r.s:t;u,v"]}
WINDOW = 16  # the default: the tiny template's turn change is 13 characters, the last 3 are the prompt's


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    lib = ExpertLibrary.create(tmp_path_factory.mktemp("lib") / "lib", base_model=base)
    for i, (name, examples) in enumerate(TASKS.items()):
        lib.add(rand_expert(base, name, seed=i, examples=examples))
    router = build_router("lda_prompt", rank=4)
    model = MoErgeModel.from_library(base, lib, router=router, tokenizer=tok)
    # the statistics of each task's prompts with a short answer: a random model's own answers (64 tokens of noise,
    # alike for every expert) would swamp them, where the zoo's experts answer their tasks
    for name, examples in TASKS.items():
        router._set_data(name, lda.expert_statistics(tiny_chat_llama(), tok, lib[name].load(),
                                                     [(p, "ok") for p in examples], rank=4, with_expert=False,
                                                     positions="all"))
    return model, tok


def _batch(tok, prompts):
    text = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]
    return tok(text, return_tensors="pt", padding=True, add_special_tokens=False)


def _by_hand(model, tok, prompt, window):
    """Each expert's mean log-posterior over the prompt's last WINDOW tokens and every module with statistics,
    from a plain copy of the base hooked by hand and the discriminant of every expert's stored statistics."""
    router, names = model.router, list(model.experts)
    plain = tiny_chat_llama()  # the same weights, never patched
    ids = _batch(tok, [prompt])["input_ids"]
    inputs = {}
    mods = sorted(router.statistics_of(names[0]))
    hs = [plain.get_submodule(m).register_forward_pre_hook(lambda mod, a, _m=m: inputs.__setitem__(_m, a[0][0]))
          for m in mods]
    with torch.no_grad():
        plain(input_ids=ids)
    for h in hs:
        h.remove()
    per_module = []
    for m in mods:
        data = torch.stack([router.statistics_of(n)[m] for n in names])
        z = standardize(inputs[m][-window:]).double()
        w, b = lda.Discriminant(z.shape[1], 1.0)(data, torch.ones(len(names), dtype=torch.bool))
        per_module.append(torch.log_softmax(z @ w.double().t() + b.double(), dim=-1).mean(0))
    return torch.stack(per_module).mean(0)


@pytest.mark.parametrize("window", [WINDOW, 40])  # 40: longer than the shortest prompt (32 tokens templated)
def test_score_is_the_mean_log_posterior_of_the_prompts_last_tokens(routed, window):
    model, tok = routed
    prompts = [HELD["digits"][0], "Q!", HELD["punct"][1] + " and a longer tail to pad the others"]
    b = _batch(tok, prompts)
    assert (b["attention_mask"] == 0).any()  # left padded rows
    request = RoutingRequest(b["input_ids"], b["attention_mask"], tuple(model.experts))
    model.router.config.window = window
    try:
        got = model.router.prompt_scores(request)
        for r, p in enumerate(prompts):
            assert torch.allclose(got[r].double(), _by_hand(model, tok, p, window), atol=1e-4)
            alone = _batch(tok, [p])
            solo = model.router.prompt_scores(RoutingRequest(alone["input_ids"], alone["attention_mask"],
                                                             tuple(model.experts)))
            assert torch.allclose(solo[0], got[r], atol=1e-4)  # a row's score is its own, whatever the batch
    finally:
        model.router.config.window = WINDOW


def test_prompts_go_to_the_expert_whose_examples_they_resemble(routed):
    model, tok = routed
    for task, prompts in HELD.items():
        b = _batch(tok, prompts)
        cands = model.router.select(RoutingRequest(b["input_ids"], b["attention_mask"], tuple(model.experts)))
        assert cands.weights.shape == (len(prompts), 1)  # top_k=1 by default: one expert per sequence
        assert [cands.row_names(r) for r in range(len(prompts))] == [[task]] * len(prompts)
        assert torch.equal(cands.weights, torch.ones(len(prompts), 1))


def test_generation_uses_the_chosen_expert_alone(routed):
    model, tok = routed
    b = _batch(tok, [HELD["upper"][0], HELD["digits"][1]])
    out = model.generate(**b, max_new_tokens=6, do_sample=False)
    trace = model.last_routing
    assert [r.top() for r in trace] == ["upper", "digits"]
    forced = model.generate(**b, max_new_tokens=6, do_sample=False, experts=[{"upper": 1.0}, {"digits": 1.0}])
    assert torch.equal(out, forced)
    two = model.router
    two.config.top_k = 2
    try:
        request = RoutingRequest(b["input_ids"], b["attention_mask"], tuple(model.experts))
        cands, scores = two.select(request), two.prompt_scores(request)
        for r in range(2):  # the top two by score, weighed by softmax(score / temperature)
            top = scores[r].topk(2)
            assert cands.ids[r].tolist() == top.indices.tolist()
            assert torch.allclose(cands.weights[r], torch.softmax(top.values / two.config.temperature, -1).float())
    finally:
        two.config.top_k = 1


def test_the_base_serving_calls_is_never_hooked(routed):
    model, tok = routed
    b = _batch(tok, [HELD["punct"][0]])
    model.generate(**b, max_new_tokens=2, do_sample=False)
    assert all(not m._forward_pre_hooks for m in model.base.modules())
    reader = model.router._reader[1]
    assert reader is not model.base
    shared = {p.data_ptr() for p in model.base.parameters()}
    assert all(p.data_ptr() in shared for p in reader.parameters())  # it shares the weights, copies none


def test_config_and_misuse_are_refused(routed):
    model, _ = routed
    assert build_router("lda_prompt").routing_kind == "lda-r8-base-all"  # the base's statistics over every token
    for bad in ({"with_expert": True}, {"window": 0}, {"window": 2.5}, {"temperature": 0}):
        with pytest.raises(ValueError):
            build_router("lda_prompt", **bad)
    with pytest.raises(RoutingError, match="input_ids"):
        model.router.select(RoutingRequest(None, None, tuple(model.experts), experts=[{}]))
    with pytest.raises(RoutingError, match="attach"):
        build_router("lda_prompt").prompt_scores(RoutingRequest(torch.ones(1, 3, dtype=torch.long), None, ("a",)))


def test_concurrent_callers_keep_their_answers_while_an_expert_is_added(routed, tmp_path):
    """Callers in threads while another thread adds an expert of a fourth kind of prompt (symbols): each caller's answer is
    the one it gets alone (its prompt keeps its expert), and the new expert takes the prompts that resemble its own
    examples."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model, tok = routed
    prompts = [HELD["digits"][0], HELD["upper"][1], HELD["punct"][0], HELD["upper"][0]]
    alone = {}
    for p in prompts:
        alone[p] = model.generate(**_batch(tok, [p]), max_new_tokens=4, do_sample=False)
    symbols = ["#$% &*@ ~^=", "<>[ ]{} ()|", "@@# $%^ &&*", "~~= +-< >[]", "{}( )#$ %^&", "*@~ ^=+ -<>"]
    new = rand_expert(tiny_chat_llama(), "symbols", seed=7, examples=symbols)
    start = threading.Event()

    def call(p):
        start.wait()
        return p, model.generate(**_batch(tok, [p]), max_new_tokens=4, do_sample=False)

    def add():
        start.wait()
        # the statistics of a short-answer version of its examples, as the fixture gives the others
        stats = lda.expert_statistics(tiny_chat_llama(), tok, new, [(p, "ok") for p in symbols], rank=4,
                                      with_expert=False, positions="all")
        model.add_expert(new)
        model.wait_routing()
        model.router._set_data("symbols", stats)

    try:
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(call, p) for p in prompts * 2] + [pool.submit(add)]
            start.set()
            got = [f.result() for f in futures[:-1]]
            futures[-1].result()
        for p, out in got:
            assert torch.equal(out, alone[p]), p
        b = _batch(tok, ["$%^ {}[ ]()", "=+- <>~ @#&"])
        cands = model.router.select(RoutingRequest(b["input_ids"], b["attention_mask"], tuple(model.experts)))
        assert [cands.row_names(r) for r in range(2)] == [["symbols"], ["symbols"]]
        for p in prompts:  # the others keep theirs
            assert torch.equal(model.generate(**_batch(tok, [p]), max_new_tokens=4, do_sample=False), alone[p])
    finally:
        if "symbols" in model.experts:
            model.remove_expert("symbols")
