"""MoErgeModel: equivalence with PEFT's LoRA, mixing math, merge, batching, generate, live add/remove."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import Expert, ExpertLibrary, LoRAWeights, MoErgeModel
from moerge.adapters.peft_loader import load_peft_lora
from moerge.errors import BaseMismatchError, LibraryError, RoutingError
from moerge.routing import Router
from moerge.runtime.layer import ExpertLinear

from helpers import VOCAB, peft_logits, save_peft_lora, tiny_gpt2, tiny_llama


def _library(tmp_path, base, adapters: dict[str, dict]) -> ExpertLibrary:
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, (name, kwargs) in enumerate(adapters.items()):
        folder = save_peft_lora(base, tmp_path / f"peft-{name}", seed=10 + i, **kwargs)
        lib.add_peft(folder, name=name, description=f"the {name} expert")
    return lib


@pytest.fixture
def lib2(tmp_path, base):
    return _library(tmp_path, base, {
        "a": dict(r=4, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
    })


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# ---------------------------------------------------------------------------------------------------------------
# Equivalence with PEFT's LoRA forward: one table of adapter configurations
# ---------------------------------------------------------------------------------------------------------------
PEFT_CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "all-linear": dict(r=2, lora_alpha=16, target_modules="all-linear"),
    "rank_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                         rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}),
    "alpha_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          alpha_pattern={"v_proj": 32}),
    "rslora": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "gate_proj"]),
    "rslora+rank_pattern": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                rank_pattern={"v_proj": 2}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_single_expert_matches_peft(tmp_path, base, input_ids, case):
    folder = save_peft_lora(base, tmp_path / "adapter", seed=3, **PEFT_CASES[case])
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add_peft(folder, name="x")
    reference = peft_logits(base, folder, input_ids)
    model = MoErgeModel.from_library(base, lib)
    ours = _logits(model, input_ids, experts={"x": 1.0})
    plain = _logits(model.base, input_ids)  # no routing active: exactly the base
    assert (reference - plain).abs().max() > 1e-3, "the adapter must change the output for this test to mean anything"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tmp_path, input_ids):
    base = tiny_gpt2(0)
    folder = save_peft_lora(base, tmp_path / "adapter", seed=5, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                            fan_in_fan_out=True)
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add_peft(folder, name="g")
    reference = peft_logits(base, folder, input_ids)
    model = MoErgeModel.from_library(base, lib)
    torch.testing.assert_close(_logits(model, input_ids, experts={"g": 1.0}), reference, atol=1e-5, rtol=1e-5)
    merged = model.merge({"g": 1.0})  # Conv1D stores (in, out): the merge must transpose
    torch.testing.assert_close(_logits(merged, input_ids), reference, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Invariants of the mixing
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("experts", [{}, {"a": 0.0}, {"a": 0.0, "b": 0.0}])
def test_zero_routing_is_exactly_the_base(base, lib2, input_ids, experts):
    reference = _logits(base, input_ids)
    model = MoErgeModel.from_library(base, lib2)
    assert torch.equal(_logits(model, input_ids, experts=experts), reference)


def test_two_expert_mix_is_the_weighted_sum(base, lib2, input_ids):
    manual = copy.deepcopy(base)
    model = MoErgeModel.from_library(base, lib2)
    layer = model.base.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, ExpertLinear)
    x = torch.randn(3, 5, 32)
    ea, eb = lib2["a"], lib2["b"]
    m = "model.layers.0.self_attn.q_proj"
    expected = layer.base_layer(x) + 0.3 * (x @ ea.modules[m].delta_weight().T) + 0.7 * (x @ eb.modules[m].delta_weight().T)
    with model.routing(input_ids, experts={"a": 0.3, "b": 0.7}):
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and at model level: the mix equals the model with both updates folded in by hand
    with torch.no_grad():
        for e, w in ((ea, 0.3), (eb, 0.7)):
            for mod, dw in e.delta_weights().items():
                manual.get_submodule(mod).weight += w * dw
    torch.testing.assert_close(_logits(model, input_ids, experts={"a": 0.3, "b": 0.7}), _logits(manual, input_ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", [{"a": 1.0}, {"a": 0.5, "b": 0.5}, {"a": -0.25, "b": 1.5}])
def test_merged_model_matches_routed(base, lib2, input_ids, weights):
    model = MoErgeModel.from_library(base, lib2)
    merged = model.merge(weights)
    assert not any(isinstance(m, ExpertLinear) for m in merged.modules()), "merge must return a plain model"
    torch.testing.assert_close(_logits(merged, input_ids), _logits(model, input_ids, experts=weights),
                               atol=1e-5, rtol=1e-5)
    # the routed model is unchanged by merging
    assert any(isinstance(m, ExpertLinear) for m in model.base.modules())


def test_merge_unties_tied_lm_head(tmp_path, input_ids):
    base = tiny_llama(0, tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    folder = save_peft_lora(base, tmp_path / "ad", seed=2, target_modules=["lm_head", "q_proj"])
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add_peft(folder, name="h")
    model = MoErgeModel.from_library(base, lib)
    merged = model.merge({"h": 1.0})
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    torch.testing.assert_close(_logits(merged, input_ids), _logits(model, input_ids, experts={"h": 1.0}),
                               atol=1e-5, rtol=1e-5)


MIXES = [{"a": 1.0}, {"b": 1.0}, {"a": 0.5, "b": 0.5}, {}]


def test_batch_rows_equal_rows_alone(base, lib2):
    model = MoErgeModel.from_library(base, lib2)
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(7))
    batched = _logits(model, ids, experts=MIXES)
    for b, mix in enumerate(MIXES):
        alone = _logits(model, ids[b : b + 1], experts=mix)
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=1e-5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), experts=MIXES, max_new_tokens=6, do_sample=False)
    for b, mix in enumerate(MIXES):
        one = model.generate(ids[b : b + 1], attention_mask=torch.ones_like(ids[b : b + 1]), experts=[mix],
                             max_new_tokens=6, do_sample=False)
        assert torch.equal(out[b], one[0])
    assert [r.experts for r in model.last_routing] == [{}]  # last call: one row, no experts


def test_batch_with_left_padding_matches_rows_alone(base, lib2):
    model = MoErgeModel.from_library(base, lib2)
    short = torch.tensor([[5, 6, 7, 8]])
    long = torch.tensor([[9, 10, 11, 12, 13, 14, 15]])
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(short)], 1),
                      torch.ones_like(long)])
    mixes = [{"a": 1.0}, {"b": 1.0}]
    out = model.generate(ids, attention_mask=mask, experts=mixes, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for b, row in enumerate((short, long)):
        one = model.generate(row, attention_mask=torch.ones_like(row), experts=[mixes[b]], max_new_tokens=5,
                             do_sample=False, pad_token_id=0)
        assert out[b, -5:].tolist() == one[0, -5:].tolist()


def test_routes_change_the_output_per_row(base, lib2, input_ids):
    model = MoErgeModel.from_library(base, lib2)
    la = _logits(model, input_ids, experts={"a": 1.0})
    lb = _logits(model, input_ids, experts={"b": 1.0})
    assert (la - lb).abs().max() > 1e-3


def test_delta_expert_reproduces_the_finetuned_model(tmp_path, base, input_ids):
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        torch.manual_seed(4)
        for name, mod in finetuned.named_modules():
            if isinstance(mod, torch.nn.Linear) and "layers.1" in name:
                mod.weight.add_(0.05 * torch.randn_like(mod.weight))
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    expert = lib.add_delta(finetuned, base, name="ft", description="a full fine-tune")
    assert expert.kind == "delta" and all("layers.1" in m for m in expert.modules)
    folder = save_peft_lora(base, tmp_path / "p", seed=9)
    model = MoErgeModel.from_library(base, lib)
    torch.testing.assert_close(_logits(model, input_ids, experts={"ft": 1.0}), _logits(finetuned, input_ids),
                               atol=1e-5, rtol=1e-5)
    # a per-row mix of a dense and a LoRA expert still equals each row alone
    model.add_expert(folder, name="lora")
    mixes = [{"ft": 1.0}, {"lora": 1.0}, {"ft": 0.5, "lora": 0.5}]
    batched = _logits(model, input_ids, experts=mixes)
    for b, mix in enumerate(mixes):
        torch.testing.assert_close(batched[b : b + 1], _logits(model, input_ids[b : b + 1], experts=mix), atol=1e-5,
                                   rtol=1e-5)
    torch.testing.assert_close(_logits(model.merge({"ft": 1.0}), input_ids), _logits(finetuned, input_ids),
                               atol=1e-5, rtol=1e-5)


def test_diff_vector_transfers_to_another_version_of_the_base(tmp_path, input_ids):
    base1 = tiny_llama(0)
    finetuned = copy.deepcopy(base1)
    base2 = copy.deepcopy(base1)  # "v2" of the base: every weight nudged
    with torch.no_grad():
        torch.manual_seed(8)
        for p in finetuned.parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
        for p in base2.parameters():
            p.add_(0.02 * torch.randn_like(p))
    expected = copy.deepcopy(base2)
    with torch.no_grad():
        for (n, p), p_ft, p_b1 in zip(expected.named_parameters(), finetuned.parameters(), base1.parameters()):
            if p.dim() == 2 and "embed" not in n:
                p.add_(p_ft - p_b1)
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base1)
    with pytest.warns(UserWarning, match="model.embed_tokens.weight"):  # embeddings are not linear: reported
        lib.add_delta(finetuned, base1, name="ft")
    with pytest.warns(UserWarning, match="differs from the library's base"):
        model = MoErgeModel.from_library(base2, lib, strict_base=False)
    torch.testing.assert_close(_logits(model, input_ids, experts={"ft": 1.0}), _logits(expected, input_ids),
                               atol=1e-5, rtol=1e-5)


def test_low_rank_delta_expert_is_close(tmp_path, base, input_ids):
    finetuned = copy.deepcopy(base)
    with torch.no_grad():  # a rank-2 change: rank 2 reproduces it exactly
        for name, mod in finetuned.named_modules():
            if isinstance(mod, torch.nn.Linear) and "self_attn" in name:
                u, v = torch.randn(mod.out_features, 2), torch.randn(2, mod.in_features)
                mod.weight.add_(0.05 * u @ v)
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    expert = lib.add_delta(finetuned, base, name="ft2", rank=2)
    assert expert.kind == "lora" and set(expert.ranks.values()) == {2}
    model = MoErgeModel.from_library(base, lib)
    torch.testing.assert_close(_logits(model, input_ids, experts={"ft2": 1.0}), _logits(finetuned, input_ids),
                               atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# generate(): drop-in behaviour
# ---------------------------------------------------------------------------------------------------------------
def test_generate_with_kv_cache_equals_without(base, lib2, input_ids):
    model = MoErgeModel.from_library(base, lib2)
    mask = torch.ones_like(input_ids)
    mixes = [{"a": 1.0}, {"b": 0.7, "a": 0.3}, {"b": 1.0}]
    with_cache = model.generate(input_ids, attention_mask=mask, experts=mixes, max_new_tokens=8, do_sample=False,
                                use_cache=True)
    without = model.generate(input_ids, attention_mask=mask, experts=mixes, max_new_tokens=8, do_sample=False,
                             use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (3, 18)


def test_generate_sampling_is_seeded_and_routed(base, lib2, input_ids):
    model = MoErgeModel.from_library(base, lib2)
    kw = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=6, do_sample=True, top_k=20)
    torch.manual_seed(0)
    s1 = model.generate(input_ids, experts={"a": 1.0}, **kw)
    torch.manual_seed(0)
    s2 = model.generate(input_ids, experts={"a": 1.0}, **kw)
    assert torch.equal(s1, s2)
    torch.manual_seed(0)
    out = model.generate(input_ids, experts={"a": 1.0}, num_return_sequences=2, **kw)
    assert out.shape[0] == 6  # rows repeated by generate keep their row's routing
    beams = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), experts=MIXES[:3], num_beams=3,
                           max_new_tokens=4, do_sample=False)
    assert beams.shape == (3, 14)


def test_generate_streamer_sees_every_token(base, lib2):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    model = MoErgeModel.from_library(base, lib2)
    ids = torch.tensor([[5, 6, 7, 8]])
    streamer = Collect()
    out = model.generate(ids, experts={"b": 1.0}, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]])
    assert torch.equal(streamed, out[0, 4:])


def test_manual_decode_loop_keeps_routing(base, lib2):
    model = MoErgeModel.from_library(base, lib2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ref = model.generate(ids, experts={"a": 1.0}, max_new_tokens=4, do_sample=False)
    with model.routing(ids, experts={"a": 1.0}), torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past, seq = out.past_key_values, ids
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
    assert torch.equal(seq, ref)


def test_last_routing_and_explain(base, lib2, input_ids):
    model = MoErgeModel.from_library(base, lib2)
    assert model.explain() == "no routed call yet"
    model.generate(input_ids, experts=[{"a": 1.0}, {"a": 0.25, "b": 0.75}, {}], max_new_tokens=2, do_sample=False)
    rows = model.last_routing
    assert [r.experts for r in rows] == [{"a": 1.0}, {"a": 0.25, "b": 0.75}, {}]
    assert rows[1].top() == "b"
    text = model.explain()
    assert "row 1: b 0.750, a 0.250" in text and "row 2: (no expert: base model)" in text


@pytest.mark.parametrize("bad,match", [
    ([{"zzz": 1.0}], "unknown expert 'zzz'"),
    ([{"a": float("nan")}], "not finite"),
    ([{"a": "x"}], "not a number"),
    ([{"a": 1.0}, {"b": 1.0}], "2 mixes for a batch of 3"),
])
def test_bad_explicit_routing_is_refused(base, lib2, input_ids, bad, match):
    model = MoErgeModel.from_library(base, lib2)
    with pytest.raises(RoutingError, match=match):
        model(input_ids=input_ids, experts=bad)


def test_explicit_router_without_experts_explains_itself(base, lib2, input_ids):
    model = MoErgeModel.from_library(base, lib2, router="explicit")
    with pytest.raises(RoutingError, match="experts="):
        model.generate(input_ids, max_new_tokens=2)


def test_fixed_router_mixes_every_row(base, lib2, input_ids):
    from moerge.routers import build_router

    fixed = MoErgeModel.from_library(base, lib2, router=build_router("fixed", weights={"a": 0.4, "b": 0.6}))
    torch.testing.assert_close(_logits(fixed, input_ids), _logits(fixed, input_ids, experts={"a": 0.4, "b": 0.6}))
    uniform = MoErgeModel.from_library(tiny_llama(0), lib2, router="fixed")
    torch.testing.assert_close(_logits(uniform, input_ids), _logits(uniform, input_ids, experts={"a": 0.5, "b": 0.5}))
    assert uniform.last_routing[0].experts == {"a": 0.5, "b": 0.5}


# ---------------------------------------------------------------------------------------------------------------
# Live changes
# ---------------------------------------------------------------------------------------------------------------
def test_add_and_remove_expert_on_a_live_model(tmp_path, base, lib2, input_ids):
    pristine = tiny_llama(0)
    model = MoErgeModel.from_library(base, lib2)
    before_a = _logits(model, input_ids, experts={"a": 1.0})
    folder = save_peft_lora(pristine, tmp_path / "new", seed=42, r=2, target_modules=["up_proj", "lm_head"])
    model.add_expert(folder, name="c", description="added later")
    assert model.experts == ["a", "b", "c"] and "c" in lib2
    assert "lm_head" in model.patched_modules  # a module no expert targeted before is patched on the fly
    reference = peft_logits(pristine, folder, input_ids)
    torch.testing.assert_close(_logits(model, input_ids, experts={"c": 1.0}), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, input_ids, experts={"a": 1.0}), before_a)  # others unchanged
    # a state gathered before a removal keeps serving the experts it started with
    state = model.route(input_ids, experts={"c": 1.0})
    model.remove_expert("c")
    assert model.experts == ["a", "b"] and "c" not in lib2
    with model.context.activate(state), torch.no_grad():
        torch.testing.assert_close(model.base(input_ids=input_ids).logits, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(RoutingError, match="unknown expert 'c'"):
        model(input_ids=input_ids, experts={"c": 1.0})
    torch.testing.assert_close(_logits(model, input_ids, experts={"a": 1.0}), before_a)
    # a reopened library sees the same experts
    assert ExpertLibrary.open(lib2.root).names() == ["a", "b"]


def test_adding_an_expert_that_does_not_fit_changes_nothing(tmp_path, base, lib2, input_ids):
    model = MoErgeModel.from_library(base, lib2)
    other = tiny_llama(0, hidden_size=48, intermediate_size=64)
    folder = save_peft_lora(other, tmp_path / "other", seed=1)
    names_before, modules_before = model.experts, model.patched_modules
    with pytest.raises(BaseMismatchError, match="maps 48"):
        model.add_expert(folder, name="wrong")
    bad = Expert("ghost", {"model.layers.0.nope": LoRAWeights(torch.randn(2, 32), torch.randn(32, 2))})
    with pytest.raises(BaseMismatchError, match="does not have"):
        model.add_expert(bad)
    with pytest.raises(LibraryError, match="already"):
        model.add_expert(lib2["a"])
    assert model.experts == names_before and model.patched_modules == modules_before
    assert lib2.names() == ["a", "b"]


def test_overwrite_replaces_an_expert(tmp_path, base, lib2, input_ids):
    pristine = tiny_llama(0)
    model = MoErgeModel.from_library(base, lib2)
    folder = save_peft_lora(pristine, tmp_path / "a2", seed=77, r=2)
    model.add_expert(folder, name="a", overwrite=True)
    torch.testing.assert_close(_logits(model, input_ids, experts={"a": 1.0}), peft_logits(pristine, folder, input_ids),
                               atol=1e-5, rtol=1e-5)
    assert lib2["a"].ranks == {m: 2 for m in lib2["a"].modules}


# ---------------------------------------------------------------------------------------------------------------
# Loading, unpatching, bases
# ---------------------------------------------------------------------------------------------------------------
def test_unpatch_restores_the_original_modules(base, lib2, input_ids):
    reference = _logits(base, input_ids)
    original = base.model.layers[0].self_attn.q_proj
    model = MoErgeModel.from_library(base, lib2)
    assert isinstance(base.model.layers[0].self_attn.q_proj, ExpertLinear)
    plain = model.unpatch()
    assert plain is base and plain.model.layers[0].self_attn.q_proj is original
    assert not any(isinstance(m, ExpertLinear) for m in plain.modules())
    assert torch.equal(_logits(plain, input_ids), reference)
    with pytest.raises(RuntimeError, match="unpatched"):
        model.generate(input_ids, experts={"a": 1.0})


def test_from_library_by_path_and_subset(tmp_path, base, lib2, input_ids):
    base.save_pretrained(tmp_path / "base")
    model = MoErgeModel.from_library(tmp_path / "base", str(lib2.root), experts=["b"])
    assert model.experts == ["b"]
    assert model.config.vocab_size == VOCAB  # attribute delegation to the base
    ref = MoErgeModel.from_library(base, lib2)
    torch.testing.assert_close(_logits(model, input_ids, experts={"b": 1.0}), _logits(ref, input_ids, experts={"b": 1.0}))


def test_other_base_is_refused_unless_allowed(base, lib2, input_ids):
    with pytest.raises(BaseMismatchError, match="hidden_size"):
        MoErgeModel.from_library(tiny_llama(0, hidden_size=48), lib2)
    other_version = tiny_llama(1)  # same architecture, other weights
    with pytest.raises(BaseMismatchError, match="strict_base=False"):
        MoErgeModel.from_library(other_version, lib2)
    with pytest.warns(UserWarning, match="differs"):
        model = MoErgeModel.from_library(other_version, lib2, strict_base=False)
    assert model.experts == ["a", "b"]


def test_bfloat16_base_runs_close_to_fp32(base, lib2, input_ids):
    model = MoErgeModel.from_library(copy.deepcopy(base).to(torch.bfloat16), lib2)
    layer = model.base.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.bank.A_all.dtype == torch.float32  # experts on a half-precision base: float32, as PEFT's
    assert layer.compute_dtype == torch.float32
    ref = _logits(MoErgeModel.from_library(base, lib2), input_ids, experts={"a": 0.5, "b": 0.5})
    got = _logits(model, input_ids, experts={"a": 0.5, "b": 0.5})
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() < 0.1
    model.to(torch.bfloat16)  # casting the model casts the experts' factors too
    assert layer.bank.A_all.dtype == layer.compute_dtype == torch.bfloat16
    model.float()
    assert layer.bank.A_all.dtype == torch.float32


class _FlakyRouter(Router):
    """Explicit routing whose routing-data hook can be made to fail, and which records what it was given."""

    name = "flaky"
    has_local_gate = False

    def __init__(self):
        super().__init__()
        self.fail = False
        self.seen: list[str] = []

    def on_add_expert(self, expert):
        if self.fail:
            raise RuntimeError("routing data failed (injected)")
        if expert.name not in self.seen:  # the contract: a name seen again replaces its routing data
            self.seen.append(expert.name)

    def on_remove_expert(self, name):
        self.seen.remove(name)

    def select(self, request):
        raise RoutingError("flaky routes only with experts=")


def test_failed_add_expert_changes_neither_model_nor_library(tmp_path, base, lib2, input_ids, monkeypatch):
    pristine = tiny_llama(0)
    router = _FlakyRouter()
    model = MoErgeModel.from_library(base, lib2, router=router)
    before = _logits(model, input_ids, experts={"a": 1.0})
    new_a = load_peft_lora(save_peft_lora(pristine, tmp_path / "a2", seed=77, r=2), name="a")
    router.fail = True
    for expert, kw in ((new_a, {"overwrite": True}), (new_a.renamed("c"), {})):
        with pytest.raises(RuntimeError, match="injected"):
            model.add_expert(expert, **kw)
    router.fail = False
    import moerge.library.manifest as library_mod

    monkeypatch.setattr(library_mod, "atomic_write_json", lambda *a: (_ for _ in ()).throw(OSError("disk (injected)")))
    for expert, kw in ((new_a, {"overwrite": True}), (new_a.renamed("c"), {})):
        with pytest.raises(OSError, match="injected"):
            model.add_expert(expert, **kw)
    monkeypatch.undo()
    assert model.experts == ["a", "b"] and lib2.names() == ["a", "b"] and sorted(router.seen) == ["a", "b"]
    torch.testing.assert_close(_logits(model, input_ids, experts={"a": 1.0}), before)
    assert ExpertLibrary.open(lib2.root).verify() == []


def test_set_router_sees_experts_that_were_not_persisted(tmp_path, base, lib2):
    model = MoErgeModel.from_library(base, lib2)
    extra = load_peft_lora(save_peft_lora(tiny_llama(0), tmp_path / "x", seed=5), name="live")
    model.add_expert(extra, persist=False)
    assert "live" not in lib2
    router = _FlakyRouter()
    model.set_router(router)
    assert router.seen == ["a", "b", "live"]
    rebuilt = model.get_expert("live")
    for m, w in extra.modules.items():
        torch.testing.assert_close(rebuilt.modules[m].delta_weight(), w.delta_weight())


def test_inputs_embeds_are_routed_per_row(base, lib2, input_ids):
    model = MoErgeModel.from_library(base, lib2)
    embeds = base.get_input_embeddings()(input_ids).detach()
    with pytest.raises(RoutingError, match="2 rows for a batch of 3"):
        model(inputs_embeds=embeds, experts=[{"a": 1.0}, {"b": 1.0}])
    mixes = [{"a": 1.0}, {"b": 1.0}, {}]
    torch.testing.assert_close(_logits(model, None, inputs_embeds=embeds, experts=mixes),
                               _logits(model, input_ids, experts=mixes))


def test_copy_base_is_plain_independent_and_keeps_ties(tmp_path, input_ids):
    base = tiny_llama(0, tie_word_embeddings=True)
    reference = _logits(base, input_ids)
    folder = save_peft_lora(base, tmp_path / "ad", seed=2, target_modules=["lm_head", "q_proj"])
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add_peft(folder, name="h")
    model = MoErgeModel.from_library(base, lib)
    with model.routing(input_ids, experts={"h": 1.0}):
        plain = model.copy_base()
        assert isinstance(model.base.lm_head, ExpertLinear)  # the live model was never unpatched
    assert not any(isinstance(m, ExpertLinear) for m in plain.modules())
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert torch.equal(_logits(plain, input_ids), reference)
    with torch.no_grad():
        plain.model.embed_tokens.weight.zero_()
    assert torch.equal(_logits(base, input_ids), reference)


def test_model_copies_saving_and_double_patching(tmp_path, base, lib2, input_ids):
    model = MoErgeModel.from_library(base, lib2)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_logits(twin, input_ids, experts={"a": 0.5, "b": 0.5}),
                               _logits(model, input_ids, experts={"a": 0.5, "b": 0.5}))
    with pytest.raises(TypeError, match="copy_base"):
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="already patched"):
        MoErgeModel.from_library(base, lib2)
    assert MoErgeModel.from_library(model.copy_base(), lib2).experts == ["a", "b"]


def test_experts_stored_in_bfloat16_under_a_float32_base(tmp_path, base, input_ids):
    from helpers import rand_expert

    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate("xy"):
        lib.add(rand_expert(base, n, seed=i).to(torch.bfloat16))
    half = MoErgeModel.from_library(copy.deepcopy(base), lib, expert_dtype=torch.bfloat16)
    full = MoErgeModel.from_library(copy.deepcopy(base), lib)  # the same bf16 values, held in float32
    layer = half.base.model.layers[0].self_attn.q_proj
    assert layer.bank.A_all.dtype == torch.bfloat16 and layer.compute_dtype == torch.float32
    assert full.base.model.layers[0].self_attn.q_proj.bank.A_all.dtype == torch.float32
    w = [{"x": 0.7, "y": 0.3}, {"y": 1.0}, {"x": 1.0}]
    with torch.no_grad():
        a = half(input_ids=input_ids, experts=w).logits
        b = full(input_ids=input_ids, experts=w).logits
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # the factors are cast once per request, exactly
    with pytest.raises(ValueError, match="expert_dtype"):
        MoErgeModel.from_library(copy.deepcopy(base), lib, expert_dtype=torch.int8)


def test_a_requests_gathered_factors_are_freed_after_generate(lib2, base, input_ids):
    import gc
    import weakref

    model = MoErgeModel.from_library(base, lib2, router="explicit")
    seen = []
    real_route = model.route

    def spy(*a, **k):
        state = real_route(*a, **k)
        seen.append(weakref.ref(state))
        g = next(x for x in state.gathered.values() if x is not None)
        seen.append(weakref.ref(g.lora.W))  # the candidates' factors copied for this request
        return state

    model.route = spy
    model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                   experts=[{"a": 0.5, "b": 0.5}])
    gc.collect()
    assert model.context.current is None and len(seen) == 2
    assert all(ref() is None for ref in seen), "the routing state and its gathered factors outlived the call"
    assert model.last_routing[0].experts == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize("seq_weights", [True, False])
def test_vectorised_gather_equals_the_row_by_row_one(seq_weights, monkeypatch):
    from moerge.routing import Candidates
    from moerge.runtime.bank import ModuleBank

    g = torch.Generator().manual_seed(0)
    bank = ModuleBank.empty(12, 10, torch.device("cpu"), torch.float32)
    ranks = {"a": 2, "b": 4, "c": 8, "d": 3}
    bank = bank.with_experts({n: LoRAWeights(torch.randn(r, 12, generator=g), torch.randn(10, r, generator=g),
                                             0.5 + i) for i, (n, r) in enumerate(ranks.items())})
    names = ("a", "b", "x", "c", "d")  # "x" does not target this module
    ids = torch.tensor([[0, 1, 3], [2, 4, -1], [3, -1, -1], [1, 0, 4]])
    weights = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.8, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])
    cands = Candidates(ids, weights.clone(), names, weights if seq_weights else None)
    monkeypatch.setattr("moerge.runtime.bank._VECTOR_GATHER_MIN", 1)  # the vectorised path even for this small batch
    fast, slow = bank.gather(cands), bank.gather(cands, loop=True)
    for field_ in ("W", "Bt", "E"):
        a, b = getattr(fast.lora, field_), getattr(slow.lora, field_)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), field_
    empty = Candidates(torch.tensor([[2, -1]]), torch.zeros(1, 2), names, None)
    assert bank.gather(empty) is None and bank.gather(empty, loop=True) is None


def test_experts_kept_on_their_own_device_stay_there_when_the_model_moves(lib2, base, input_ids):
    mix = [{"a": 0.6, "b": 0.4}] * input_ids.shape[0]
    kept = MoErgeModel.from_library(copy.deepcopy(base), lib2, router="explicit", expert_device="cpu")
    moved = MoErgeModel.from_library(copy.deepcopy(base), lib2, router="explicit")
    kept.double()
    moved.double()
    layer = kept.base.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.bank.A_all.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.float64
    assert moved.base.get_submodule("model.layers.0.self_attn.q_proj").bank.A_all.dtype == torch.float64
    with torch.no_grad():
        a = kept(input_ids=input_ids, experts=mix).logits
        b = moved(input_ids=input_ids, experts=mix).logits
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # gathered and cast per request, same result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_library_in_host_memory_serves_a_gpu_base(lib2, base, input_ids):
    mix = [{"a": 0.6, "b": 0.4}] * input_ids.shape[0]
    with torch.no_grad():
        ref = MoErgeModel.from_library(copy.deepcopy(base), lib2, router="explicit")(
            input_ids=input_ids, experts=mix).logits
        model = MoErgeModel.from_library(copy.deepcopy(base), lib2, router="explicit", expert_device="cpu").to("cuda")
        layer = model.base.get_submodule("model.layers.0.self_attn.q_proj")
        assert layer.bank.A_all.device.type == "cpu" and layer.base_layer.weight.is_cuda
        out = model(input_ids=input_ids.cuda(), experts=mix).logits
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_adding_experts_appends_in_place_and_never_changes_an_older_bank():
    from moerge.runtime.bank import ModuleBank

    g = torch.Generator().manual_seed(0)
    lora = lambda r: LoRAWeights(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g), 1.0)  # noqa: E731
    b0 = ModuleBank.empty(6, 5, torch.device("cpu"), torch.float32).with_experts({"a": lora(2)})
    b1 = b0.with_experts({"b": lora(3)})  # grows with spare room
    c = lora(1)
    b2 = b1.with_experts({"c": c})  # fits in the room: no copy of a or b
    assert b2.A_all.data_ptr() == b1.A_all.data_ptr() and b2.A_all.shape[0] == b1.A_all.shape[0] + 1
    snapshot = {n: (b1.weights_of(n).A.clone(), b1.weights_of(n).B.clone()) for n in ("a", "b")}
    stale = b1.with_experts({"d": lora(1)})  # b1 is no longer the newest bank: it must not write over c's rows
    assert stale.A_all.data_ptr() != b2.A_all.data_ptr()
    assert torch.equal(b2.weights_of("c").A, c.A)
    for bank in (b1, b2, stale):
        assert torch.equal(bank.A_all[0], torch.zeros(6)) and torch.equal(bank.Bt_all[0], torch.zeros(5))
        for n, (A, B) in snapshot.items():
            assert torch.equal(bank.weights_of(n).A, A) and torch.equal(bank.weights_of(n).B, B)
    assert not torch.equal(stale.weights_of("d").A, b2.weights_of("c").A)
    assert b2.without({"b"}).names == ["a", "c"] and torch.equal(b2.without({"b"}).weights_of("c").A,
                                                                b2.weights_of("c").A)


def test_a_forward_hook_on_a_base_layer_sees_the_base_output(lib2, base, input_ids):
    model = MoErgeModel.from_library(copy.deepcopy(base), lib2, router="explicit")
    layer = model.base.get_submodule("model.layers.0.self_attn.q_proj")
    seen = []
    layer.base_layer.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        x = torch.randn(1, 3, layer.in_features)
        with model.routing(input_ids[:1], experts={"a": 1.0}):
            routed = layer(x)
        plain = layer.base_layer(x)
    torch.testing.assert_close(seen[0], plain)  # the hook kept the base output, not the routed one
    assert not torch.allclose(routed, plain)
