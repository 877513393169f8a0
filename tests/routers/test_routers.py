"""Router registry and the contracts of the fixed and explicit routers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moerge import Candidates
from moerge.errors import RoutingError
from moerge.routers import build_router, list_routers, register_router, router_class
from moerge.routing import Router, RoutingRequest, candidates_from_mixes

NAMES = ("a", "b", "c")


def _request(batch=2, experts=None):
    return RoutingRequest(input_ids=torch.ones(batch, 3, dtype=torch.long), attention_mask=None, names=NAMES,
                          experts=experts)


def test_registry_lists_and_builds_routers():
    assert {"explicit", "fixed", "arrow"} <= set(list_routers())
    r = build_router("fixed", weights={"a": 1.0})
    assert r.name == "fixed" and r.config.weights == {"a": 1.0}
    with pytest.raises(RoutingError, match="unknown router 'nope'"):
        build_router("nope")
    with pytest.raises(RoutingError, match="its options are"):
        build_router("fixed", wieghts={"a": 1.0})


@pytest.mark.parametrize("name", list_routers())
def test_every_router_is_documented_and_configurable(name):
    cls = router_class(name)
    assert "Paper:" in (cls.__doc__ or "")
    for f in dataclasses.fields(cls.config_class):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


@pytest.mark.parametrize("config,match", [
    ({"weights": {}}, "non-empty dict"),
    ({"weights": {"a": float("inf")}}, "finite number"),
    ({"weights": {"a": "x"}}, "finite number"),
])
def test_fixed_config_validation_quotes_the_bad_value(config, match):
    with pytest.raises(ValueError, match=match):
        build_router("fixed", **config)


def test_register_router_refuses_a_second_class_under_one_name():
    with pytest.raises(ValueError, match="already registered"):
        @register_router("fixed")
        class Other(Router):
            pass


def test_fixed_router_contract():
    r = build_router("fixed", weights={"c": 0.25, "a": 0.75})
    c = r.select(_request(batch=3))
    assert c.batch_size == 3 and c.names == NAMES
    for b in range(3):
        assert c.row_names(b) == ["c", "a"]
        assert c.weights[b].tolist() == [0.25, 0.75]
    uniform = build_router("fixed").select(_request())
    assert torch.allclose(uniform.weights.sum(1), torch.ones(2))
    with pytest.raises(RoutingError, match="unknown experts"):
        build_router("fixed", weights={"zz": 1.0}).select(_request())


def test_explicit_router_contract():
    r = build_router("explicit")
    c = r.select(_request(experts=[{"a": 1.0}, {"b": 0.5, "c": 0.5}]))
    assert c.ids.tolist() == [[0, -1], [1, 2]] and c.weights.tolist() == [[1.0, 0.0], [0.5, 0.5]]
    n = build_router("explicit", normalize=True).select(_request(experts=[{"a": 2.0}, {"b": 1.0, "c": 3.0}]))
    assert n.weights.tolist() == [[1.0, 0.0], [0.25, 0.75]]
    with pytest.raises(RoutingError, match="experts="):
        r.select(_request())
    with pytest.raises(RoutingError, match="sum to 0"):
        build_router("explicit", normalize=True).select(_request(experts=[{"a": 0.0}, {"b": 1.0}]))


def test_candidates_validate_their_shapes():
    with pytest.raises(RoutingError, match="twice"):
        Candidates(torch.tensor([[0, 0]]), torch.zeros(1, 2), NAMES)
    with pytest.raises(RoutingError, match="out of range"):
        Candidates(torch.tensor([[3]]), torch.zeros(1, 1), NAMES)
    with pytest.raises(RoutingError, match="must both be"):
        Candidates(torch.tensor([0]), torch.zeros(1), NAMES)
    c = candidates_from_mixes([{"a": 1.0}], NAMES, batch_size=2).repeat_rows(3)
    assert c.ids.shape == (6, 1) and c.weights.tolist() == [[1.0]] * 6


@pytest.mark.parametrize("router", ["arrow", "phatgoose", "xlora", "arrow-all", "arrow-bf16"])
def test_the_fast_decode_step_equals_the_general_path(router, monkeypatch):
    """The per-request closure a CPU step runs (GatheredModule.fast_step) against the general path of GatheredModule.mix, for
    each kind of linear gate, top-k and all-candidates selection, float32 and bfloat16."""
    import copy
    import warnings

    from moerge import MoErgeModel
    from moerge.routers import build_router
    from moerge.runtime.gathered import GatheredModule

    from helpers import VOCAB, rand_expert, tiny_llama

    base = tiny_llama()
    kind = router.split("-")[0]
    r = build_router(kind, top_k=None if router == "arrow-all" else 2)
    if router == "arrow-bf16":
        base = base.to(torch.bfloat16)
    model = MoErgeModel(copy.deepcopy(base), r)
    experts = [rand_expert(base, f"e{i}", seed=i, rank=2 + i % 3) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.expert_set.install(experts, model.router)
    g = torch.Generator().manual_seed(5)
    for e in experts:  # gates and head rows with some spread, so the top-k is not a tie
        if kind == "phatgoose":
            r.set_gates(e.name, {m: torch.randn(w.in_features, generator=g) for m, w in e.modules.items()})
        if kind == "xlora":
            r.set_rows(e.name, {m: (torch.randn(w.in_features, generator=g), torch.randn((), generator=g))
                                for m, w in e.modules.items()})
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    calls = []
    real = GatheredModule.fast_step
    monkeypatch.setattr(GatheredModule, "fast_step", lambda self, sel: calls.append(1) or real(self, sel))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        fast_usage = model.last_routing
        monkeypatch.setattr(GatheredModule, "fast_step", lambda self, sel: None)
        general = model(input_ids=ids).logits
    assert calls
    tol = dict(atol=1e-5, rtol=1e-5) if router != "arrow-bf16" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast, general, **tol)
    for a, b in zip(fast_usage, model.last_routing):
        assert a.experts == pytest.approx(b.experts, abs=1e-5)


def test_excluded_experts_are_never_used():
    import copy

    from moerge import MoErgeModel
    from moerge.errors import RoutingError
    from moerge.routers import build_router

    from helpers import VOCAB, rand_expert, tiny_llama

    base = tiny_llama()
    model = MoErgeModel(copy.deepcopy(base), build_router("arrow", top_k=2))
    model.expert_set.install([rand_expert(base, f"e{i}", seed=i) for i in range(4)], model.router)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
                       exclude=["e0", "e2"])
    for row in model.last_routing:
        assert set(row.candidates) == {"e1", "e3"} and set(row.experts) == {"e1", "e3"}
        assert sum(row.experts.values()) == pytest.approx(1.0, abs=1e-5)
    fixed = MoErgeModel(copy.deepcopy(base), build_router("explicit"))
    fixed.expert_set.install([rand_expert(base, f"e{i}", seed=i) for i in range(2)], fixed.router)
    state = fixed.route(ids, experts={"e0": 0.5, "e1": 0.5}, exclude=["e0"])
    assert state.candidates.weights.tolist() == [[0.0, 1.0], [0.0, 1.0]]  # renormalised over the rest
    with pytest.raises(RoutingError, match="unknown experts"):
        fixed.route(ids, experts={"e0": 1.0}, exclude=["nope"])
