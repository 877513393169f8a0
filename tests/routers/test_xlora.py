"""X-LoRA-style head: joint training lowers the loss, one-pass routed generate with the KV cache equals the
uncached forward, rows stored in the library, a new expert trains only its own rows."""

from __future__ import annotations

import pytest
import torch

import moerge.routers.xlora as xl
from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.routing import Candidates, LayerInfo

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

EX = ["say abc", "say hello", "say xyz"]


def test_joint_training_lowers_the_loss():
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    experts = [rand_expert(base, f"e{i}", seed=i, scale=4.0) for i in range(3)]
    pairs = [(f"say {w}", w.upper()) for w in ("abc", "hello", "gate", "moerge")]
    rows, losses = xl.train_xlora_head(base, tok, experts, pairs, steps=25, lr=0.05, batch_size=4, progress=False)
    assert losses[-1] < losses[0]
    assert set(rows) == {"e0", "e1", "e2"} and all(set(r) == set(experts[0].modules) for r in rows.values())
    frozen_rows, _ = xl.train_xlora_head(base, tok, experts, pairs, steps=3, trainable={"e2"}, init=rows,
                                         progress=False)
    for n in ("e0", "e1"):  # not trainable: unchanged
        assert all(torch.equal(frozen_rows[n][m][0], rows[n][m][0]) for m in rows[n])
    assert any(not torch.equal(frozen_rows["e2"][m][0], rows["e2"][m][0]) for m in rows["e2"])


def test_gate_is_a_softmax_over_candidates():
    r = build_router("xlora")
    d = 8
    torch.manual_seed(0)
    W = torch.randn(3, d)
    b = torch.randn(3)
    for i, n in enumerate("abc"):
        r.set_rows(n, {"m": (W[i], b[i])})
    x = torch.randn(2, 4, d)
    cands = Candidates(torch.tensor([[0, 1, 2], [2, 0, -1]]), torch.zeros(2, 3), tuple("abc"))
    w = r.gate(x, cands, LayerInfo(0, "m", d, d))
    xs = torch.nn.functional.layer_norm(x, (d,))
    ref0 = torch.softmax(xs[0] @ W.t() / d ** 0.5 + b, -1)
    assert torch.allclose(w[0], ref0, atol=1e-5)
    ref1 = torch.softmax(xs[1] @ W[[2, 0]].t() / d ** 0.5 + b[[2, 0]], -1)
    assert torch.allclose(w[1, :, :2], ref1, atol=1e-5) and (w[1, :, 2] == 0).all()


def test_rows_stored_reused_and_new_expert_trains_only_itself(tmp_path, monkeypatch):
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i in range(2):
        lib.add(rand_expert(base, f"e{i}", seed=i, examples=EX))
    calls = []
    real = xl.train_xlora_head

    def spy(*a, **kw):
        calls.append(sorted(kw["trainable"]))
        return real(*a, **{**kw, "progress": False})

    monkeypatch.setattr(xl, "train_xlora_head", spy)
    model = MoErgeModel.from_library(base, lib, router=build_router("xlora", train_steps=2), tokenizer=tok,
                                     train_in="thread")  # in this process, so the spy sees the calls
    assert calls == [["e0"], ["e1"]]
    before = {n: model.router.rows_of(n) for n in ("e0", "e1")}
    assert lib.routing_kinds("e1") == ["xlora"]
    calls.clear()
    model.add_expert(rand_expert(tiny_chat_llama(), "e2", seed=5, examples=EX))
    assert calls == [["e2"]]
    for n in ("e0", "e1"):
        assert all(torch.equal(model.router.rows_of(n)[m][0], before[n][m][0]) for m in before[n])
    calls.clear()
    again = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(lib.root),
                                     router=build_router("xlora"), tokenizer=tok, train_in="thread")
    assert calls == []
    for n in ("e0", "e1", "e2"):  # every expert's rows read back from the library as they were trained
        assert all(torch.equal(again.router.rows_of(n)[m][0], w) for m, (w, _) in model.router.rows_of(n).items())


def test_one_pass_generation_with_kv_cache_matches_uncached(tmp_path):
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i in range(3):
        lib.add(rand_expert(base, f"e{i}", seed=i, examples=EX))
    model = MoErgeModel.from_library(base, lib, router=build_router("xlora", train_steps=2), tokenizer=tok)
    batch = tok(["abc", "hello there"], return_tensors="pt", padding=True)
    cached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert sum(model.last_routing[0].experts.values()) == pytest.approx(1.0, abs=1e-5)
