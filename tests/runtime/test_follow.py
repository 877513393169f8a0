"""A running model follows its library folder: experts added, replaced or removed there by any process are taken in
(or dropped) all or nothing, an expert whose routing data cannot be made is never visible, the model's own changes
are not applied twice, and the routing index on disk keeps experts other processes added.

The sync logic is tested by calling ``sync_library()`` directly; the follower thread by a CLI subprocess adding an
expert while the model generates, waited for on the follower's own signal (the waits' timeouts only guard against
a hang)."""

from __future__ import annotations

import copy
import gc
import hashlib
import os
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import torch

import moerge.routers.phatgoose as pg
from moerge import ExpertLibrary, MoErgeModel
from moerge.errors import LibraryError, RoutingError
from moerge.library.index import ExpertIndex
from moerge.routers import build_router
from moerge.routing.embed import CallableEmbedder

from helpers import rand_expert, save_peft_lora, tiny_chat_llama, tiny_tokenizer

EXAMPLES = ["reverse: a b c", "reverse: x y", "reverse: one two three"]
HANG_GUARD = 300  # seconds; only a deadlock or a follower that never syncs reaches it


def _library(tmp_path):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(("e0", "e1")):
        lib.add(rand_expert(base, n, seed=i, description=f"expert {n}", examples=EXAMPLES))
    return lib


def _model(lib, router="arrow", follow=False, **kw):
    router = build_router(router, **kw) if isinstance(router, str) else router
    return MoErgeModel.from_library(tiny_chat_llama(), lib, router=router, tokenizer=tiny_tokenizer(), follow=follow)


def _ids(tok):
    return tok(["reverse: p q r", "reverse: hello there"], return_tensors="pt", padding=True)


def _out(model, enc, experts):
    return model.generate(**enc, max_new_tokens=4, do_sample=False, experts=experts)


def _same_as_fresh(model, lib_root, experts):
    """``model``'s output with ``experts`` is bitwise that of a model freshly loaded from the library."""
    enc = _ids(model.tokenizer)
    fresh = _model(ExpertLibrary.open(lib_root))
    return torch.equal(_out(model, enc, experts), _out(fresh, enc, experts))


# ---------------------------------------------------------------------------------------------------------------
# sync_library: the logic, deterministic
# ---------------------------------------------------------------------------------------------------------------
def test_experts_added_replaced_and_removed_elsewhere_are_taken_in(tmp_path):
    lib = _library(tmp_path)
    model = _model(lib)
    enc = _ids(model.tokenizer)
    before = _out(model, enc, {"e0": 1.0})
    other = ExpertLibrary.open(lib.root)  # another object on the folder, as another process has
    other.add(rand_expert(tiny_chat_llama(), "new", seed=5, description="expert new"))
    assert "new" not in model.experts
    report = model.sync_library()
    assert report.added == ["new"] and not (report.replaced or report.removed or report.failed)
    assert model.experts == ["e0", "e1", "new"]
    assert _same_as_fresh(model, lib.root, {"new": 1.0})
    assert torch.equal(_out(model, enc, {"e0": 1.0}), before)  # nothing else changed

    replacement = rand_expert(tiny_chat_llama(), "e0", seed=9, description="expert e0, again")
    other.add(replacement, overwrite=True)
    report = model.sync_library()
    assert report.replaced == ["e0"] and not (report.added or report.removed)
    m = next(iter(replacement.modules))
    assert torch.equal(model.get_expert("e0").modules[m].A, replacement.modules[m].A)
    assert _same_as_fresh(model, lib.root, {"e0": 1.0})

    other.remove("e1")
    report = model.sync_library()
    assert report.removed == ["e1"] and model.experts == ["e0", "new"]
    with pytest.raises(RoutingError, match="unknown expert"):
        _out(model, enc, {"e1": 1.0})
    assert not model.sync_library().changed  # nothing new: nothing done
    assert model.library_errors == {}


def test_an_expert_whose_routing_data_fails_is_not_taken_in_and_the_model_serves_on(tmp_path, monkeypatch):
    lib = _library(tmp_path)
    model = _model(lib, "phatgoose", top_k=2, train_steps=2, train_batch_size=2)
    enc = _ids(model.tokenizer)
    routed = model.generate(**enc, max_new_tokens=4, do_sample=False)
    other = ExpertLibrary.open(lib.root)
    other.add(rand_expert(tiny_chat_llama(), "new", seed=5, description="expert new", examples=EXAMPLES))
    real = pg.train_phatgoose_gates

    def broken(*args, **kwargs):
        raise RuntimeError("gate training failed (injected)")

    monkeypatch.setattr(pg, "train_phatgoose_gates", broken)
    with pytest.warns(RuntimeWarning, match="'new'.*injected"):
        report = model.sync_library()
    assert list(report.failed) == ["new"] and not report.changed
    assert "injected" in model.library_errors["new"]
    assert model.experts == ["e0", "e1"]
    with pytest.raises(RoutingError):
        model.router.gates_of("new")
    assert torch.equal(model.generate(**enc, max_new_tokens=4, do_sample=False), routed)  # serving as before
    assert not model.sync_library().failed  # the same version is not tried again
    assert other.verify() == [] and "new" in other  # the library is left as it is
    monkeypatch.setattr(pg, "train_phatgoose_gates", real)
    other.add(rand_expert(tiny_chat_llama(), "new", seed=6, description="expert new", examples=EXAMPLES),
              overwrite=True)
    assert model.sync_library().added == ["new"]  # a new version is tried, and taken in
    assert model.library_errors == {} and "new" in model.experts
    assert ExpertLibrary.open(lib.root).routing_kinds("new") == ["phatgoose"]  # its trained gates are stored


def test_the_models_own_changes_are_not_applied_again(tmp_path, monkeypatch):
    lib = _library(tmp_path)
    model = _model(lib)
    prepared: list[str] = []
    real_prepare = model.router.prepare_expert
    monkeypatch.setattr(model.router, "prepare_expert", lambda e: prepared.append(e.name) or real_prepare(e))
    during: list = []
    real_on_add = model.router.on_add_expert

    def on_add(expert, data=None):  # in the swap, after the library was written: a sync in another thread now
        t = threading.Thread(target=lambda: during.append(model.sync_library()))
        t.start()
        t.join(HANG_GUARD)
        real_on_add(expert, data)

    monkeypatch.setattr(model.router, "on_add_expert", on_add)
    model.add_expert(rand_expert(tiny_chat_llama(), "new", seed=5))
    assert during[0].deferred == ["new"] and not during[0].changed  # left to the model's own change
    assert prepared == ["new"]
    monkeypatch.setattr(model.router, "on_add_expert", real_on_add)
    assert not model.sync_library().changed and prepared == ["new"]  # not added a second time
    model.remove_expert("e0")
    assert not model.sync_library().changed and model.experts == ["e1", "new"]  # not re-added either
    model.add_expert(rand_expert(tiny_chat_llama(), "e1", seed=8), overwrite=True)
    assert not model.sync_library().changed and prepared == ["new", "e1"]
    model.remove_expert("e1", persist=False)  # out of this model only: the library keeps it, the model leaves it out
    assert not model.sync_library().changed and "e1" in ExpertLibrary.open(lib.root)


def test_an_expert_the_model_holds_as_its_own_is_not_replaced_by_the_librarys(tmp_path):
    lib = _library(tmp_path)
    model = _model(lib)
    mine = rand_expert(tiny_chat_llama(), "x", seed=3)
    model.add_expert(mine, persist=False)
    other = ExpertLibrary.open(lib.root)
    other.add(rand_expert(tiny_chat_llama(), "x", seed=4))
    with pytest.warns(RuntimeWarning, match="'x'.*holds its own expert"):
        report = model.sync_library()
    assert list(report.failed) == ["x"] and "persist=False" in model.library_errors["x"]
    m = next(iter(mine.modules))
    assert torch.equal(model.get_expert("x").modules[m].A, mine.modules[m].A)
    other.remove("x")
    assert not model.sync_library().changed  # the model's own stays; the report of the clash goes
    assert "x" in model.experts and model.library_errors == {}


def test_removing_an_expert_another_process_removed_is_a_clear_library_error(tmp_path):
    lib = _library(tmp_path)
    model = _model(lib)
    ExpertLibrary.open(lib.root).remove("e1")
    with pytest.raises(LibraryError, match="'e1'.*no longer holds this expert: another process removed it"):
        model.remove_expert("e1")
    assert "e1" in model.experts  # nothing changed ...
    assert model.sync_library().removed == ["e1"]  # ... until the model syncs
    with pytest.raises(LibraryError, match="the model has no expert 'e1'"):
        model.remove_expert("e1")
    model.add_expert(rand_expert(tiny_chat_llama(), "mine", seed=3), persist=False)
    model.remove_expert("mine")  # never in the library: removed from the model alone


def _hash_embedder() -> CallableEmbedder:
    def encode(texts):
        return np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
                         .standard_normal(16) for t in texts])

    return CallableEmbedder(encode, id="hash-16", dim=16)


def test_the_stored_index_keeps_experts_added_elsewhere_and_drops_removed_ones(tmp_path):
    lib = _library(tmp_path)

    def glider_model():
        return _model(ExpertLibrary.open(lib.root), "glider", local="none", embedder=_hash_embedder())

    def stored():
        return sorted(ExpertIndex.load(lib.routing_dir / "index").names)

    a, b = glider_model(), glider_model()  # two servers on one library
    assert stored() == ["e0", "e1"]
    b.add_expert(rand_expert(tiny_chat_llama(), "from_b", seed=3, description="b's"))
    assert stored() == ["e0", "e1", "from_b"]
    a.add_expert(rand_expert(tiny_chat_llama(), "from_a", seed=4, description="a's"))  # a has not synced
    assert stored() == ["e0", "e1", "from_a", "from_b"]
    ExpertLibrary.open(lib.root).remove("e0")  # e.g. `moerge library rm`
    a.add_expert(rand_expert(tiny_chat_llama(), "again", seed=6, description="a's second"))
    assert stored() == ["again", "e1", "from_a", "from_b"]
    assert a.sync_library().added == ["from_b"] and a.router.retrieve(["b's"], 1)[0] == [["from_b"]]


# ---------------------------------------------------------------------------------------------------------------
# the follower thread
# ---------------------------------------------------------------------------------------------------------------
def test_an_expert_added_by_the_cli_reaches_a_generating_model(tmp_path):
    lib = _library(tmp_path)
    model = _model(lib, follow=True)
    enc = _ids(model.tokenizer)
    expected = _out(model, enc, {"e0": 0.7, "e1": 0.3})
    folder = save_peft_lora(tiny_chat_llama(), tmp_path / "peft", seed=11)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = subprocess.Popen([sys.executable, "-m", "moerge.cli", "library", "add", str(folder), "--name", "new",
                            "--library", str(lib.root), "--description", "the new expert"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    outputs = []
    while cli.poll() is None:  # the model serves while the other process adds
        outputs.append(_out(model, enc, {"e0": 0.7, "e1": 0.3}))
    assert cli.returncode == 0, cli.stdout.read().decode()
    assert model.follower.wait(lambda: "new" in model.experts, HANG_GUARD)
    assert all(torch.equal(o, expected) for o in outputs)  # calls never changed by the add
    assert model.library_errors == {}
    assert _same_as_fresh(model, lib.root, {"new": 1.0})
    ExpertLibrary.open(lib.root).remove("new")
    assert model.follower.wait(lambda: "new" not in model.experts, HANG_GUARD)
    assert torch.equal(_out(model, enc, {"e0": 0.7, "e1": 0.3}), expected)
    model.close()
    assert model.follower is None


def test_the_follower_never_keeps_the_model_alive_and_stops_with_it(tmp_path):
    lib = _library(tmp_path)
    model = _model(lib)
    follower = model.follow_library(interval=3600)  # waiting, holding nothing
    assert follower.running
    twin = copy.deepcopy(model)
    assert twin.follower is None  # a copy does not follow
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    follower._thread.join(HANG_GUARD)
    assert not follower.running
    other = _model(lib, follow=True)
    thread = other.follower
    other.unpatch()
    assert other.follower is None and not thread.running
