"""Routing data trained in the background (``train_routing="background"``): a model over a library that lacks its
routers' data is returned at once, serves the experts by name (and GLIDER by its index) while the data trains, takes
each expert's data in with one swap, and ends bitwise where a model that trained first starts.

Training is held on an event the test releases, so "at once" is a fact of the order of events, not of timing (the
waits' timeouts only guard against a hang)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

import moerge.routers.phatgoose as pg
from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.routing.embed import CallableEmbedder

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

EXAMPLES = ["reverse: a b c", "reverse: x y", "reverse: one two three"]
HANG_GUARD = 300  # seconds; only a deadlock or a fill that never ends reaches it
PHATGOOSE = {"top_k": 2, "train_steps": 2, "train_batch_size": 2}


def _library(root, names=("e0", "e1")):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(root, base_model=base)
    for i, n in enumerate(names):
        lib.add(rand_expert(base, n, seed=i, description=f"expert {n} reverses words", examples=EXAMPLES))
    return lib


def _embedder():
    def encode(texts):  # a deterministic toy embedder: letter counts, so 'reverse' prompts meet 'reverse' experts
        out = torch.zeros(len(texts), 26)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    return CallableEmbedder(encode, "letters", 26)


def _router(kind):
    if kind == "phatgoose":
        return build_router("phatgoose", **PHATGOOSE)
    return build_router("glider", candidates=2, embedder=_embedder(), local="phatgoose", local_config=dict(PHATGOOSE))


def _model(lib, kind, train_routing):
    return MoErgeModel.from_library(tiny_chat_llama(), lib, router=_router(kind), tokenizer=tiny_tokenizer(),
                                    follow=False, train_routing=train_routing, train_in="thread")  # held here


def _enc(model):
    return model.tokenizer(["reverse: p q r", "reverse: hello there"], return_tensors="pt", padding=True)


def _out(model, experts=None):
    return model.generate(**_enc(model), max_new_tokens=4, do_sample=False, experts=experts)


def _used(routing):
    """Per row, the experts given some weight."""
    return [{n for n, w in r.experts.items() if w > 0} for r in routing]


class Held:
    """Holds PHATGOOSE training until released; counts the experts that started training."""

    def __init__(self, monkeypatch):
        self.release = threading.Event()
        self.reached = threading.Event()  # some training started
        self.started: list[str] = []
        self.fail: set[str] = set()
        real = pg.train_phatgoose_gates

        def held(base, tok, expert, *a, **kw):
            self.started.append(expert.name)
            self.reached.set()
            assert self.release.wait(HANG_GUARD), "training was never released"
            if expert.name in self.fail:
                raise RuntimeError(f"no gates for {expert.name}")
            return real(base, tok, expert, *a, **kw)

        monkeypatch.setattr(pg, "train_phatgoose_gates", held)


@contextmanager
def held_model(tmp_path, monkeypatch, kind="phatgoose"):
    """A background-training model over a new library whose training is held; released and closed at the end."""
    lib = _library(tmp_path / "lib")
    held = Held(monkeypatch)
    model = _model(lib, kind, "background")  # returned while its training is held
    try:
        yield lib, held, model
    finally:
        held.release.set()
        model.close()


@pytest.mark.parametrize("kind", ["phatgoose", "glider"])
def test_a_model_serves_at_once_and_ends_where_training_first_would(tmp_path, monkeypatch, kind):
    reference = _model(_library(tmp_path / "ref"), kind, "now")  # the same library; trains before it is returned
    with held_model(tmp_path, monkeypatch, kind) as (lib, held, model):  # returned while training is held
        assert model.pending_routing == ["e0", "e1"] and model.experts == ["e0", "e1"]
        assert lib.routing_kinds("e0") == []  # nothing trained or stored yet
        for mix in ({"e0": 1.0}, {"e0": 0.5, "e1": 0.5}):  # by name: exact at once
            assert torch.equal(_out(model, mix), _out(reference, mix))
        _out(model)
        used = _used(model.last_routing)
        if kind == "phatgoose":  # a local gate alone never chooses an expert without gates
            assert used == [set(), set()]
        else:  # GLIDER's global stage works from its index: the rows get their candidates, weighed by score
            assert all(u for u in used)
        held.release.set()
        assert model.wait_routing(HANG_GUARD)
        assert model.pending_routing == [] and model.routing_errors == {}
        assert torch.equal(_out(model), _out(reference))  # bitwise where the model that trained first is
        assert model.last_routing[0].to_json() == reference.last_routing[0].to_json()
        assert ExpertLibrary.open(lib.root).routing_kinds("e0") == ["phatgoose"]  # stored for the next load


def test_a_swap_of_trained_gates_never_changes_a_call_under_way(tmp_path, monkeypatch):
    with held_model(tmp_path, monkeypatch) as (_, held, model):
        enc = _enc(model)
        with model.routing(enc["input_ids"], enc["attention_mask"]) as state:  # routed before the gates are in
            before = model(**enc).logits
            held.release.set()
            assert model.wait_routing(HANG_GUARD)
            during = model(**enc).logits  # the same call, after the swap: it keeps the routing it started with
        assert torch.equal(before, during)
        assert _used(state.trace()) == [set(), set()]
        assert not torch.equal(model(**enc).logits, before)  # a new call routes with the trained gates


def test_an_expert_another_process_adds_is_usable_at_once_and_routed_once_trained(tmp_path, monkeypatch):
    lib = _library(tmp_path / "lib")
    model = _model(lib, "phatgoose", "background")  # e0, e1 trained at load (nothing held yet)
    assert model.wait_routing(HANG_GUARD)
    held = Held(monkeypatch)
    try:
        other = ExpertLibrary.open(lib.root)  # another process's view of the folder
        new = rand_expert(tiny_chat_llama(), "new", seed=7, description="expert new", examples=EXAMPLES)
        other.add(new)
        report = model.sync_library()  # returns before its gates are trained
        assert report.added == ["new"] and model.pending_routing == ["new"]
        fresh = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(lib.root), "arrow",
                                         tokenizer=tiny_tokenizer(), follow=False)
        assert torch.equal(_out(model, {"new": 1.0}), _out(fresh, {"new": 1.0}))  # usable by name at once
        _out(model)
        assert all("new" not in u for u in _used(model.last_routing))
        # replaced while its first version trains: that version's gates are dropped, the new one's come in
        other.add(rand_expert(tiny_chat_llama(), "new", seed=8, examples=EXAMPLES), overwrite=True)
        assert model.sync_library().replaced == ["new"]
        held.release.set()
        assert model.wait_routing(HANG_GUARD) and model.routing_errors == {}
        assert model.router._digest["new"] == model.get_expert("new").digest() == other.get("new").digest()
        assert "new" in model.router.vectors[next(iter(model.router.vectors))]
        assert ExpertLibrary.open(lib.root).routing_kinds("new") == ["phatgoose"]
    finally:
        held.release.set()
        model.close()


def test_an_expert_whose_training_fails_stays_usable_by_name_and_says_why(tmp_path, monkeypatch):
    lib = _library(tmp_path / "lib")
    held = Held(monkeypatch)
    held.fail.add("e1")
    held.release.set()
    with pytest.warns(RuntimeWarning, match="'e1' could not be trained: no gates for e1"):
        model = _model(lib, "phatgoose", "background")
        assert model.wait_routing(HANG_GUARD)
    try:
        assert model.routing_errors == {"e1": "RuntimeError: no gates for e1"} and model.pending_routing == []
        assert model.experts == ["e0", "e1"]
        _out(model, {"e1": 1.0})  # by name it serves
        _out(model)
        assert all("e1" not in u for u in _used(model.last_routing))  # the local gate never chooses it
        assert ExpertLibrary.open(lib.root).routing_kinds("e1") == []
    finally:
        model.close()


def test_an_expert_removed_while_it_waits_is_never_trained(tmp_path, monkeypatch):
    with held_model(tmp_path, monkeypatch) as (_, held, model):
        assert held.reached.wait(HANG_GUARD) and held.started == ["e0"]  # e0 trains, e1 waits its turn
        model.remove_expert("e1", persist=False)
        held.release.set()
        assert model.wait_routing(HANG_GUARD)
        assert held.started == ["e0"] and model.pending_routing == [] and model.routing_errors == {}


def test_closing_the_model_drops_what_is_queued(tmp_path, monkeypatch):
    lib = _library(tmp_path / "lib")
    held = Held(monkeypatch)
    model = _model(lib, "phatgoose", "background")
    model.close()
    held.release.set()
    assert model.wait_routing(HANG_GUARD)
    assert held.started in ([], ["e0"])  # at most the one under way when it closed
    assert model.router.deferred == {"e0", "e1"}  # nothing swapped in after close
    with pytest.raises(ValueError, match="train_routing must be one of"):
        MoErgeModel.from_library(tiny_chat_llama(), lib, "arrow", tokenizer=tiny_tokenizer(), follow=False,
                                 train_routing="later")
