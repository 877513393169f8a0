"""Two tiers when the experts' banks are on an accelerator: the banks hold at most ``device_cache_bytes`` (least
recently used dropped), and a host tier keeps what was read from the library within ``cache_bytes``, so an expert
dropped from the device comes back without a read of its files. Answers equal those of a model holding every
expert.

The ``gpu`` test runs it on CUDA. Without one, the same logic runs with the banks on the CPU and the model told they
are on an accelerator (``_banks_device``): what is checked there is the book-keeping, not the copies."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import MoErgeModel
from moerge.runtime.cache import ExpertCache, HostTier, Residency

from helpers import CACHE_NAMES, six_expert_library, tiny_chat_llama, tiny_tokenizer

NAMES = CACHE_NAMES
MIXES = [[{"e0": 1.0}, {"e1": 0.5, "e2": 0.5}], [{"e3": 1.0}, {"e4": 0.7, "e5": 0.3}],
         [{"e0": 0.2, "e5": 0.8}, {"e2": 1.0}], [{"e1": 1.0}, {"e3": 0.5, "e0": 0.5}]]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return six_expert_library(tmp_path_factory.mktemp("tiers") / "lib")


@pytest.fixture(params=["cpu-as-accelerator", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def device(request, monkeypatch):
    if request.param == "cuda":
        return "cuda"
    monkeypatch.setattr(Residency, "_banks_device", lambda self: torch.device("cuda"))
    return "cpu"


def _model(lib, device, **kw):
    return MoErgeModel.from_library(tiny_chat_llama().to(device), lib, router="fixed", tokenizer=tiny_tokenizer(),
                                    follow=False, **kw)


def _run(model, device):
    tok = tiny_tokenizer()
    enc = tok(["reverse: p q r", "reverse: hello there"], return_tensors="pt", padding=True).to(device)
    return [model(**enc, experts=mix).logits.cpu() for mix in MIXES + MIXES[::-1] + MIXES]


def _same(got, want, device):
    for a, b in zip(got, want, strict=True):
        if device == "cpu":
            assert torch.equal(a, b)
        else:  # other slots in the banks: the same numbers, gathered from other rows
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_device_budget_bounds_the_banks_and_the_host_tier_spares_the_files(lib, device, reads):
    everything = _model(lib, device, pin=NAMES)
    want = _run(everything, device)
    sizes = everything.expert_set.cache.sizes
    device_budget = max(sizes.values()) * 3  # about three experts on the device
    reads.clear()
    model = _model(lib, device, device_cache_bytes=device_budget)  # cache_bytes None: the host tier keeps all
    _same(_run(model, device), want, device)
    stats = model.cache_stats()
    assert stats.budget_bytes == device_budget and stats.resident_bytes <= device_budget
    assert stats.evictions > 0 and stats.misses > len(NAMES)  # experts left the device and came back ...
    assert sorted(reads) == NAMES  # ... each read from its files once, then from host memory
    assert stats.host_hits == stats.misses - len(NAMES)
    assert stats.host_resident == len(NAMES) and stats.host_budget_bytes is None
    if device == "cuda":
        for layer in model.expert_set.layers.values():
            assert layer.bank.A_all.is_cuda
        held = sum(t.nbytes for e in model.expert_set.cache.host.held.values() for w in e[1].modules.values()
                   for t in w.tensors("m").values() if t.device.type == "cpu")
        assert held == stats.host_bytes  # the host tier is in host memory


def test_the_host_tier_keeps_within_cache_bytes(lib, device, reads):
    want = _run(_model(lib, device, pin=NAMES), device)
    probe = _model(lib, device, device_cache_bytes=1)  # two tiers, the host one unbounded: every expert kept
    _run(probe, device)
    host_sizes = {n: e[2] for n, e in probe.expert_set.cache.host.held.items()}
    host_budget = host_sizes["e0"] + host_sizes["e1"] + 1
    reads.clear()
    model = _model(lib, device, cache_bytes=host_budget, device_cache_bytes=1)  # one call's experts at a time
    _same(_run(model, device), want, device)
    stats = model.cache_stats()
    assert stats.host_bytes <= host_budget and stats.host_budget_bytes == host_budget
    assert len(reads) > len(NAMES)  # what the host tier let go was read again


def test_banks_in_host_memory_are_one_tier_under_cache_bytes(lib, reads):
    everything = _model(lib, "cpu", pin=NAMES)
    want = _run(everything, "cpu")
    budget = max(everything.expert_set.cache.sizes.values()) * 3
    model = _model(lib, "cpu", cache_bytes=budget, device_cache_bytes=1)  # no accelerator: the device budget is moot
    _same(_run(model, "cpu"), want, "cpu")
    stats = model.cache_stats()
    assert stats.budget_bytes == budget and stats.resident_bytes <= budget
    assert (stats.host_resident, stats.host_bytes, stats.host_hits, stats.host_budget_bytes) == (0, 0, 0, None)
    assert model.expert_set.cache.host.held == {}


def test_a_host_entry_serves_only_the_source_it_was_read_from(lib):
    model = _model(lib, "cpu")
    source = model.expert_set.cache.sources["e0"]
    expert = source.load()
    tier = HostTier(budget=None)
    tier.put(source, expert)
    assert tier.get("e0", source) is expert and tier.hits == 1
    assert tier.get("e0", copy.copy(source)) is None  # the expert was replaced: read it again
    assert tier.get("e1", source) is None
    small = HostTier(budget=tier.used - 1)
    small.put(source, expert)  # larger than the whole budget: not kept
    assert small.held == {} and small.used == 0


def test_replacing_an_expert_forgets_its_host_copy():
    cache = ExpertCache(budget=None, device_budget=10)
    cache.on_device = True
    a, b = object(), object()
    cache.know("x", a, 4, resident=False)
    cache.host.held["x"] = (a, None, 4)
    cache.know("x", a, 4, resident=True)  # the same source: kept
    assert "x" in cache.host.held
    cache.know("x", b, 4, resident=False)  # another source: dropped
    assert "x" not in cache.host.held
    cache.host.held["x"] = (b, None, 4)
    cache.forget("x")
    assert "x" not in cache.host.held


def test_without_a_device_budget_the_banks_on_an_accelerator_are_one_tier(lib, device, reads):
    everything = _model(lib, device, pin=NAMES)
    want = _run(everything, device)
    budget = max(everything.expert_set.cache.sizes.values()) * 3
    reads.clear()
    model = _model(lib, device, cache_bytes=budget)  # as before two tiers existed: cache_bytes bounds the banks
    _same(_run(model, device), want, device)
    stats = model.cache_stats()
    assert stats.budget_bytes == budget and stats.resident_bytes <= budget and stats.evictions > 0
    assert (stats.host_resident, stats.host_bytes, stats.host_hits, stats.host_budget_bytes) == (0, 0, 0, None)
    assert len(reads) == stats.misses  # nothing kept twice: every miss read from the files


def test_moving_the_banks_keeps_each_tiers_budget(lib, monkeypatch):
    where = {"device": torch.device("cuda")}
    monkeypatch.setattr(Residency, "_banks_device", lambda self: where["device"])
    sizes = _model(lib, "cpu", pin=NAMES).expert_set.cache.sizes
    model = _model(lib, "cpu", device_cache_bytes=max(sizes.values()) * 2)
    _run(model, "cpu")
    assert model.cache_stats().host_resident == len(NAMES)
    where["device"] = torch.device("cpu")  # as after model.to("cpu"): one tier, the host copies dropped
    model.to(torch.float32)
    stats = model.cache_stats()
    assert model.expert_set.cache.host.held == {} and stats.host_budget_bytes is None
    _run(model, "cpu")  # one tier without a budget: every expert stays in the banks
    assert model.cache_stats().resident == len(NAMES)
    where["device"] = torch.device("cuda")  # as after model.to("cuda"): the device budget applies at once
    model.to(torch.float32)
    stats = model.cache_stats()
    assert stats.resident_bytes <= max(sizes.values()) * 2 and stats.evictions > 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_a_bad_device_budget_is_refused(lib, bad):
    with pytest.raises(ValueError, match="device_cache_bytes"):
        _model(lib, "cpu", device_cache_bytes=bad)


def test_the_servers_metrics_report_the_host_tier(lib, device):
    pytest.importorskip("prometheus_client")
    from moerge.serving.metrics import _CacheCollector

    model = _model(lib, device, device_cache_bytes=1)
    _run(model, device)
    got = {m.name: m.samples[0].value for m in _CacheCollector(model.cache_stats).collect()}
    stats = model.cache_stats()
    assert got["moerge_expert_cache_host_hits"] == stats.host_hits > 0
    assert got["moerge_expert_cache_host_resident"] == len(NAMES)
    assert got["moerge_expert_cache_host_bytes"] == stats.host_bytes
