"""Property tests (hypothesis): library round trips, routing invariants, merge invariants."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moerge import Expert, ExpertLibrary, ExpertMetadata, LoRAWeights, MoErgeModel
from moerge.adapters.expert import DeltaWeights
from moerge.adapters.merge import list_merge_methods, merge_module
from moerge.core.fingerprint import linear_modules
from moerge.routers import build_router
from moerge.routing import select_weights

from helpers import VOCAB, rand_expert, tiny_llama

BASE = tiny_llama()
SHAPES = {m: s for m, s in linear_modules(BASE).items() if not m.endswith("lm_head")}
MODULES = sorted(SHAPES)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,  # the same examples on every run: no flaky CI
                    suppress_health_check=[HealthCheck.too_slow])
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True).filter(lambda n: ".." not in n)


@st.composite
def experts(draw, name=None):
    mods = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=5, unique=True))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for m in mods:
        out_f, in_f = SHAPES[m]
        if draw(st.booleans()):
            r = draw(st.integers(1, 6))
            weights[m] = LoRAWeights(torch.randn(r, in_f, generator=g).to(dtype),
                                     torch.randn(out_f, r, generator=g).to(dtype),
                                     draw(st.floats(0.01, 64, allow_nan=False)))
        else:
            bias = torch.randn(out_f, generator=g).to(dtype) if draw(st.booleans()) else None
            weights[m] = DeltaWeights(torch.randn(out_f, in_f, generator=g).to(dtype), bias)
    meta = ExpertMetadata(description=draw(st.text(max_size=40)),
                          examples=draw(st.lists(st.text(max_size=20), max_size=3)))
    return Expert(name or draw(names), weights, meta)


def _same(a: Expert, b: Expert) -> None:
    assert a.name == b.name and set(a.modules) == set(b.modules)
    assert a.metadata.description == b.metadata.description and a.metadata.examples == b.metadata.examples
    for m, w in a.modules.items():
        v = b.modules[m]
        assert type(w) is type(v)
        for x, y in zip(w.tensors(m).values(), v.tensors(m).values()):
            assert x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(w, LoRAWeights):
            assert w.scale == v.scale


# names unique regardless of case: a library refuses names that differ only in case (they would share a folder on
# case-insensitive file systems)
@SETTINGS
@given(st.lists(experts(), min_size=1, max_size=4, unique_by=lambda e: e.name.lower()))
def test_library_round_trip(batch):
    with tempfile.TemporaryDirectory() as d:
        lib = ExpertLibrary.create(Path(d) / "lib", base_model=BASE)
        for e in batch:
            lib.add(e)
        again = ExpertLibrary.open(lib.root)
        assert again.names() == [e.name for e in batch]  # order of addition kept
        for e in batch:
            _same(e, again.get(e.name))
        assert again.verify() == []


@st.composite
def logits(draw):
    b, t, k = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    values = draw(st.lists(st.one_of(st.floats(-30, 30, allow_nan=False), st.just(float("-inf"))),
                           min_size=b * t * k, max_size=b * t * k))
    return torch.tensor(values, dtype=torch.float32).reshape(b, t, k)


@SETTINGS
@given(logits(), st.one_of(st.none(), st.integers(1, 6)))
def test_selected_weights_are_a_distribution_over_at_most_top_k(z, top_k):
    w = select_weights(z, top_k)
    assert w.shape == z.shape and (w >= 0).all() and torch.isfinite(w).all()
    finite = torch.isfinite(z)
    assert (w[~finite] == 0).all()  # a candidate that cannot be chosen gets nothing
    sums = w.sum(-1)
    has = finite.any(-1)
    torch.testing.assert_close(sums[has], torch.ones_like(sums[has]))  # weights sum to 1 ...
    assert (sums[~has] == 0).all()  # ... or to 0 when no candidate can be chosen
    if top_k is not None:
        assert ((w > 0).sum(-1) <= top_k).all()
    # a larger logit never gets a smaller weight
    zi, wi = z.reshape(-1, z.shape[-1]), w.reshape(-1, w.shape[-1])
    for zr, wr in zip(zi, wi):
        for i in range(len(zr)):
            for j in range(len(zr)):
                if zr[i] > zr[j] and wr[j] > 0:
                    assert wr[i] >= wr[j] - 1e-6


MODEL = MoErgeModel(copy.deepcopy(BASE), build_router("arrow", top_k=2))
MODEL.expert_set.install([rand_expert(BASE, f"e{i}", seed=i, rank=2 + i % 3) for i in range(5)], MODEL.router)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**16))
def test_a_batch_is_routed_as_its_rows_alone(b, t, seed):
    ids = torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        batched = MODEL(input_ids=ids).logits
        for r in range(b):
            torch.testing.assert_close(batched[r:r + 1], MODEL(input_ids=ids[r:r + 1]).logits, atol=1e-5, rtol=1e-5)
    for row in MODEL.last_routing:
        assert sum(row.experts.values()) == pytest.approx(1.0, abs=1e-5)


@st.composite
def deltas(draw):
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    d = {f"e{i}": torch.randn(5, 7, generator=g) for i in range(n)}
    w = {k: draw(st.floats(0.05, 2.0)) for k in d}
    return d, w


DETERMINISTIC = [m for m in list_merge_methods() if not m.startswith("dare")]


@SETTINGS
@given(deltas(), st.sampled_from(DETERMINISTIC), st.randoms(use_true_random=False))
def test_merges_ignore_the_order_of_experts(dw, method, rnd):
    d, w = dw
    order = list(w)
    rnd.shuffle(order)
    merged = merge_module(d, w, method)
    assert merged.shape == (5, 7) and torch.isfinite(merged).all()
    torch.testing.assert_close(merge_module(d, {k: w[k] for k in order}, method), merged, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(deltas(), st.floats(0.1, 3.0))
def test_linear_merges_are_linear(dw, c):
    d, w = dw
    expected = sum(w[k] * d[k] for k in d)
    torch.testing.assert_close(merge_module(d, w, "task_arithmetic"), expected, atol=1e-5, rtol=1e-5)
    scaled = merge_module(d, {k: c * v for k, v in w.items()}, "task_arithmetic")
    torch.testing.assert_close(scaled, c * expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merge_module(d, w, "linear"), expected, atol=1e-5, rtol=1e-5)
    mean = merge_module(d, w, "linear", normalize=True)  # a weighted average: invariant to scaling the weights
    torch.testing.assert_close(merge_module(d, {k: c * v for k, v in w.items()}, "linear", normalize=True), mean,
                               atol=1e-5, rtol=1e-4)
