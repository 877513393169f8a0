"""Experts read on demand: a model built from a library reads no expert's weights until a call needs them, holds
its experts' factors within a byte budget (least recently used evicted, pinned ones kept), and answers exactly as a
model that holds every expert. A weights file that disagrees with the manifest, or is gone, fails the call that
needs it with the expert and file named, and changes nothing else."""

from __future__ import annotations

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.errors import LibraryError
from moerge.library.experts import ExpertFiles

from helpers import CACHE_NAMES, rand_expert, six_expert_library, tiny_chat_llama, tiny_tokenizer

NAMES = CACHE_NAMES


@pytest.fixture
def lib(tmp_path):
    return six_expert_library(tmp_path / "lib")


def _model(lib, **kw):
    return MoErgeModel.from_library(tiny_chat_llama(), lib, router="fixed", tokenizer=tiny_tokenizer(),
                                    follow=False, **kw)


def _enc():
    tok = tiny_tokenizer()
    return tok(["reverse: p q r", "reverse: hello there"], return_tensors="pt", padding=True)


MIXES = [[{"e0": 1.0}, {"e1": 0.5, "e2": 0.5}], [{"e3": 1.0}, {"e4": 0.7, "e5": 0.3}],
         [{"e0": 0.2, "e5": 0.8}, {"e2": 1.0}], [{"e1": 1.0}, {"e3": 0.5, "e0": 0.5}]]


def _run(model):
    enc = _enc()
    return [model(**enc, experts=mix).logits for mix in MIXES + MIXES[::-1]]


def _size(model, name):
    return model.expert_set.cache.sizes[name]


def test_building_a_model_reads_no_weights_and_a_call_reads_only_its_experts(lib, reads):
    model = _model(lib)
    assert reads == [] and model.experts == NAMES
    stats = model.cache_stats()
    assert (stats.resident, stats.resident_bytes, stats.experts, stats.misses) == (0, 0, 6, 0)
    model(**_enc(), experts=[{"e1": 1.0}, {"e4": 0.5, "e2": 0.0}])  # a weight of 0: e2 is not needed
    assert sorted(reads) == ["e1", "e4"]
    model(**_enc(), experts={"e4": 1.0})
    stats = model.cache_stats()
    assert (stats.misses, stats.hits, stats.resident) == (2, 1, 2)
    assert stats.resident_bytes == _size(model, "e1") + _size(model, "e4")
    assert sorted(reads) == ["e1", "e4"]  # read once each


def test_answers_under_a_small_budget_equal_those_with_every_expert_in_memory(lib):
    everything = _model(lib, pin=NAMES)  # every expert read at once, never evicted
    assert everything.cache_stats().resident == 6
    want = _run(everything)
    small = max(_size(everything, n) for n in NAMES) * 3  # about three experts fit
    model = _model(lib, cache_bytes=small)
    got = _run(model)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    stats = model.cache_stats()
    assert stats.evictions > 0 and stats.budget_bytes == small
    assert stats.resident_bytes <= small
    # what the banks hold is what the book says
    held = {n for layer in model.expert_set.layers.values() for n in layer.bank.names}
    assert held == set(model.expert_set.cache.resident)


def test_least_recently_used_experts_are_evicted_first_and_pinned_ones_never(lib):
    probe = _model(lib, pin=NAMES)
    budget = sum(_size(probe, n) for n in ("e0", "e1", "e2"))
    model = _model(lib, cache_bytes=budget, pin=["e0"])
    assert model.cache_stats().resident == 1  # the pinned one, read at once
    for n in ("e1", "e2"):
        model(**_enc(), experts={n: 1.0})
    model(**_enc(), experts={"e1": 1.0})  # e1 used again: e2 is now the least recently used
    model(**_enc(), experts={"e3": 1.0})
    resident = list(model.expert_set.cache.resident)
    assert "e0" in resident and "e3" in resident and "e2" not in resident
    assert model.cache_stats().resident_bytes <= budget
    for n in ("e4", "e5", "e2", "e1"):
        model(**_enc(), experts={n: 1.0})
        assert "e0" in model.expert_set.cache.resident


def test_a_budget_smaller_than_one_call_still_answers_it(lib):
    model = _model(lib, cache_bytes=1)
    want = _model(lib, pin=NAMES)
    enc = _enc()
    mix = [{"e0": 0.5, "e1": 0.5}, {"e2": 1.0}]
    assert torch.equal(model(**enc, experts=mix).logits, want(**enc, experts=mix).logits)
    model(**enc, experts={"e3": 1.0})  # the previous call's experts go
    assert list(model.expert_set.cache.resident) == ["e3"]


def test_experts_held_only_in_memory_are_never_evicted(lib):
    model = _model(lib, cache_bytes=1)
    extra = rand_expert(tiny_chat_llama(), "mem", seed=42)
    model.add_expert(extra, persist=False)
    for n in NAMES:
        model(**_enc(), experts={n: 1.0})
    assert "mem" in model.expert_set.cache.resident and model.cache_stats().pinned == 1
    assert model.get_expert("mem").digest() == extra.digest()


def test_an_expert_added_through_the_library_can_be_evicted_and_read_back(lib):
    model = _model(lib, cache_bytes=1)
    new = rand_expert(tiny_chat_llama(), "new", seed=77)
    model.add_expert(new)
    want = _model(lib, pin=[*NAMES, "new"])(**_enc(), experts={"new": 1.0}).logits
    model(**_enc(), experts={"e0": 1.0})
    assert "new" not in model.expert_set.cache.resident
    assert torch.equal(model(**_enc(), experts={"new": 1.0}).logits, want)
    assert model.get_expert("new").digest() == new.digest()


@pytest.mark.parametrize("damage", ["changed", "gone"])
def test_a_weights_file_damaged_after_the_model_was_built_fails_only_the_calls_that_need_it(lib, damage):
    model = _model(lib)
    before = model(**_enc(), experts={"e1": 1.0}).logits
    path = lib.root / "experts" / "e3" / "weights.safetensors"
    if damage == "changed":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    stats = model.cache_stats()
    with pytest.raises(LibraryError) as err:
        model(**_enc(), experts=[{"e1": 1.0}, {"e3": 1.0}])
    assert err.value.expert == "e3" and err.value.file == str(path)
    after = model.cache_stats()
    assert (after.resident, after.resident_bytes, after.evictions) == (stats.resident, stats.resident_bytes, 0)
    assert torch.equal(model(**_enc(), experts={"e1": 1.0}).logits, before)


def test_merge_and_get_expert_read_an_expert_that_is_not_in_memory(lib, reads):
    model = _model(lib)
    assert model.get_expert("e2").digest() == lib.get("e2").digest()
    plain = model.merge({"e2": 1.0, "e5": 0.5})
    assert isinstance(plain, torch.nn.Module) and model.cache_stats().resident == 0  # nothing kept


def test_a_routed_call_reads_the_candidates_its_router_chose(lib, reads):
    from moerge.routers import build_router

    model = MoErgeModel.from_library(tiny_chat_llama(), lib, router=build_router("arrow", top_k=2),
                                     tokenizer=tiny_tokenizer(), follow=False, cache_bytes=10**9)
    reads.clear()  # Arrow computes its prototypes from every expert's factors once, when it takes them in
    model(**_enc())
    assert sorted(reads) == NAMES  # Arrow's candidates are every expert: all of them are needed
    assert model.cache_stats().resident == 6


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_a_bad_budget_is_refused(lib, bad):
    with pytest.raises(ValueError, match="cache_bytes"):
        _model(lib, cache_bytes=bad)


def test_pinning_an_expert_the_model_does_not_load_is_refused(lib):
    with pytest.raises(LibraryError, match="pin") as err:
        _model(lib, pin=["e0", "nope"])
    assert err.value.expert == "nope"


def test_a_forked_child_reads_experts_with_its_own_reader_threads(lib):
    from moerge.core.forked import can_fork, run_forked

    if not can_fork():
        pytest.skip("no fork on this platform")
    model = _model(lib)
    model(**_enc(), experts=[{"e0": 1.0}, {"e1": 1.0}])  # two missing experts: the reader threads exist now
    es = model.expert_set

    def in_child():
        with es.lock:
            es.ensure_resident(["e2", "e3", "e4"])  # the parent's reader threads do not exist in the child
            return sorted(es.cache.resident)

    assert run_forked(in_child, hold=es.lock) == ["e0", "e1", "e2", "e3", "e4"]
    assert sorted(es.cache.resident) == ["e0", "e1"]  # the parent is unchanged


def test_stored_experts_of_one_layout_share_it(tmp_path):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(rand_expert(base, "a", seed=1))
    lib.add(rand_expert(base, "b", seed=2))  # the same modules, ranks and scale
    lib.add(rand_expert(base, "c", seed=3, scale=3.0))
    a, b, c = (lib.stored(n) for n in "abc")
    assert a.layout is b.layout and a.layout_key is b.layout_key
    assert c.layout is not a.layout and c.layout_key == a.layout_key  # same shapes, another scale
    assert a.spec() == lib.get("a").spec() and c.spec() == lib.get("c").spec()


def test_a_call_reads_its_missing_experts_without_holding_up_other_calls(lib, monkeypatch):
    import threading

    model = _model(lib)
    enc = _enc()
    want = _model(lib, pin=NAMES)
    warm = model(**enc, experts={"e0": 1.0}).logits  # e0 is in memory now
    inside, release = threading.Event(), threading.Event()
    real = ExpertFiles.load

    def held_load(self, name, files):  # the read of e5 waits until the other call is done
        if name == "e5":
            inside.set()
            assert release.wait(300), "never released"
        return real(self, name, files)

    monkeypatch.setattr(ExpertFiles, "load", held_load)
    out: list = []
    cold = threading.Thread(target=lambda: out.append(model(**enc, experts={"e5": 1.0}).logits))
    cold.start()
    assert inside.wait(300)
    # the cold call is reading e5: a call on an expert in memory routes and runs meanwhile (with the lock held
    # by the read, it would wait for the release that only comes after it)
    assert torch.equal(model(**enc, experts={"e0": 1.0}).logits, warm)
    release.set()
    cold.join(300)
    assert torch.equal(out[0], want(**enc, experts={"e5": 1.0}).logits)
    assert model.cache_stats().misses == 2


def test_an_expert_replaced_while_it_was_read_is_taken_in_as_its_new_version(lib, monkeypatch):
    import threading

    model = _model(lib)
    enc = _enc()
    real = ExpertFiles.load
    replaced = threading.Event()

    def load_then_replace(self, name, files):  # the old version is read, then the model takes in the new one
        got = real(self, name, files)
        if name == "e2" and not replaced.is_set():
            replaced.set()
            lib.add(rand_expert(tiny_chat_llama(), "e2", seed=99, rank=3), overwrite=True)
            model.sync_library()
        return got

    monkeypatch.setattr(ExpertFiles, "load", load_then_replace)
    got = model(**enc, experts={"e2": 1.0}).logits
    fresh = _model(ExpertLibrary.open(lib.root), pin=["e2"])
    assert torch.equal(got, fresh(**enc, experts={"e2": 1.0}).logits)  # the new version, not the one read first


def test_a_read_that_fails_midway_through_the_banks_leaves_them_and_the_book_in_agreement(lib, monkeypatch):
    from moerge.runtime.bank import ModuleBank

    want = _model(lib, pin=NAMES)
    model = _model(lib, cache_bytes=_size(want, "e2"))  # e2 alone fits: e0 must go when it comes
    enc = _enc()
    model(**enc, experts={"e0": 1.0})
    real, calls = ModuleBank.swapped, []

    def failing(self, evict, weights):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("injected")
        return real(self, evict, weights)

    monkeypatch.setattr(ModuleBank, "swapped", failing)
    with pytest.raises(MemoryError):
        model(**enc, experts={"e2": 1.0})  # e0 evicted and e2 read, both half done when it fails
    monkeypatch.setattr(ModuleBank, "swapped", real)
    held = {n for layer in model.expert_set.layers.values() for n in layer.bank.names}
    assert held == set(model.expert_set.cache.resident) == set()
    for n in ("e0", "e2"):
        assert torch.equal(model(**enc, experts={n: 1.0}).logits, want(**enc, experts={n: 1.0}).logits)


def test_a_call_during_the_removal_of_an_expert_not_in_memory_still_gets_it(lib, monkeypatch):
    model = _model(lib)
    enc = _enc()
    want = _model(lib, pin=NAMES)(**enc, experts={"e3": 1.0}).logits
    real = type(lib).remove
    during: list = []

    def remove(self, name):  # the files are gone, the model has not dropped the expert yet
        real(self, name)
        during.append(model(**enc, experts={"e3": 1.0}).logits)

    monkeypatch.setattr(type(lib), "remove", remove)
    model.remove_expert("e3")
    assert torch.equal(during[0], want) and "e3" not in model.experts
    assert "e3" not in model.expert_set.cache.resident and not model.expert_set.cache.held


def test_setting_another_router_reads_no_weights(lib, reads):
    model = _model(lib, cache_bytes=1)
    model.set_router("fixed")
    assert reads == []


def test_sizes_follow_the_banks_dtype(lib):
    model = _model(lib, pin=["e0"])
    before = model.cache_stats().resident_bytes
    model.to(torch.bfloat16)
    stats = model.cache_stats()
    assert stats.resident_bytes * 2 == before
    assert stats.resident_bytes == sum(layer.bank.size_of("e0") for layer in model.expert_set.layers.values())


def test_a_swap_writes_the_new_expert_into_the_evicted_ones_rows(tmp_path):
    """At the budget, a cold expert takes the rows of the one it evicts (same rank): nothing else is copied."""
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "same", base_model=base)
    lib.add_many([rand_expert(base, f"s{i}", seed=i, rank=4) for i in range(3)])
    want = _model(lib, pin=lib.names())
    model = _model(lib, cache_bytes=int(_size(want, "s1") * 2.6))  # two fit; a third evicts one (to 80 %)
    enc = _enc()
    for n in ("s0", "s1"):
        model(**enc, experts={n: 1.0})
    layers = list(model.expert_set.layers.values())
    before = [(layer.bank.A_all.data_ptr(), layer.bank.A_all.shape) for layer in layers]
    got = model(**enc, experts={"s2": 1.0}).logits  # evicts s0 (least recently used), reads s2 into its rows
    assert set(model.expert_set.cache.resident) == {"s1", "s2"}
    assert [(layer.bank.A_all.data_ptr(), layer.bank.A_all.shape) for layer in layers] == before
    assert torch.equal(got, want(**enc, experts={"s2": 1.0}).logits)
    for n in ("s1", "s0", "s2", "s1", "s0"):  # back and forth: still the answers of the model holding everything
        assert torch.equal(model(**enc, experts={n: 1.0}).logits, want(**enc, experts={n: 1.0}).logits)
    assert model.cache_stats().evictions >= 4


def _bank_of_three():
    from moerge import LoRAWeights
    from moerge.runtime.bank import ModuleBank

    g = torch.Generator().manual_seed(0)
    w = {n: LoRAWeights(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), 2.0) for n in "abcd"}
    bank = ModuleBank.empty(8, 6, torch.device("cpu"), torch.float32).with_experts({"a": w["a"], "b": w["b"]})
    return bank.with_experts({"c": w["c"]}), w


def _same_weights(bank, name, w):
    got = bank.weights_of(name)
    return torch.equal(got.A, w.A) and torch.equal(got.B, w.B)


def test_a_swap_through_a_pickled_bank_never_writes_where_it_does_not_read():
    import pickle

    bank, w = _bank_of_three()
    copy = pickle.loads(pickle.dumps(bank))  # no longer shares its storage's memory
    swapped = copy.swapped({"a"}, {"d": w["d"]})
    assert _same_weights(swapped, "d", w["d"]) and all(_same_weights(swapped, n, w[n]) for n in "bc")
    assert all(_same_weights(bank, n, w[n]) for n in "abc")  # the original bank untouched


def test_a_swap_that_cannot_allocate_writes_no_row(monkeypatch):
    from moerge import LoRAWeights
    from moerge.runtime.bank import ModuleBank

    bank, w = _bank_of_three()
    big = LoRAWeights(torch.randn(8, 8), torch.randn(6, 8), 1.0)  # rank 8: no free rows of that rank

    def no_memory(self, rows):
        raise MemoryError("injected")

    monkeypatch.setattr(ModuleBank, "_room_for", no_memory)
    with pytest.raises(MemoryError):
        bank.swapped({"a"}, {"d": w["d"], "e": big})  # d would take a's rows; e needs new ones
    assert all(_same_weights(bank, n, w[n]) for n in "abc")  # a's rows were not written
    monkeypatch.undo()
    dropped = bank.dropped({"a", "b"})
    assert dropped.names == ["c"] and dropped.storage is None and _same_weights(dropped, "c", w["c"])


def test_a_swap_does_not_write_rows_a_request_still_reads_where_they_lie():
    """A request on CPU reads its candidates' rows in the bank itself (no copy): a swap that evicts one of them
    must not write a new expert into those rows while the request lives, and may once it is gone."""
    import gc

    from moerge.routing import Candidates

    bank, w = _bank_of_three()
    cands = Candidates(torch.tensor([[0, 2]]), torch.ones(1, 2), ("a", "b", "c"), torch.tensor([[0.7, 0.3]]))
    g = bank.gather(cands)
    assert not g.lora.copied and g.lora.bank is not None  # reads the bank's rows
    a_rows = bank.A_all[bank.lora["a"].start: bank.lora["a"].start + 4].clone()
    x = torch.randn(1, 1, 8)
    want = g.mix(x, torch.zeros(1, 1, 6), None).y
    swapped = bank.swapped({"a"}, {"d": w["d"]})  # d has a's rank: a's rows would be its place
    assert _same_weights(swapped, "d", w["d"]) and all(_same_weights(swapped, n, w[n]) for n in "bc")
    assert swapped.lora["d"].start != bank.lora["a"].start
    assert torch.equal(bank.A_all[bank.lora["a"].start: bank.lora["a"].start + 4], a_rows)
    assert torch.equal(g.mix(x, torch.zeros(1, 1, 6), None).y, want)  # the request's answer is unchanged
    b_only = swapped.gather(Candidates(torch.tensor([[1]]), torch.ones(1, 1), ("a", "b", "c"), torch.ones(1, 1)))
    assert b_only.lora.bank is not None  # a request reading b's rows only, begun after a was evicted
    del g
    gc.collect()
    again = swapped.swapped({"b"}, {"e": w["a"]})  # now nothing reads a's old rows: e may take them
    assert again.lora["e"].start == bank.lora["a"].start and _same_weights(again, "e", w["a"])
    del b_only
    gc.collect()
    c_only = again.gather(Candidates(torch.tensor([[2]]), torch.ones(1, 1), ("a", "b", "c"), torch.ones(1, 1)))
    third = again.swapped({"e"}, {"f": w["b"]})  # b's rows, freed above, are read by no one: f takes them
    assert third.lora["f"].start == swapped.lora["b"].start and _same_weights(third, "f", w["b"])
    assert c_only.lora.bank.reads(again.lora["c"].start, again.lora["c"].start + 4)  # c's reader never blocked it
