"""LoRA on MoE models' fused expert weights and routers (PEFT's ``target_parameters``), against PEFT itself.

Tiny random mixtral, qwen2_moe and qwen3_moe (4 MoE experts, top-2, hidden 32, expert width 16, so that
``gate_up_proj`` and ``down_proj`` have equal ``lora_B`` shapes and only the nesting rule tells them apart)."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.expert import LoRAWeights, StackedLoRAWeights
from moerge.adapters.peft_loader import load_peft_lora
from moerge.errors import ExpertFormatError

from helpers import TOK_VOCAB, save_peft_lora

pytestmark = pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                                reason="transformers 4 keeps MoE experts as nn.Linear modules, plain targets")

IDS = torch.tensor([[5, 17, 33, 9, 61, 4, 12, 40], [7, 3, 88, 21, 50, 2, 11, 30]])
COMMON = dict(vocab_size=TOK_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts_per_tok=2)
MOE = {
    "mixtral": dict(num_local_experts=4, intermediate_size=16),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=16, intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=16, intermediate_size=16, head_dim=8),
}
FUSED = ["gate.weight", "gate_up_proj", "down_proj"]
ATTENTION = ["q_proj", "v_proj"]


def tiny_moe(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **COMMON, **MOE[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.config._name_or_path = f"tiny-{model_type}"
    return model.eval()


def peft_model(base, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def peft_deltas(pm) -> dict[str, torch.Tensor]:
    """PEFT's own update of every targeted parameter, by the parameter's name (routers by their module's)."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, ParamWrapper):
            owner = name.replace(".base_layer", "")
            key = owner if mod.parameter_name == "weight" else f"{owner}.{mod.parameter_name}"
            out[key] = mod.get_delta_weight("default").detach()
    return out


SETTINGS = {
    "explicit": dict(target_modules=ATTENTION, target_parameters=FUSED),
    "patterns": dict(target_modules=ATTENTION, target_parameters=FUSED, rank_pattern={"down_proj": 3},
                     alpha_pattern={"gate.weight": 1}),
    "rslora": dict(target_modules=ATTENTION, target_parameters=FUSED, use_rslora=True),
    "down_only": dict(target_modules=ATTENTION, target_parameters=["down_proj"]),
    "gate_up_only": dict(target_modules=ATTENTION, target_parameters=["gate_up_proj"]),
    "router_only": dict(target_modules=ATTENTION, target_parameters=["gate.weight"]),
}


@pytest.mark.parametrize("model_type", list(MOE))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_layout_equals_peft_delta_weight(tmp_path, model_type, setting):
    """Every targeted parameter's update, rebuilt from the saved tensors, equals PEFT's ``get_delta_weight`` exactly
    (nesting order, expert-major A, rank-major B, patterns on parameter names, rsLoRA)."""
    base = tiny_moe(model_type)
    folder = save_peft_lora(base, tmp_path / "ad", **SETTINGS[setting])
    expert = load_peft_lora(folder, name="ad", base=base)
    ref = peft_deltas(peft_model(base, folder))
    assert ref and set(ref) <= set(expert.modules)
    for key, delta in ref.items():
        w = expert.modules[key]
        assert isinstance(w, StackedLoRAWeights if key.endswith("_proj") else LoRAWeights), key
        assert torch.equal(w.delta_weight(), delta), key
    attention = {m for m in expert.modules if m.endswith(tuple(ATTENTION))}
    assert set(expert.modules) == set(ref) | attention
    if setting == "patterns":  # PEFT warns that the patterns match no module, then applies them to the parameters
        assert expert.modules["model.layers.1.mlp.experts.down_proj"].rank == 3
        assert expert.modules["model.layers.1.mlp.gate"].scale == 1 / 4


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_all_linear_adds_the_fused_parameters_with_pattern_ranks(tmp_path, model_type):
    """PEFT's all-linear on a transformers-5 MoE model targets the router and both fused parameters, gate_up_proj
    at twice the rank and alpha (its rank/alpha patterns): read as PEFT reads them."""
    base = tiny_moe(model_type)
    folder = save_peft_lora(base, tmp_path / "ad", target_modules="all-linear", r=2, lora_alpha=4)
    expert = load_peft_lora(folder, name="ad", base=base)
    ref = peft_deltas(peft_model(base, folder))
    assert {k.rsplit(".", 1)[-1] for k in ref} == {"gate", "gate_up_proj", "down_proj"}
    for key, delta in ref.items():
        assert torch.equal(expert.modules[key].delta_weight(), delta), key
    assert expert.modules["model.layers.0.mlp.experts.gate_up_proj"].rank == 4
    assert expert.modules["model.layers.0.mlp.experts.down_proj"].rank == 2
    model = routed_model(base, tmp_path)
    model.add_expert(folder, name="ad")
    with torch.no_grad():
        ours = model(input_ids=IDS, experts={"ad": 1.0}).logits
        ref = peft_model(base, folder)(input_ids=IDS).logits
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_target_parameters_need_the_base(tmp_path):
    base = tiny_moe("mixtral")
    folder = save_peft_lora(base, tmp_path / "ad", **SETTINGS["explicit"])
    with pytest.raises(ExpertFormatError, match="target_parameters .* only the base can resolve") as e:
        load_peft_lora(folder, name="ad")
    assert e.value.file == str(folder / "adapter_config.json")


def test_missing_keys_and_wrong_shapes_are_refused_naming_the_parameter(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    base = tiny_moe("mixtral")
    folder = save_peft_lora(base, tmp_path / "ad", **SETTINGS["explicit"])
    weights = load_file(str(folder / "adapter_model.safetensors"))
    gone = {k: v for k, v in weights.items() if "layers.1.mlp.experts.base_layer" not in k}
    save_file(gone, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ExpertFormatError, match=r"'model.layers.1.mlp.experts.gate_up_proj'.*missing adapter keys"):
        load_peft_lora(folder, name="ad", base=base)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["down_proj"]
    cfg["r"] = 3
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExpertFormatError, match=r"'model.layers.0.mlp.experts.down_proj' \(rank 3, 4 experts"):
        load_peft_lora(folder, name="ad", base=base)
    cfg["target_parameters"] = ["embed_tokens.weight"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExpertFormatError, match=r"selects 'model.embed_tokens.weight', which moerge cannot adapt"):
        load_peft_lora(folder, name="ad", base=base)


def routed_model(base, tmp_path, router="explicit"):
    return MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.create(tmp_path / "lib", base_model=base),
                                    router=router)


@pytest.mark.parametrize("model_type", list(MOE))
def test_routed_at_weight_one_equals_peft_forward(tmp_path, model_type):
    """The attention, the router and both fused parameters routed together at weight 1.0 give PEFT's logits; the
    MoE experts each token is sent to agree with PEFT's first."""
    base = tiny_moe(model_type)
    folder = save_peft_lora(base, tmp_path / "ad", **SETTINGS["patterns"])
    pm = peft_model(base, folder)
    with torch.no_grad():
        ref = pm(input_ids=IDS).logits
    assert not torch.allclose(ref, base(input_ids=IDS).logits, atol=1e-3)
    model = routed_model(base, tmp_path)
    model.add_expert(folder, name="ad")
    assert {"model.layers.0.mlp.gate", "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.experts.down_proj"} <= set(model.patched_modules)
    with torch.no_grad():
        ours = model(input_ids=IDS, experts={"ad": 1.0}).logits
        plain = model.base(input_ids=IDS).logits
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    assert torch.equal(plain, base(input_ids=IDS).logits)  # outside a routed call: the base, bit for bit


def dense_reference(base, folders: dict, weights: dict):
    """The base with ``Σ_k w_k ΔW_k`` added to every parameter, each ``ΔW_k`` from PEFT's own merge_and_unload."""
    ref = copy.deepcopy(base)
    params = dict(ref.named_parameters())
    for name, folder in folders.items():
        merged = peft_model(base, folder).merge_and_unload()
        with torch.no_grad():
            for key, p in merged.named_parameters():
                params[key] += weights[name] * (p - dict(base.named_parameters())[key])
    return ref


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_weighted_mixes_per_row_equal_the_dense_merge(tmp_path, model_type):
    """Two adapters mixed with sequence weights (a different mix per row in one batch) equal, row by row, the base
    with the weighted PEFT updates added to its parameters; model.merge gives that dense model."""
    base = tiny_moe(model_type)
    folders = {n: save_peft_lora(base, tmp_path / n, seed=i, **SETTINGS[s])
               for i, (n, s) in enumerate([("a", "explicit"), ("b", "patterns")])}
    model = routed_model(base, tmp_path)
    for n, f in folders.items():
        model.add_expert(f, name=n)
    mixes = [{"a": 0.3, "b": 0.7}, {"a": 1.0, "b": -0.5}]
    with torch.no_grad():
        ours = model(input_ids=IDS, experts=mixes).logits
        for row, mix in enumerate(mixes):
            ref = dense_reference(base, folders, mix)(input_ids=IDS[row : row + 1]).logits
            assert torch.allclose(ours[row : row + 1], ref, atol=1e-4), float((ours[row] - ref[0]).abs().max())
            merged = model.merge(mix)(input_ids=IDS[row : row + 1]).logits
            assert torch.allclose(merged, ref, atol=1e-4), float((merged - ref).abs().max())
        alone = model(input_ids=IDS[1:], experts=[mixes[1]]).logits
    assert torch.allclose(ours[1:], alone, atol=1e-5)


def test_generate_with_beams_and_samples_matches_the_dense_merge(tmp_path):
    """generate repeats each prompt's row for beams and returned sequences; the MoE blocks see those rows
    flattened and still apply each row's mix."""
    base = tiny_moe("qwen3_moe")
    folders = {"a": save_peft_lora(base, tmp_path / "a", **SETTINGS["explicit"])}
    model = routed_model(base, tmp_path)
    model.add_expert(folders["a"], name="a")
    ref = dense_reference(base, folders, {"a": 0.8})
    kw = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
    ours = model.generate(input_ids=IDS, experts={"a": 0.8}, **kw)
    theirs = ref.generate(input_ids=IDS, **kw)
    assert torch.equal(ours, theirs)


def test_library_round_trip_and_merged_expert(tmp_path):
    """A stacked expert stored in a library and read back (its layout, digest and factors), then merged with
    method 'cat' and by TIES (kept exactly as full-rank factors), folds into the base like the mix it stands for."""
    from moerge.adapters.merge import fold_into, merge_experts, merge_module

    base = tiny_moe("mixtral")
    folder = save_peft_lora(base, tmp_path / "a", **SETTINGS["explicit"])
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(load_peft_lora(folder, name="a", base=base))
    stored = lib.get("a")
    again = stored.load()
    fresh = load_peft_lora(folder, name="a", base=base)
    assert again.digest() == fresh.digest() and stored.spec() == fresh.spec()
    key = "model.layers.1.mlp.experts.down_proj"
    assert stored.spec()[key]["experts"] == 4 and torch.equal(again.modules[key].A, fresh.modules[key].A)
    b = load_peft_lora(save_peft_lora(base, tmp_path / "b", seed=1, **SETTINGS["explicit"]), name="b", base=base)
    for method, kw in [("cat", {}), ("ties", {"density": 0.5})]:
        merged = merge_experts([fresh, b], {"a": 0.5, "b": 0.25}, method, **kw)
        assert isinstance(merged.modules[key], StackedLoRAWeights)
        deltas = {"a": fresh.modules[key].delta_weight(), "b": b.modules[key].delta_weight()}
        update = merge_module(deltas, {"a": 0.5, "b": 0.25}, "linear" if method == "cat" else method, **kw)
        assert torch.allclose(merged.modules[key].delta_weight(), update, atol=1e-5)
        folded = fold_into(copy.deepcopy(base), merged)
        want = dict(base.named_parameters())[key] + update
        assert torch.allclose(dict(folded.named_parameters())[key], want, atol=1e-5)


def test_joined_batch_equals_each_request_alone(tmp_path):
    """Continuous batching runs requests with different mixes as one forward: the MoE blocks mix each part's rows
    under its own routing (stacked targets are never joined, the router is)."""
    from moerge.runtime.joined import JoinedState

    base = tiny_moe("mixtral")
    model = routed_model(base, tmp_path)
    for i, n in enumerate("ab"):
        model.add_expert(save_peft_lora(base, tmp_path / n, seed=i, **SETTINGS["explicit"]), name=n)
    mixes = [{"a": 0.6}, {"b": 1.0, "a": -0.2}]
    ones = torch.ones_like(IDS[:1])
    states = [model.route(IDS[i : i + 1], ones, experts=m) for i, m in enumerate(mixes)]
    joined = JoinedState([(s, 1) for s in states])
    with torch.no_grad():
        with model.context.activate(joined):
            together = model.base(input_ids=IDS).logits
        for i, m in enumerate(mixes):
            alone = model(input_ids=IDS[i : i + 1], experts=m).logits
            assert torch.allclose(together[i : i + 1], alone, atol=1e-5), float((together[i] - alone[0]).abs().max())


EXAMPLES = ["sum 1 2", "sort b a", "count abc", "upper xy"]


def gated_reference(model, ids):
    """What a local gate's per-token weights should do, applied by the training-time hooks (GatedExperts, a separate
    implementation: PEFT-style forward hooks, a TorchFunctionMode on the router's F.linear, the experts' loop) to a
    plain copy of the base, with the router's own gate over the same candidates in every module."""
    from moerge.routing.training import GatedExperts

    state = model.route(ids, torch.ones_like(ids))
    cands, router = state.candidates, model.router
    names = list(cands.names)
    assert cands.weights is None  # routed per token
    layers = model.expert_set.layers

    def gate(m, x3):
        w = router.gate(x3, cands, layers[m].info)  # (B, T, K) over the row's candidate slots
        out = x3.new_zeros(*w.shape[:2], len(names))
        return out.scatter_add(-1, cands.ids.clamp(min=0)[:, None, :].expand_as(w), w * (cands.ids >= 0)[:, None, :])

    experts = [model.get_expert(n) for n in names]
    with GatedExperts(model.copy_base(), experts, gate) as g, torch.no_grad():
        return g.base(input_ids=ids).logits


@pytest.mark.parametrize("router", ["arrow", "lda", "phatgoose", "xlora", "glider"])
def test_local_gates_mix_moe_targets_per_token(tmp_path, tok, router):
    """Routers that gate per token take MoE experts: their data for the router and the fused weights is made on the
    MoE block's input (LDA statistics, PHATGOOSE gates and the X-LoRA head trained through the fused experts,
    Arrow's stacked prototypes), and the routed forward equals the same per-token weights applied by an independent
    implementation; generate runs."""
    from moerge import build_router

    base = tiny_moe("qwen2_moe")
    opts = {"arrow": {}, "lda": {}, "phatgoose": {"train_steps": 2}, "xlora": {"train_steps": 2},
            "glider": {"candidates": 2}}[router]  # GLIDER: the default local gate, LDA, after retrieval
    model = MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.create(tmp_path / "lib", base_model=base),
                                     router=build_router(router, **opts), tokenizer=tok, train_in="thread")
    for i, (n, setting) in enumerate([("a", "explicit"), ("b", "patterns"), ("c", "down_only")]):
        setting = "gate_up_only" if router == "arrow" and n == "c" else setting  # Arrow: see the refusal below
        folder = save_peft_lora(base, tmp_path / n, seed=i, **SETTINGS[setting])
        model.add_expert(load_peft_lora(folder, name=n, base=base, examples=EXAMPLES[i:] + EXAMPLES[:i],
                                        description=["adds numbers", "sorts letters", "counts letters"][i]))
    key = "model.layers.1.mlp.experts.down_proj"
    assert model.expert_set.layers[key].info.in_features == 32  # gates read the block's (hidden) input
    ids = IDS[:, :6]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    ref = gated_reference(model, ids)
    assert not torch.allclose(ours, base(input_ids=ids).logits, atol=1e-3)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    usage = model.last_routing[0].layer_usage  # the trace has the fused weights' and the router's gate weights
    assert sum(usage[key].values()) == pytest.approx(1.0, abs=1e-4)
    assert "model.layers.0.mlp.gate" in usage
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_arrow_refuses_down_proj_without_gate_up_proj(tmp_path):
    from moerge.errors import RoutingError

    base = tiny_moe("mixtral")
    model = routed_model(base, tmp_path, router="arrow")
    with pytest.raises(RoutingError, match="gate_up_proj prototype"):
        model.add_expert(save_peft_lora(base, tmp_path / "ad", **SETTINGS["down_only"]), name="ad")
    assert "ad" not in model.experts


def test_features_without_stacked_support_refuse_by_name(tmp_path):
    from moerge.adapters.compress import compress_expert
    from moerge.adapters.twin_split import twin_split

    base = tiny_moe("mixtral")
    expert = load_peft_lora(save_peft_lora(base, tmp_path / "ad", **SETTINGS["explicit"]), name="ad", base=base)
    for call in (lambda: compress_expert(expert), lambda: twin_split([expert, expert.renamed("b")])):
        with pytest.raises(ExpertFormatError, match=r"does not support fused MoE expert parameters.*gate_up_proj"):
            call()


def test_layouts_moerge_does_not_reproduce_are_refused(tmp_path):
    """A transposed experts layout (as GPT-OSS stores it) and a router class moerge does not know are refused,
    naming the class and the setting, when the adapter is read."""
    base = tiny_moe("mixtral")
    folder = save_peft_lora(base, tmp_path / "ad", **SETTINGS["explicit"])
    odd = copy.deepcopy(base)
    odd.model.layers[0].mlp.experts.is_transposed = True
    with pytest.raises(ExpertFormatError, match=r"experts.gate_up_proj'.*MixtralExperts has is_transposed=True"):
        load_peft_lora(folder, name="ad", base=odd)
    odd = copy.deepcopy(base)
    odd.model.layers[1].mlp.gate.__class__ = type("OtherRouter", (type(odd.model.layers[1].mlp.gate),), {})
    with pytest.raises(ExpertFormatError, match=r"'model.layers.1.mlp.gate.weight'.*OtherRouter, not a linear module"):
        load_peft_lora(folder, name="ad", base=odd)


@pytest.mark.parametrize("setting", ["patterns", "down_only"])
def test_written_as_peft_target_parameters_round_trip(tmp_path, setting):
    """A merged MoE expert (rank 2r by 'cat', scale folded in) written as a PEFT adapter loads in PEFT with the same
    forward as moerge's, and reads back into equal updates."""
    from moerge.adapters.merge import merge_experts
    from moerge.adapters.peft_loader import save_peft_lora as write_peft

    base = tiny_moe("mixtral")
    a, b = (load_peft_lora(save_peft_lora(base, tmp_path / n, seed=i, **SETTINGS[setting]), name=n, base=base)
            for i, n in enumerate("ab"))
    merged = merge_experts([a, b], {"a": 0.5, "b": 0.7}, "cat", name="ab")
    with pytest.raises(ExpertFormatError, match="needs the base"):
        write_peft(merged, tmp_path / "out")
    folder = write_peft(merged, tmp_path / "out", base=base)
    back = load_peft_lora(folder, name="ab", base=base)
    for m, w in merged.modules.items():
        assert torch.allclose(back.modules[m].delta_weight(), w.delta_weight(), atol=1e-6), m
    model = routed_model(base, tmp_path)
    model.add_expert(merged)
    with torch.no_grad():
        ours = model(input_ids=IDS, experts={"ab": 1.0}).logits
        ref = peft_model(base, folder)(input_ids=IDS).logits
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_half_precision_base_computes_the_experts_in_float32(tmp_path):
    """On a bfloat16 base the stacked and router factors stay float32 and are computed in float32 (PEFT's
    autocast_adapter_dtype default for its own layers; its parameter LoRA rounds W + ΔW to bfloat16): moerge is at
    least as close to the float32 forward as PEFT's bfloat16 forward is."""
    base = tiny_moe("qwen2_moe")
    folder = save_peft_lora(base, tmp_path / "ad", **SETTINGS["explicit"])
    with torch.no_grad():
        exact = peft_model(base, folder)(input_ids=IDS).logits
        theirs = peft_model(base.to(torch.bfloat16), folder)(input_ids=IDS).logits.float()
    half = base.to(torch.bfloat16)
    model = routed_model(half, tmp_path)
    model.add_expert(folder, name="ad")
    layer = model.expert_set.layers["model.layers.0.mlp.experts.gate_up_proj"]
    assert layer.bank.A_all.dtype == torch.float32 and layer.compute_dtype == torch.float32
    with torch.no_grad():
        ours = model(input_ids=IDS, experts={"ad": 1.0}).logits.float()
    err_ours, err_theirs = float((ours - exact).abs().max()), float((theirs - exact).abs().max())
    assert err_ours <= 1.5 * err_theirs + 1e-3, (err_ours, err_theirs)


def test_experts_cache_evicts_and_reads_stacked_experts_back(tmp_path):
    """With a byte budget for one expert, stored MoE experts are read in and evicted as calls alternate between
    them; every answer equals the one without a budget."""
    base = tiny_moe("mixtral")
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate("ab"):
        lib.add(load_peft_lora(save_peft_lora(base, tmp_path / n, seed=i, **SETTINGS["patterns"]), name=n, base=base))
    free = MoErgeModel.from_library(copy.deepcopy(base), lib, router="explicit")
    one = max(free.expert_set.cache.sizes.values())
    tight = MoErgeModel.from_library(copy.deepcopy(base), lib, router="explicit", cache_bytes=one)
    with torch.no_grad():
        for n in "abab":
            want = free(input_ids=IDS, experts={n: 1.0}).logits
            got = tight(input_ids=IDS, experts={n: 1.0}).logits
            assert torch.allclose(got, want, atol=1e-6), n
    assert tight.expert_set.cache.evictions >= 3


def test_the_router_target_runs_in_the_kernel(tmp_path, interpreted, monkeypatch):
    """Where the fused kernel runs (CUDA; here Triton's interpreter on CPU tensors), an MoE router's experts go
    through it like any linear module's (the fused experts' part stays on the torch path): the same logits."""
    base = tiny_moe("mixtral")
    model = routed_model(base, tmp_path)
    for i, n in enumerate("ab"):
        model.add_expert(save_peft_lora(base, tmp_path / n, seed=i, **SETTINGS["explicit"]), name=n)
    widths = []
    real = interpreted.routed_lora_

    def spy(x, out, *a, **k):
        widths.append(out.shape[-1])
        return real(x, out, *a, **k)

    mixes = [{"a": 0.4, "b": 0.6}, {"b": 1.0}]
    with torch.no_grad():
        monkeypatch.setattr(interpreted, "ENABLED", False)
        ref = model(input_ids=IDS, experts=mixes).logits
        monkeypatch.setattr(interpreted, "ENABLED", True)
        monkeypatch.setattr(interpreted, "routed_lora_", spy)
        out = model(input_ids=IDS, experts=mixes).logits
    assert 4 in widths  # the router's logits over the 4 MoE experts came out of the kernel
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
