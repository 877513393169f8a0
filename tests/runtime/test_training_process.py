"""Routing data trained in a forked child process (``train_in="process"``, the default where ``fork`` exists): the
child trains on the model's base and router as they are, gives back its result or its error, and never holds the
model's lock or the serving process's GIL while it trains; closing the model kills a child training in the
background.

The child is held by files (it writes ``started`` and waits for ``release``), so that a call runs while it trains is
a fact of the order of events, not of timing (the waits' timeouts only guard against a hang)."""

from __future__ import annotations

import os
import pickle
import threading
import time

import pytest
import torch

import moerge.routers.phatgoose as pg
from moerge import ExpertLibrary, MoErgeModel
from moerge.core.forked import ChildProcessError_, can_fork, run_forked
from moerge.routers import build_router

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

pytestmark = pytest.mark.skipif(not can_fork(), reason="no fork on this platform: training stays in-process")

EXAMPLES = ["reverse: a b c", "reverse: x y", "reverse: one two three"]
HANG_GUARD = 300  # seconds; only a child that never ends reaches it


def _wait_for(path, timeout=HANG_GUARD):
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path.name} never appeared"
        time.sleep(0.01)


def _model(tmp_path, train_in="process", **kw):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(("e0", "e1")):
        lib.add(rand_expert(base, n, seed=i, description=f"expert {n}", examples=EXAMPLES))
    router = build_router("phatgoose", top_k=2, train_steps=3, train_batch_size=2)
    return MoErgeModel.from_library(base, lib, router=router, tokenizer=tiny_tokenizer(), follow=False,
                                    train_in=train_in, **kw)


def _held_training(monkeypatch, folder, fail=False):
    """Training that writes its pid to ``started``, then waits for the file ``release`` (in the child)."""
    real = pg.train_phatgoose_gates

    def held(*a, **kw):
        (folder / "started.tmp").write_text(str(os.getpid()))
        (folder / "started.tmp").rename(folder / "started")  # whole when it appears
        _wait_for(folder / "release")
        if fail:
            raise ValueError("no gates today (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(pg, "train_phatgoose_gates", held)


def test_an_add_trains_in_a_child_while_calls_run_and_the_gates_are_the_same(tmp_path, monkeypatch):
    model = _model(tmp_path)
    assert model.train_in == "process"
    tok = model.tokenizer
    enc = tok(["reverse: p q r"], return_tensors="pt")
    before = model.generate(**enc, max_new_tokens=4, do_sample=False)
    _held_training(monkeypatch, tmp_path)
    new = rand_expert(tiny_chat_llama(), "new", seed=7, description="expert new", examples=EXAMPLES)
    added: list = []
    adder = threading.Thread(target=lambda: added.append(model.add_expert(new)))
    adder.start()
    _wait_for(tmp_path / "started")
    assert int((tmp_path / "started").read_text()) != os.getpid()  # trained in another process
    # while the child trains: calls run (the lock is free, the GIL is ours) and see the model as it was
    assert torch.equal(model.generate(**enc, max_new_tokens=4, do_sample=False), before)
    assert "new" not in model.experts
    (tmp_path / "release").write_text("")
    adder.join(HANG_GUARD)
    assert added and model.experts == ["e0", "e1", "new"]
    gates = model.router.gates_of("new")
    assert model.router.losses["new"]  # the child's losses came back with its gates
    stored, info = ExpertLibrary.open(model.library.root).get_routing("new", "phatgoose")
    assert info["digest"] == new.digest() and all(torch.equal(stored[m], g) for m, g in gates.items())
    # the same training in this process gives the same gates (up to the order of float sums: one thread there)
    monkeypatch.undo()
    here = _model(tmp_path / "here", train_in="thread")
    here.add_expert(new)
    for m, g in here.router.gates_of("new").items():
        torch.testing.assert_close(gates[m], g, rtol=1e-4, atol=1e-5)


def test_a_failure_in_the_child_is_raised_here_and_changes_nothing(tmp_path, monkeypatch):
    model = _model(tmp_path)
    files = sorted(p.relative_to(model.library.root) for p in model.library.root.rglob("*") if p.is_file())
    _held_training(monkeypatch, tmp_path, fail=True)
    (tmp_path / "release").write_text("")
    with pytest.raises(ValueError, match="no gates today"):
        model.add_expert(rand_expert(tiny_chat_llama(), "new", seed=7, examples=EXAMPLES))
    assert model.experts == ["e0", "e1"]
    assert sorted(p.relative_to(model.library.root) for p in model.library.root.rglob("*") if p.is_file()) == files


def test_closing_the_model_kills_a_child_training_in_the_background(tmp_path, monkeypatch):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(rand_expert(base, "e0", seed=0, examples=EXAMPLES))
    _held_training(monkeypatch, tmp_path)  # never released: only the kill ends it
    model = MoErgeModel.from_library(base, lib, router=build_router("phatgoose", train_steps=2), follow=False,
                                     tokenizer=tiny_tokenizer(), train_routing="background", train_in="process")
    _wait_for(tmp_path / "started")
    child = int((tmp_path / "started").read_text())
    model.close()
    assert model.wait_routing(HANG_GUARD)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed and reaped
    assert model.routing_errors == {} and model.router.deferred == {"e0"}


def test_run_forked_gives_back_results_and_errors():
    assert run_forked(lambda: {"pid": os.getpid(), "t": torch.ones(3)})["pid"] != os.getpid()
    with pytest.raises(KeyError, match="boom"):
        run_forked(lambda: {}["boom"])

    class Unpicklable(Exception):
        def __reduce__(self):
            raise pickle.PicklingError("no")

    def raises_unpicklable():
        raise Unpicklable("odd")

    with pytest.raises(RuntimeError, match="Unpicklable: odd"):
        run_forked(raises_unpicklable)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ChildProcessError_, match="cancelled"):
        run_forked(lambda: time.sleep(HANG_GUARD), cancel=cancel)
