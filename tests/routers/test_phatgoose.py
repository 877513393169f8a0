"""PHATGOOSE: gate training on a frozen base and expert, the paper's inference formula, gates stored in the
library and reused, post-hoc additions train only the new expert."""

from __future__ import annotations

import math

import pytest
import torch

import moerge.routers.phatgoose as pg
from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.routing import Candidates, LayerInfo

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

EXAMPLES = ["reverse: a b c", "reverse: x y", "reverse: one two three"]


def _lib(tmp_path, base, names=("e0", "e1"), examples=EXAMPLES):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(names):
        lib.add(rand_expert(base, n, seed=i, description=f"expert {n}", examples=examples))
    return lib


def test_training_lowers_the_loss_and_leaves_the_base_untouched():
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    expert = rand_expert(base, "e", seed=3, scale=4.0)
    ids = tok(["hello"], return_tensors="pt")["input_ids"]
    before = base(input_ids=ids).logits
    pairs = [(f"say {w}", w.upper()) for w in ("abc", "hello", "moerge", "gate")]
    rng = torch.random.get_rng_state()
    gates, losses = pg.train_phatgoose_gates(base, tok, expert, pairs, steps=25, lr=0.05, batch_size=4,
                                             progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random state is untouched
    assert set(gates) == set(expert.modules)
    assert all(g.shape == (expert.modules[m].in_features,) and g.abs().sum() > 0 for m, g in gates.items())
    assert losses[-1] < losses[0]
    assert all(p.requires_grad for p in base.parameters())  # restored
    assert torch.equal(base(input_ids=ids).logits, before)  # hooks removed, weights unchanged


def test_negatives_teach_the_gate_to_close_on_other_experts_tokens(tmp_path):
    """On its own data alone a gate has no reason to close anywhere; with another task's examples as negatives (the
    contrastive recipe) it learns to close on their answer tokens and to open on its own: at inference (standardized
    dot products) its own tokens score above the other task's by a wider margin."""
    from moerge.routing import standardize
    from moerge.routing.training import answer_positions, collate

    base, tok = tiny_chat_llama(), tiny_tokenizer()
    expert = rand_expert(base, "e", seed=3)
    own = [(f"shout {w}", w.upper()) for w in ("abc", "hello", "moerge", "gate", "cat", "dog")]
    others = [(f"count {w}", str(len(w))) for w in ("abcd", "hi", "moerge", "ok", "tree", "sky")]
    plain, _ = pg.train_phatgoose_gates(base, tok, expert, own, steps=40, lr=0.05, batch_size=4, progress=False)
    negative, losses = pg.train_phatgoose_gates(base, tok, expert, own, steps=40, lr=0.05, batch_size=4,
                                                progress=False, negatives=others)
    assert len(losses) == 40

    def score(gates, pairs):  # the inference logit ⟨std(x), std(v)⟩ averaged over the tokens that write pairs' answers
        b, vals = collate(tok, pairs), []  # and over the modules
        writes = answer_positions(b["labels"])
        hooks = [base.get_submodule(m).register_forward_pre_hook(
            lambda mod, a, _g=g: vals.append((standardize(a[0]) @ standardize(_g))[writes].mean()))
            for m, g in gates.items()]
        with torch.no_grad():
            base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for h in hooks:
            h.remove()
        return float(torch.stack(vals).mean())

    # 2.6 times the paper's margin here (measured over the tokens that write the answers, through <|im_end|>)
    assert score(negative, own) - score(negative, others) > 2 * (score(plain, own) - score(plain, others)) > 0


def test_gate_matches_the_paper_formula():
    r = build_router("phatgoose", top_k=2)
    torch.manual_seed(0)
    d, names = 16, ("a", "b", "c")
    vecs = {n: torch.randn(d) for n in names}
    for n in names:
        r.set_gates(n, {"m": vecs[n]})
    x = torch.randn(2, 5, d)
    cands = Candidates(torch.tensor([[0, 1, 2], [2, 0, -1]]), torch.zeros(2, 3), names)
    w = r.gate(x, cands, LayerInfo(0, "m", d, d))
    std = lambda v: (v - v.mean(-1, keepdim=True)) / v.var(-1, unbiased=False, keepdim=True).add(1e-5).sqrt()  # noqa: E731
    for b in range(2):
        row = [i for i in cands.ids[b].tolist() if i >= 0]
        for t in range(5):
            z = torch.tensor([float(std(x[b, t]) @ std(vecs[names[i]])) / math.sqrt(d) for i in row])
            top = z.topk(2)
            ref = torch.zeros(3)
            ref[top.indices] = torch.softmax(top.values, 0)
            assert torch.allclose(w[b, t, : len(row)], ref[: len(row)], atol=1e-5)
            assert w[b, t].sum() == pytest.approx(1.0, abs=1e-6) and int((w[b, t] > 0).sum()) <= 2
    # a module no candidate targets: no weight anywhere
    assert w.new_zeros(1).sum() == r.gate(x, cands, LayerInfo(1, "other", d, d)).abs().sum()


def test_gates_trained_on_add_stored_and_reused(tmp_path, monkeypatch):
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    lib = _lib(tmp_path, base)
    calls = []
    real = pg.train_phatgoose_gates

    def counting(base_, tok_, expert, examples, **kw):
        calls.append(expert.name)
        return real(base_, tok_, expert, examples, **{**kw, "progress": False})

    monkeypatch.setattr(pg, "train_phatgoose_gates", counting)
    router = build_router("phatgoose", train_steps=2, train_batch_size=2)
    # in this process, so the spy sees the calls (tests/runtime/test_training_process.py covers the child)
    model = MoErgeModel.from_library(base, lib, router=router, tokenizer=tok, train_in="thread")
    assert sorted(calls) == ["e0", "e1"]
    lib2 = ExpertLibrary.open(lib.root)
    assert lib2.routing_kinds("e0") == ["phatgoose"]
    stored, info = lib2.get_routing("e0", "phatgoose")
    assert info["digest"] == lib2.get("e0").digest()
    assert all(torch.equal(stored[m], g) for m, g in router.gates_of("e0").items())

    # a second model on the same library trains nothing
    calls.clear()
    other = build_router("phatgoose", train_steps=2, train_batch_size=2)
    second = MoErgeModel.from_library(tiny_chat_llama(), lib2, router=other, tokenizer=tok, train_in="thread")
    assert calls == []
    assert all(torch.equal(other.gates_of("e1")[m], g) for m, g in router.gates_of("e1").items())
    second.close()  # it would follow the library and train the additions below too

    # adding an expert post hoc trains only that one; replacing an expert's weights retrains only it
    model.add_expert(rand_expert(tiny_chat_llama(), "e2", seed=7, examples=EXAMPLES))
    assert calls == ["e2"]
    model.add_expert(rand_expert(tiny_chat_llama(), "e0", seed=9, examples=EXAMPLES), overwrite=True)
    assert calls == ["e2", "e0"]
    assert ExpertLibrary.open(lib.root).get_routing("e0", "phatgoose")[1]["digest"] == model.get_expert("e0").digest()


def test_expert_without_examples_gets_zero_gates_with_a_warning(tmp_path):
    base = tiny_chat_llama()
    lib = _lib(tmp_path, base, examples=())
    with pytest.warns(UserWarning, match="no PHATGOOSE gates"):
        model = MoErgeModel.from_library(base, lib, router="phatgoose")
    assert all(g.abs().sum() == 0 for g in model.router.gates_of("e0").values())
    assert lib.routing_kinds("e0") == []  # nothing trained: nothing stored


def test_routed_generate_is_deterministic_and_rows_independent(tmp_path):
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    lib = _lib(tmp_path, base, names=("e0", "e1", "e2"))
    model = MoErgeModel.from_library(base, lib, router=build_router("phatgoose", top_k=2, train_steps=2),
                                     tokenizer=tok)
    batch = tok(["abc", "hello world"], return_tensors="pt", padding=True)
    out1 = model.generate(**batch, max_new_tokens=4, do_sample=False)
    out2 = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(out1, out2)
    alone = model.generate(**tok(["hello world"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert torch.equal(out1[1, -4:], alone[0, -4:])
    usage = model.last_routing[0]
    assert usage.layer_usage and sum(usage.experts.values()) == pytest.approx(1.0, abs=1e-5)
