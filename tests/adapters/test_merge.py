"""Static merges: every method against its formula, PEFT's add_weighted_adapter on the same adapters and seed,
low-rank results, LiNeS, and the merged model against the routed one."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import Expert, ExpertLibrary, MoErgeModel
from moerge.adapters.merge import (
    block_index,
    lines_scales,
    list_merge_methods,
    merge_experts,
    merge_module,
    tall_masks,
)
from moerge.adapters.peft_loader import load_peft_lora

from helpers import save_peft_lora

ALPHAS = {"a": 8, "b": 16, "c": 4}
WEIGHTS = {"a": 0.6, "b": -0.3, "c": 0.9}


@pytest.fixture
def peft_setup(tmp_path, base):
    """Three PEFT LoRA adapters (rank 4, different alphas) on one PEFT model, and the same as moerge experts."""
    from peft import PeftModel

    folders = {n: save_peft_lora(base, tmp_path / n, seed=20 + i, r=4, lora_alpha=ALPHAS[n],
                                 target_modules=["q_proj", "v_proj", "down_proj"])
               for i, n in enumerate(ALPHAS)}
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folders["a"]), adapter_name="a")
    for n in ("b", "c"):
        pm.load_adapter(str(folders[n]), adapter_name=n)
    experts = [load_peft_lora(str(folders[n]), name=n) for n in ALPHAS]
    return pm, experts, [n for n, _ in base.named_modules()]


def _peft_factors(pm, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            assert mod.scaling[adapter] == 1.0
            out[name.removeprefix("base_model.model.")] = (mod.lora_A[adapter].weight.detach(),
                                                           mod.lora_B[adapter].weight.detach())
    return out


# PEFT combination type → moerge arguments
PEFT_CASES = {
    "cat": dict(method="cat"),
    "linear": dict(method="linear", factorwise=True),
    "ties": dict(method="ties", factorwise=True, density=0.5),
    "dare_linear": dict(method="dare_linear", factorwise=True, density=0.5),
    "dare_ties": dict(method="dare_ties", factorwise=True, density=0.5),
    "magnitude_prune": dict(method="magnitude_prune", factorwise=True, density=0.5),
    "svd": dict(method="linear", rank=3),
    "ties_svd": dict(method="ties", rank=3, density=0.5),
    "dare_linear_svd": dict(method="dare_linear", rank=3, density=0.5),
    "dare_ties_svd": dict(method="dare_ties", rank=3, density=0.5),
    "magnitude_prune_svd": dict(method="magnitude_prune", rank=3, density=0.5),
}


@pytest.mark.parametrize("combination", sorted(PEFT_CASES))
def test_same_weights_as_peft_add_weighted_adapter(peft_setup, combination, monkeypatch):
    import peft.tuners.lora.model as peft_lora

    pm, experts, order = peft_setup
    opts = dict(PEFT_CASES[combination])
    # DARE draws its masks from the global generator, module by module in the model's order. PEFT first draws the
    # new adapter's initial weights, so the stream is captured where its first merge starts and replayed for ours.
    start: list[torch.Tensor] = []
    for fn in ("dare_linear", "dare_ties"):
        original = getattr(peft_lora, fn)

        def capture(*a, _original=original, **k):
            if not start:
                start.append(torch.get_rng_state())
            return _original(*a, **k)

        monkeypatch.setattr(peft_lora, fn, capture)
    torch.manual_seed(123)
    pm.add_weighted_adapter(list(ALPHAS), [WEIGHTS[n] for n in ALPHAS], "merged", combination_type=combination,
                            svd_rank=3, density=opts.get("density", 0.0), majority_sign_method="total")
    reference = _peft_factors(pm, "merged")
    assert bool(start) == combination.startswith("dare")
    if start:
        torch.set_rng_state(start[0])
    merged = merge_experts(experts, WEIGHTS, module_order=order, **opts)
    assert sorted(merged.modules) == sorted(reference)
    for m, (A, B) in reference.items():
        ours = merged.modules[m]
        assert ours.scale == 1.0 and ours.A.shape == A.shape and ours.B.shape == B.shape
        torch.testing.assert_close(ours.A, A, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.B, B, atol=1e-5, rtol=1e-4)


def test_cat_is_exact_and_svd_is_the_best_low_rank_merge(peft_setup):
    _, experts, _ = peft_setup
    dense = merge_experts(experts, WEIGHTS, "linear")
    cat = merge_experts(experts, WEIGHTS, "cat")
    svd = merge_experts(experts, WEIGHTS, "linear", rank=5)
    for m, d in dense.modules.items():
        torch.testing.assert_close(cat.modules[m].delta_weight(), d.delta, atol=1e-5, rtol=1e-4)
        assert cat.modules[m].rank == 12 and svd.modules[m].rank == 5
        S = torch.linalg.svdvals(d.delta)
        err = torch.linalg.matrix_norm(svd.modules[m].delta_weight() - d.delta)
        torch.testing.assert_close(err, S[5:].norm(), atol=1e-4, rtol=1e-3)  # Eckart–Young


def _deltas(seed=0, n=3, shape=(6, 8)):
    g = torch.Generator().manual_seed(seed)
    return {f"e{i}": torch.randn(*shape, generator=g) for i in range(n)}


def test_methods_follow_their_formulas():
    d = {"x": torch.tensor([[3.0, -1.0, 0.5, -4.0]]), "y": torch.tensor([[-2.0, -2.0, 0.25, 1.0]])}
    w = {"x": 1.0, "y": 1.0}
    torch.testing.assert_close(merge_module(d, w, "linear"), torch.tensor([[1.0, -3.0, 0.75, -3.0]]))
    torch.testing.assert_close(merge_module(d, {"x": 1.0, "y": 3.0}, "linear", normalize=True),
                               (d["x"] + 3 * d["y"]) / 4)
    torch.testing.assert_close(merge_module(d, w, "task_arithmetic", scale=0.5), 0.5 * (d["x"] + d["y"]))
    # magnitude prune at 0.5 keeps 2 of 4 per expert: x → [3, 0, 0, -4], y → [-2, -2, 0, 0] (tie: first index)
    torch.testing.assert_close(merge_module(d, w, "magnitude_prune", density=0.5), torch.tensor([[1.0, -2, 0, -4]]))
    # TIES at 0.5: trimmed as above; elected signs by total: [+, -, +(0 → +), -]; mean of agreeing entries
    torch.testing.assert_close(merge_module(d, w, "ties", density=0.5), torch.tensor([[3.0, -2.0, 0.0, -4.0]]))
    # frequency election: columns 0 and 3 have one + and one −: the tie goes to + (where "total" elects − at 3)
    torch.testing.assert_close(merge_module(d, w, "ties", density=1.0, majority_sign="frequency"),
                               torch.tensor([[3.0, -1.5, 0.375, 1.0]]))
    # breadcrumbs, gamma 0.25, density 0.5 on 4 entries: drop the largest, keep the next two
    torch.testing.assert_close(merge_module(d, {"x": 2.0}, "breadcrumbs", density=0.5, gamma=0.25),
                               torch.tensor([[6.0, -2.0, 0.0, 0.0]]))


def test_dare_keeps_the_expected_update_and_the_density():
    d = {"x": torch.ones(200, 200)}
    g = torch.Generator().manual_seed(0)
    out = merge_module(d, {"x": 1.0}, "dare_linear", density=0.3, generator=g)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.3))
    assert abs(out.mean().item() - 1.0) < 0.05  # rescaling keeps the expectation
    again = merge_module(d, {"x": 1.0}, "dare_linear", density=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_consensus_drops_entries_that_fewer_than_k_tasks_use():
    d = {"a": torch.tensor([[1.0, 0.0, 1.0]]), "b": torch.tensor([[1.0, 0.0, 0.0]]),
         "c": torch.tensor([[1.0, 5.0, 0.0]])}
    w = {n: 1.0 for n in d}
    masks = tall_masks(d, w, lam=0.5)  # |τ_e| ≥ 0.5 |Σ τ − τ_e|
    assert masks[:, 0, 0].tolist() == [True, True, True]  # 1 ≥ 0.5·2
    assert masks[:, 0, 1].tolist() == [False, False, True]  # only c uses entry 1
    assert masks[:, 0, 2].tolist() == [True, False, False]
    torch.testing.assert_close(merge_module(d, w, "consensus", k=2, lam=0.5), torch.tensor([[3.0, 0.0, 0.0]]))
    torch.testing.assert_close(merge_module(d, w, "consensus", k=1, lam=0.5), torch.tensor([[3.0, 5.0, 1.0]]))


@pytest.mark.parametrize("method", [m for m in list_merge_methods()])
def test_every_method_is_permutation_invariant_and_one_expert_is_itself(method):
    d = _deltas()
    w = {"e0": 0.5, "e1": 1.0, "e2": 0.25}
    opts = {"generator": torch.Generator().manual_seed(0)} if method.startswith("dare") else {}
    merged = merge_module(d, w, method, **opts)
    assert merged.shape == (6, 8) and torch.isfinite(merged).all()
    if not method.startswith("dare"):  # random masks depend on the order of the draws
        rev = dict(reversed(list(w.items())))
        torch.testing.assert_close(merge_module(d, rev, method), merged, atol=1e-6, rtol=1e-5)
    if method in ("linear", "task_arithmetic", "ties", "consensus"):
        one = merge_module({"e0": d["e0"]}, {"e0": 1.0}, method, **({"density": 1.0} if method == "ties" else {}),
                           **({"k": 1} if method == "consensus" else {}))
        torch.testing.assert_close(one, d["e0"])


@pytest.mark.parametrize("bad, match", [
    (dict(method="nope"), "unknown merge method"),
    (dict(method="ties", density=0.0), "density"),
    (dict(method="ties", density=1.5), "density"),
    (dict(method="consensus", k=0), "k must"),
    (dict(method="ties", majority_sign="vote", density=0.5), "majority_sign"),
])
def test_bad_parameters_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        merge_module(_deltas(), {"e0": 1.0, "e1": 1.0}, **bad)


def test_lines_scales_grow_with_depth():
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.3.mlp.down_proj",
            "lm_head"]
    s = lines_scales(mods, alpha=0.2, beta=0.8)
    assert s == pytest.approx({mods[0]: 0.2, mods[1]: 0.2 + 0.8 / 3, mods[2]: 1.0, "lm_head": 1.0})
    assert block_index("transformer.h.11.attn.c_attn") == 11 and block_index("lm_head") is None


def test_merged_model_equals_routed_mix_and_lines_scales_layers(tmp_path, base, input_ids):
    from helpers import rand_expert

    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate("xyz"):
        lib.add(rand_expert(base, n, seed=i))
    model = MoErgeModel.from_library(base, lib)
    w = {"x": 0.5, "y": 0.25, "z": 0.25}
    with torch.no_grad():
        routed = model(input_ids=input_ids, experts=w).logits
        merged = model.merge(w, "linear")(input_ids=input_ids).logits
    torch.testing.assert_close(merged, routed, atol=1e-5, rtol=1e-5)
    # LiNeS with α=1, β=0 is the plain merge; α=0, β=1 leaves layer 0 at the base weights
    flat = model.merge(w, "linear", layer_scaling=(1.0, 0.0))
    torch.testing.assert_close(flat.model.layers[1].self_attn.q_proj.weight,
                               model.merge(w).model.layers[1].self_attn.q_proj.weight)
    deep = model.merge(w, "linear", layer_scaling=(0.0, 1.0))
    torch.testing.assert_close(deep.model.layers[0].self_attn.q_proj.weight,
                               model.base.model.layers[0].self_attn.q_proj.base_layer.weight)
    torch.testing.assert_close(deep.model.layers[1].self_attn.q_proj.weight,
                               flat.model.layers[1].self_attn.q_proj.weight)
    # a merged expert added back to the library routes like the mix
    as_expert = merge_experts([lib.get(n) for n in "xyz"], w, "linear", name="mix")
    model.add_expert(as_expert)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, experts={"mix": 1.0}).logits, routed,
                                   atol=1e-5, rtol=1e-5)


def test_merge_experts_refuses_what_it_cannot_do(peft_setup, base):
    _, experts, _ = peft_setup
    with pytest.raises(ValueError, match="twice"):
        merge_experts([experts[0], experts[0]])
    with pytest.raises(ValueError, match="not merged"):
        merge_experts(experts, {"zzz": 1.0})
    with pytest.raises(ValueError, match="3 weights for 2"):
        merge_experts(experts[:2], [1.0, 2.0, 3.0])
    from moerge import DeltaWeights

    dense = Expert("d", {m: DeltaWeights(w.delta_weight()) for m, w in experts[0].modules.items()})
    with pytest.raises(ValueError, match="needs LoRA experts"):
        merge_experts([dense, experts[1]], method="cat")


def test_low_rank_merge_saved_as_a_peft_adapter_runs_in_peft(tmp_path, base, input_ids):
    from moerge.adapters.peft_loader import load_peft_lora, save_peft_lora

    from helpers import peft_logits, rand_expert

    experts = [rand_expert(base, "x", seed=1, rank=4), rand_expert(base, "y", seed=2, rank=2, modules=("q_proj",))]
    merged = merge_experts(experts, {"x": 0.7, "y": 0.5}, "cat", name="xy")  # ranks 6 on q_proj, 4 elsewhere
    folder = save_peft_lora(merged, tmp_path / "peft", base_model_name_or_path="tiny-llama-0")
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(merged)
    reference = peft_logits(base, folder, input_ids)
    model = MoErgeModel.from_library(base, lib)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, experts={"xy": 1.0}).logits, reference,
                                   atol=1e-5, rtol=1e-5)
    back = load_peft_lora(folder, name="back")
    for m, w in merged.modules.items():
        torch.testing.assert_close(back.modules[m].delta_weight(), w.delta_weight(), atol=1e-6, rtol=1e-5)
    dense = merge_experts(experts, method="ties", density=0.5)
    with pytest.raises(Exception, match="dense updates"):
        save_peft_lora(dense, tmp_path / "nope")
