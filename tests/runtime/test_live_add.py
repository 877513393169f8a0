"""Adding an expert while calls run: its routing data is trained off the serving path (on a private base, outside
the model's lock), calls under way are neither changed nor held up, and the expert becomes visible at once when
its data is ready — or never, when its data cannot be made.

Overlap is made certain, not hoped for: a barrier lets one training step and one call run together, step by
step, so every call of the test runs while the add trains (a lock held by the add would deadlock the barrier,
whose timeout then fails the test)."""

from __future__ import annotations

import threading

import pytest
import torch

import moerge.routers.phatgoose as pg
from moerge import ExpertLibrary, MoErgeModel
from moerge.core.fingerprint import base_parameters
from moerge.errors import RoutingError
from moerge.routers import build_router

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

EXAMPLES = ["reverse: a b c", "reverse: x y", "reverse: one two three"]
STEPS = 6  # training steps of the added expert's gates, each run next to one call
HANG_GUARD = 300  # seconds; only a deadlock reaches it


def _model(tmp_path):
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(("e0", "e1")):
        lib.add(rand_expert(base, n, seed=i, description=f"expert {n}", examples=EXAMPLES))
    router = build_router("phatgoose", top_k=2, train_steps=STEPS, train_batch_size=2)
    # trained in this process: the lockstep barrier below runs training steps next to calls in threads
    return MoErgeModel.from_library(base, lib, router=router, tokenizer=tok, train_in="thread"), tok


def test_an_add_that_trains_changes_no_concurrent_call_and_holds_none_up(tmp_path, monkeypatch):
    model, tok = _model(tmp_path)
    expected = [call() for call in _call_steps(model, tok)]  # the same calls with no add under way
    new = rand_expert(tiny_chat_llama(), "new", seed=7, description="expert new", examples=EXAMPLES)
    steps = threading.Barrier(2, timeout=HANG_GUARD)
    real_batches = pg.make_batches

    def lockstep_batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            steps.wait()
            yield batch

    monkeypatch.setattr(pg, "make_batches", lockstep_batches)
    calls = iter(_call_steps(model, tok))
    got: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def add() -> None:
        try:
            model.add_expert(new)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            steps.abort()

    adder = threading.Thread(target=add)
    adder.start()
    for call in calls:
        steps.wait()  # one training step of the add runs while this call does (a held lock would deadlock here)
        assert "new" not in model.experts  # not visible before its gates are ready
        got.append(call())
    adder.join(HANG_GUARD)
    assert not errors and not adder.is_alive()
    assert len(got) == len(expected) == STEPS
    for a, b in zip(got, expected):
        assert torch.equal(a, b)  # bitwise: greedy, seeded sampling and logits alike
    assert "new" in model.experts and len(model.router.losses["new"]) == STEPS


def _call_steps(model, tok):
    """:func:`_calls` one call at a time."""
    enc = tok(["reverse: p q r", "reverse: hello there"], return_tensors="pt", padding=True)

    def greedy():
        return model.generate(**enc, max_new_tokens=4, do_sample=False)

    def sampled(seed):
        def run():
            torch.manual_seed(seed)
            return model.generate(**enc, max_new_tokens=4, do_sample=True, top_k=20)
        return run

    def forced():
        with torch.no_grad():
            return model(**enc, experts={"e0": 0.7, "e1": 0.3}).logits

    return [greedy if i % 3 == 0 else sampled(100 + i) if i % 3 == 1 else forced for i in range(STEPS)]


def test_an_expert_whose_routing_data_fails_is_never_visible(tmp_path, monkeypatch):
    model, tok = _model(tmp_path)
    lib = model.library
    files_before = sorted(p.relative_to(lib.root) for p in lib.root.rglob("*") if p.is_file())
    new = rand_expert(tiny_chat_llama(), "new", seed=7, description="expert new", examples=EXAMPLES)

    def broken(*args, **kwargs):
        raise RuntimeError("gate training failed (injected)")

    monkeypatch.setattr(pg, "train_phatgoose_gates", broken)
    with pytest.raises(RuntimeError, match="injected"):
        model.add_expert(new)
    assert model.experts == ["e0", "e1"]
    with pytest.raises(RoutingError):
        model.router.gates_of("new")
    assert sorted(p.relative_to(lib.root) for p in lib.root.rglob("*") if p.is_file()) == files_before
    assert ExpertLibrary.open(lib.root).verify() == []


def test_a_replacement_that_fails_at_the_swap_puts_the_previous_expert_back_with_its_routing_data(tmp_path,
                                                                                                   monkeypatch):
    model, tok = _model(tmp_path)
    lib = model.library
    enc = tok(["reverse: p q"], return_tensors="pt")
    before = model.generate(**enc, max_new_tokens=3, do_sample=False)
    old_digest = lib.get("e0").digest()
    stored_gates = lib.get_routing("e0", "phatgoose")
    assert stored_gates is not None
    new = rand_expert(tiny_chat_llama(), "e0", seed=9, description="new e0", examples=EXAMPLES)
    real = model.expert_set.router_add

    def broken(router, experts, prepared=None, previous=None):  # the swap fails after the library took the new version
        assert ExpertLibrary.open(lib.root).get("e0").digest() == new.digest()
        raise RuntimeError("swap failed (injected)")

    monkeypatch.setattr(model.expert_set, "router_add", broken)
    with pytest.raises(RuntimeError, match="injected"):
        model.add_expert(new, overwrite=True)
    monkeypatch.setattr(model.expert_set, "router_add", real)
    again = ExpertLibrary.open(lib.root)
    assert again.get("e0").digest() == old_digest and again.verify() == []
    got = again.routing_for("e0", "phatgoose", old_digest)  # its gates are still stored: nothing to retrain
    assert got is not None and all(torch.equal(got[m], stored_gates[0][m]) for m in got)
    assert torch.equal(model.generate(**enc, max_new_tokens=3, do_sample=False), before)


def test_routing_data_is_trained_on_a_private_base_that_shares_the_weights(tmp_path):
    model, tok = _model(tmp_path)
    private = model.expert_set.private_base()
    live = base_parameters(model.base)  # the live base's weights under their plain names
    mine = dict(private.named_parameters())
    assert mine.keys() == live.keys()
    for name, p in mine.items():
        assert p.data_ptr() == live[name].data_ptr() and not p.requires_grad  # an alias, nothing copied
    assert not any(type(m).__name__ == "ExpertLinear" for m in private.modules())
    fired = []
    handle = private.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: fired.append(1))
    enc = tok(["reverse: a b"], return_tensors="pt")
    model.generate(**enc, max_new_tokens=2, experts={"e0": 1.0})
    assert fired == []  # a hook on the private base never runs in the live model
    handle.remove()
    flags = [p.requires_grad for p in model.base.parameters()]
    rng = torch.random.get_rng_state()
    model.add_expert(rand_expert(tiny_chat_llama(), "new", seed=7, description="expert new", examples=EXAMPLES))
    assert [p.requires_grad for p in model.base.parameters()] == flags  # training never touched the live weights
    assert torch.equal(torch.random.get_rng_state(), rng)  # nor the process's random generator
