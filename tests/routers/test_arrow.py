"""Arrow: numerically PEFT's Arrow on the same adapters, and the local-gate contract."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.routers.arrow import prototype

from helpers import VOCAB, save_peft_lora, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def adapters(tmp_path):
    base = tiny_llama(0)
    return base, [save_peft_lora(base, tmp_path / f"task{i}", seed=20 + i, r=4, target_modules=TARGETS)
                  for i in range(4)]


def _arrow_library(tmp_path, base, paths):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, p in enumerate(paths):
        lib.add_peft(p, name=f"t{i}")
    return lib


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 1.0), (3, 0.5), (4, 2.0)])
def test_arrow_matches_peft(tmp_path, adapters, input_ids, monkeypatch, top_k, temperature):
    from peft import ArrowConfig as PeftArrowConfig
    from peft import create_arrow_model
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    base, paths = adapters
    # PEFT finds the prototype by 15 power iterations; run it to convergence so both sides are exact
    real = ArrowLoraLinearLayer.top_right_singular_vec_from_BA
    monkeypatch.setattr(ArrowLoraLinearLayer, "top_right_singular_vec_from_BA",
                        lambda self, A, B, iters=15, eps=1e-8: real(self, A, B, iters=2000, eps=eps))
    peft_model = create_arrow_model(copy.deepcopy(base), [str(p) for p in paths],
                                    PeftArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0))
    with torch.no_grad():
        reference = peft_model(input_ids=input_ids).logits
    model = MoErgeModel.from_library(base, _arrow_library(tmp_path, base, paths),
                                     router=build_router("arrow", top_k=top_k, temperature=temperature))
    with torch.no_grad():
        ours = model(input_ids=input_ids).logits
        plain = model.copy_base()(input_ids=input_ids).logits
    assert (reference - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_prototype_is_the_top_right_singular_vector():
    torch.manual_seed(0)
    from moerge import DeltaWeights, LoRAWeights

    w = LoRAWeights(torch.randn(4, 24), torch.randn(16, 4), 2.0)
    _, _, Vh = torch.linalg.svd(w.delta_weight())
    p = prototype(w)
    assert abs(float(p @ Vh[0])) == pytest.approx(1.0, abs=1e-5)
    d = DeltaWeights(torch.randn(16, 24))
    assert abs(float(prototype(d) @ torch.linalg.svd(d.delta)[2][0])) == pytest.approx(1.0, abs=1e-5)


def test_arrow_gate_contract(tmp_path, adapters):
    base, paths = adapters
    model = MoErgeModel.from_library(base, _arrow_library(tmp_path, base, paths), router=build_router("arrow", top_k=2))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    state = model.route(ids)
    layer = model.base.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 7, 32)
    w = model.router.gate(x, state.candidates, layer.info)
    assert w.shape == (2, 7, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 7))  # weights sum to 1 over the chosen experts
    assert int((w > 0).sum(-1).max()) <= 2  # top-k respected
    assert torch.equal(w, model.router.gate(x, state.candidates, layer.info))  # deterministic
    # a module no expert targets gets no weight at all
    up = model.router.gate(torch.randn(2, 7, 32), state.candidates,
                           type(layer.info)(99, "model.layers.0.mlp.up_proj", 32, 64))
    assert torch.equal(up, torch.zeros(2, 7, 4))
    # rows of a batch are routed independently, and the trace records per-layer usage
    with torch.no_grad():
        batched = model(input_ids=ids).logits
        row = model(input_ids=ids[1:]).logits
    torch.testing.assert_close(batched[1:], row, atol=1e-5, rtol=1e-5)
    usage = model.last_routing[0].layer_usage
    assert "model.layers.0.self_attn.q_proj" in usage and "model.layers.0.mlp.up_proj" not in usage
    assert sum(usage["model.layers.0.self_attn.q_proj"].values()) == pytest.approx(1.0, abs=1e-5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    nocache = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             use_cache=False)
    assert torch.equal(out, nocache)


def test_adding_an_expert_leaves_other_prototypes_alone(tmp_path, adapters):
    base, paths = adapters
    model = MoErgeModel.from_library(base, _arrow_library(tmp_path, base, paths[:3]), router="arrow")
    model.router.read_routing(model.expert_set.names)  # made on first use otherwise
    before = {m: {n: p.clone() for n, p in d.items()} for m, d in model.router.vectors.items()}
    assert before and all(set(d) == {"t0", "t1", "t2"} for d in before.values())
    model.add_expert(paths[3], name="t3")
    model.router.read_routing(["t3"])
    for m, d in before.items():
        for n, p in d.items():
            assert torch.equal(model.router.vectors[m][n], p)
    assert set(model.router.vectors["model.layers.0.self_attn.q_proj"]) == {"t0", "t1", "t2", "t3"}
    model.remove_expert("t1")
    assert "t1" not in model.router.vectors["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("kwargs,match", [({"top_k": 0}, "positive integer"), ({"temperature": 0}, "> 0")])
def test_arrow_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_router("arrow", **kwargs)


def test_prototypes_are_made_when_a_call_first_needs_them(tmp_path, adapters, input_ids, monkeypatch):
    """Building a model reads no weights for Arrow; the first call makes the prototypes of its candidates (every
    expert, for Arrow alone), outside the model's lock, and answers as a router that made them up front."""
    from moerge.library.experts import ExpertFiles

    base, paths = adapters
    lib = _arrow_library(tmp_path, base, paths[:3])
    eager = MoErgeModel.from_library(copy.deepcopy(base), lib, router="arrow", follow=False, pin=lib.names())
    eager.router.read_routing(lib.names())
    want = eager(input_ids=input_ids).logits
    reads, real = [], ExpertFiles.load
    monkeypatch.setattr(ExpertFiles, "load", lambda self, name, files: (reads.append(name), real(self, name, files))[1])
    model = MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.open(lib.root), router="arrow", follow=False)
    assert reads == [] and len(model.router.vectors) == 0
    assert torch.equal(model(input_ids=input_ids).logits, want)
    assert sorted(set(reads)) == ["t0", "t1", "t2"]
    n = len(reads)
    assert torch.equal(model(input_ids=input_ids).logits, want) and len(reads) == n  # nothing read again
