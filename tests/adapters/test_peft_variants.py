"""PEFT's LoRA variants against PEFT's own forward: those whose inference is LoRA's (VeLoRA, MonteCLoRA, MiCA), BD-LoRA
laid out whole, DoRA as its exact dense update, copies of base weights checked; the rest refused naming the
setting."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.expert import DeltaWeights, LoRAWeights
from moerge.adapters.peft_loader import load_peft_lora
from moerge.adapters.peft_variants import VARIANTS
from moerge.core.safe_io import load_safetensors, save_safetensors
from moerge.errors import ExpertFormatError

from helpers import peft_logits, save_peft_lora, tiny_gpt2, tiny_llama

IDS = torch.tensor([[5, 17, 33, 9, 61, 4, 12, 40]])


def _config(kind: str):
    import peft

    return {
        "velora": dict(velora_config=peft.VeloraConfig()),
        "monteclora": dict(monteclora_config=peft.MontecloraConfig()),
        "bdlora_b": dict(use_bdlora=peft.BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"],
                                                      nblocks=2)),
        "dora": dict(use_dora=True),
        "kasa": dict(kasa_config=peft.KasaConfig()),
    }[kind]


def _model(base, tmp_path):
    """A model on a copy of ``base`` (patched in place; ``base`` stays plain for PEFT)."""
    return MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.create(tmp_path / "lib", base_model=base),
                                    router="explicit")


def _ours(model, name="ad"):
    with torch.no_grad():
        return model(input_ids=IDS, experts={name: 1.0}).logits


@pytest.mark.parametrize("kind,extra", [("velora", "lora_velora_embed"), ("monteclora", "lora_monteclora_sampler"),
                                        ("bdlora_b", None)])
def test_variants_whose_inference_is_lora_match_peft(tmp_path, kind, extra):
    base = tiny_llama()
    folder = save_peft_lora(base, tmp_path / "ad", **_config(kind))
    keys = load_safetensors(folder / "adapter_model.safetensors")
    assert extra is None or any(extra in k for k in keys)  # the variant's own tensors are there ...
    expert = load_peft_lora(folder, name="ad")
    assert all(isinstance(w, LoRAWeights) for w in expert.modules.values())  # ... and not needed
    assert expert.metadata.source["variants"] == [_config(kind).popitem()[0]]
    if kind == "bdlora_b":  # v_proj's B is stored as its two blocks stacked, laid out whole here
        v = next(k for k in keys if "layers.0.self_attn.v_proj.lora_B" in k)
        assert keys[v].shape == (16, 2) and expert.modules["model.layers.0.self_attn.v_proj"].B.shape == (16, 4)
    model = _model(base, tmp_path)
    model.add_expert(folder, name="ad")
    ref = peft_logits(base, folder, IDS)
    assert not torch.allclose(ref, base(input_ids=IDS).logits, atol=1e-3)
    assert torch.allclose(_ours(model), ref, atol=1e-5), float((_ours(model) - ref).abs().max())


def test_mica_initialised_adapters_are_plain_lora(tmp_path):
    base = tiny_llama()
    folder = save_peft_lora(base, tmp_path / "ad", init_lora_weights="mica")
    with torch.no_grad():  # MiCA sets B to singular vectors and A to zero: give A values, as training would
        tensors = load_safetensors(folder / "adapter_model.safetensors")
        save_safetensors(folder / "adapter_model.safetensors",
                         {k: (torch.randn_like(v) if "lora_A" in k else v) for k, v in tensors.items()})
    model = _model(base, tmp_path)
    model.add_expert(folder, name="ad")
    assert torch.allclose(_ours(model), peft_logits(base, folder, IDS), atol=1e-5)


@pytest.mark.parametrize("make,targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn"])])
def test_dora_is_exact_as_its_dense_update(tmp_path, make, targets):
    from peft import PeftModel

    base = make()
    folder = save_peft_lora(base, tmp_path / "ad", use_dora=True, target_modules=targets,
                            fan_in_fan_out=make is tiny_gpt2)
    with torch.no_grad():  # a magnitude that is not the initial norm, as after training
        tensors = load_safetensors(folder / "adapter_model.safetensors")
        tensors = {k: (v * (1 + 0.3 * torch.rand_like(v)) if "magnitude" in k else v) for k, v in tensors.items()}
        save_safetensors(folder / "adapter_model.safetensors", tensors)
    ref = peft_logits(base, folder, IDS)
    model = _model(base, tmp_path)
    model.add_expert(folder, name="ad")  # the model passes its base
    assert torch.allclose(_ours(model), ref, atol=1e-5), float((_ours(model) - ref).abs().max())
    # the same update as PEFT's merge: merge_and_unload() − base
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).merge_and_unload()
    expert = load_peft_lora(folder, name="ad", base=base)
    for m, w in expert.modules.items():
        assert isinstance(w, DeltaWeights)
        diff = merged.get_submodule(m).weight - base.get_submodule(m).weight
        diff = diff if isinstance(base.get_submodule(m), torch.nn.Linear) else diff.t()
        assert torch.allclose(w.delta, diff, atol=1e-6)
    # without the base there is nothing to be exact against: refused, saying what to do
    with pytest.raises(ExpertFormatError, match="base="):
        load_peft_lora(folder, name="ad")
    lib = ExpertLibrary.create(tmp_path / "lib2", base_model=base)
    assert lib.add_peft(folder, name="ad", base=base).kind == "delta"


@pytest.mark.parametrize("kind,setting", [("kasa", "kasa_config")])
def test_variants_that_are_not_lora_are_refused_naming_the_setting(tmp_path, kind, setting):
    folder = save_peft_lora(tiny_llama(), tmp_path / "ad", **_config(kind))
    with pytest.raises(ExpertFormatError, match=setting) as e:
        load_peft_lora(folder, name="ad")
    assert e.value.file == str(folder / "adapter_config.json")


def test_arrow_and_unknown_variants_are_refused_naming_the_setting(tmp_path, monkeypatch):
    folder = save_peft_lora(tiny_llama(), tmp_path / "ad")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "arrow_config": {"top_k": 3}}))
    with pytest.raises(ExpertFormatError, match="arrow_config.*'arrow' router"):
        load_peft_lora(folder, name="ad")
    # a variant PEFT declares that moerge has no entry for (a newer PEFT's, say) is refused by name
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "velora_config": {"num_groups": 2}}))
    monkeypatch.delitem(VARIANTS, "velora_config")
    with pytest.raises(ExpertFormatError, match="velora_config.*does not know"):
        load_peft_lora(folder, name="ad")


def _with_copy(folder, module: str, weight: torch.Tensor) -> None:
    f = folder / "adapter_model.safetensors"
    save_safetensors(f, {**load_safetensors(f), f"base_model.model.{module}.base_layer.weight": weight})


def test_copies_of_base_weights_are_checked_against_the_base(tmp_path):
    base = tiny_llama()
    q = "model.layers.0.self_attn.q_proj"
    w = base.get_submodule(q).weight.detach()

    same = save_peft_lora(base, tmp_path / "same")
    _with_copy(same, q, w.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an equal copy is ignored without a word
        e = load_peft_lora(same, name="same", base=base)
    assert e.metadata.source["base_weight_copies"] == {q: "ignored"} and isinstance(e.modules[q], LoRAWeights)

    other = save_peft_lora(base, tmp_path / "other")
    _with_copy(other, q, w + 0.05 * torch.randn_like(w))
    with pytest.warns(UserWarning, match="differs from the base's"):
        model = _model(base, tmp_path)
        model.add_expert(other, name="ad")
    # PEFT loads the copy into its base layer; applied as a dense update, moerge computes the same
    assert torch.allclose(_ours(model), peft_logits(base, other, IDS), atol=1e-5)
    with pytest.raises(ExpertFormatError, match="differs from the base's by up to"):
        load_peft_lora(other, name="ad", base=base, base_copies="refuse")
    with pytest.warns(UserWarning, match="not checked"):  # no base to compare with: said, not silently dropped
        assert load_peft_lora(other, name="ad").metadata.source["base_weight_copies"] == {q: "unchecked"}

    resized = save_peft_lora(base, tmp_path / "resized")
    _with_copy(resized, "model.embed_tokens", torch.zeros(200, 32))
    with pytest.raises(ExpertFormatError, match="resized vocabulary"):
        load_peft_lora(resized, name="ad", base=base)


def test_variants_are_found_where_peft_does_not_tag_them(tmp_path, monkeypatch):
    """An older PEFT declares no `is_lora_variant` metadata: DoRA is still recognised (not loaded as plain LoRA)."""
    import dataclasses
    from types import SimpleNamespace

    from moerge.adapters import peft_variants

    real = dataclasses.fields
    untagged = lambda cls: [SimpleNamespace(name=f.name, metadata={}) for f in real(cls)]  # noqa: E731
    monkeypatch.setattr(peft_variants.dataclasses, "fields", untagged)
    assert peft_variants.requested_variants({"use_dora": True}, "x", tmp_path) == ["use_dora"]
    with pytest.raises(ExpertFormatError, match="kasa_config"):
        peft_variants.requested_variants({"kasa_config": {"beta": 1}}, "x", tmp_path)
