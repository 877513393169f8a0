"""PEFT adapters' target settings checked against the base they are applied to: what PEFT adapts is required,
names this architecture lacks and excluded modules are not (PEFT saves both routinely), and the result is PEFT's."""

from __future__ import annotations

import json

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.peft_loader import load_peft_lora, targeted_modules
from moerge.core.safe_io import load_safetensors, save_safetensors
from moerge.errors import ExpertFormatError

from helpers import VOCAB, peft_logits, save_peft_lora, tiny_llama


def tiny_phi3(seed: int = 0):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2, max_position_embeddings=128))
    model.config._name_or_path = f"tiny-phi3-{seed}"
    return model.eval()


IDS = torch.tensor([[5, 17, 33, 9, 61, 4, 12]])
RECIPE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _moerge_logits(base, folder, tmp_path):
    model = MoErgeModel.from_library(base, ExpertLibrary.create(tmp_path / "lib", base_model=base),
                                     router="explicit")
    model.add_expert(folder, name="ad")
    with torch.no_grad():
        return model(input_ids=IDS, experts={"ad": 1.0}).logits


@pytest.mark.parametrize("make,kwargs,adapted", [
    # "all-linear" with exclusions: PEFT saves the full list it expanded to, the excluded names included
    (tiny_llama, dict(target_modules="all-linear", exclude_modules=["down_proj"]),
     {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}),
    # a recipe list shared across architectures: phi3 has fused qkv_proj / gate_up_proj, PEFT adapts what matches
    (tiny_phi3, dict(target_modules=RECIPE), {"o_proj", "down_proj"}),
    # only some layers
    (tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]), {"q_proj", "v_proj"}),
])
def test_adapters_peft_saves_routinely_are_accepted_and_exact(tmp_path, make, kwargs, adapted):
    base = make()
    folder = save_peft_lora(base, tmp_path / "ad", **kwargs)
    expert = load_peft_lora(folder, name="ad")
    assert {m.rsplit(".", 1)[-1] for m in expert.modules} == adapted
    if "layers_to_transform" in kwargs:
        assert all(".layers.1." in m for m in expert.modules)
    ref = peft_logits(base, folder, IDS)
    ours = _moerge_logits(base, folder, tmp_path)
    assert not torch.allclose(ref, base(input_ids=IDS).logits, atol=1e-3)  # the adapter changes the output
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_targeted_modules_follow_peft():
    names = [f"model.layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "mlp.down_proj")] + ["lm_head"]
    assert targeted_modules({"target_modules": ["q_proj", "nonexistent"]}, names) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    got = targeted_modules({"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.0\..*",
                            "layers_to_transform": [0, 2]}, names)
    assert got == ["model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    assert targeted_modules({"target_modules": r".*\.k_proj"}, names) == [n for n in names if n.endswith("k_proj")]
    assert targeted_modules({"target_modules": "all-linear"}, names) is None  # PEFT saves what it expanded to


def _drop_module(folder, part: str) -> None:
    f = folder / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_safetensors(f).items() if part not in k}
    save_safetensors(f, tensors)


def test_a_base_module_the_settings_select_without_weights_is_refused(tmp_path):
    base = tiny_llama()
    folder = save_peft_lora(base, tmp_path / "ad", target_modules=["q_proj", "k_proj", "v_proj"])
    _drop_module(folder, "layers.1.self_attn.k_proj")
    expert = load_peft_lora(folder, name="holey")  # the base is not known yet: nothing to compare with
    assert set(expert.metadata.source["targets"]["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    weights = str(folder / "adapter_model.safetensors")

    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    with pytest.raises(ExpertFormatError, match=r"layers\.1\.self_attn\.k_proj.*missing adapter keys") as e:
        lib.add_peft(folder, name="holey")
    assert (e.value.expert, e.value.file) == ("holey", weights)
    assert lib.names() == []  # nothing changed

    model = MoErgeModel.from_library(base, lib, router="explicit")
    with pytest.raises(ExpertFormatError, match="the base model, but the weights hold no LoRA factors") as e:
        model.add_expert(folder, name="holey")
    assert (e.value.expert, e.value.file) == ("holey", weights)
    assert model.experts == []
    model.add_expert(save_peft_lora(base, tmp_path / "whole", target_modules=["q_proj", "k_proj"]), name="whole")
    assert model.experts == ["whole"]


def test_a_stored_expert_is_checked_with_its_targets(tmp_path):
    """Two experts of one layout, one of them missing a module its settings select: the layout check passed for
    the first must not wave the second through."""
    base = tiny_llama()
    good = load_peft_lora(save_peft_lora(base, tmp_path / "good", target_modules=["q_proj", "v_proj"]), name="good")
    folder = save_peft_lora(base, tmp_path / "bad", target_modules=["q_proj", "v_proj", "k_proj"])
    for i in (0, 1):
        _drop_module(folder, f"layers.{i}.self_attn.k_proj")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert "k_proj" in cfg["target_modules"]
    bad = load_peft_lora(folder, name="bad")
    assert bad.shapes() == good.shapes()
    model = MoErgeModel.from_library(base, ExpertLibrary.create(tmp_path / "lib", base_model=base), router="explicit")
    model.add_expert(good)
    with pytest.raises(ExpertFormatError, match="k_proj"):
        model.add_expert(bad)
    assert model.experts == ["good"]


@pytest.mark.parametrize("field,value,match", [
    ("target_modules", 5, "target_modules=5 must be"),
    ("exclude_modules", "(", "exclude_modules '\\(' is not a valid pattern"),
    ("layers_to_transform", ["1"], "layers_to_transform"),
    ("layers_to_transform", True, "layers_to_transform"),
])
def test_malformed_target_settings_are_refused_naming_the_field(tmp_path, field, value, match):
    folder = save_peft_lora(tiny_llama(), tmp_path / "ad")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExpertFormatError, match=match) as e:
        load_peft_lora(folder, name="bad")
    assert e.value.file == str(folder / "adapter_config.json")
