"""Experts: the PEFT loader (settings honoured, unsafe or unsupported adapters refused) and fine-tune diffs."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

from moerge import DeltaWeights, Expert, LoRAWeights
from moerge.adapters import expert_from_diff, low_rank_factors
from moerge.adapters.peft_loader import load_peft_lora, peft_pattern_key
from moerge.errors import BaseMismatchError, ExpertFormatError

from helpers import save_peft_lora, tiny_llama


def test_peft_settings_are_honoured(tmp_path, base):
    folder = save_peft_lora(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                            rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3})
    e = load_peft_lora(folder, name="a", description="d", examples=["x"])
    q, v, up = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj")
    assert e.ranks[q] == 4 and e.ranks[v] == 2 and e.ranks[up] == 4
    assert e.modules[q].scale == pytest.approx(8 / 4)
    assert e.modules[v].scale == pytest.approx(8 / 2)
    assert e.modules[up].scale == pytest.approx(3 / 4)
    assert len(e.modules) == 6 and e.kind == "lora"
    assert e.metadata.description == "d" and e.metadata.examples == ["x"] and e.metadata.source["type"] == "peft"
    rs = load_peft_lora(save_peft_lora(base, tmp_path / "rs", r=16, lora_alpha=8, use_rslora=True), name="rs")
    assert all(w.scale == pytest.approx(8 / math.sqrt(16)) for w in rs.modules.values())


@pytest.mark.parametrize("patterns,module,expected", [
    ({"v_proj": 2}, "model.layers.0.self_attn.v_proj", "v_proj"),
    ({"v_proj": 2}, "model.layers.0.self_attn.q_proj", None),
    ({r"layers\.1\.self_attn\.q_proj": 6}, "model.layers.1.self_attn.q_proj", r"layers\.1\.self_attn\.q_proj"),
    ({r"layers\.1\.self_attn\.q_proj": 6}, "model.layers.11.self_attn.q_proj", None),
    ({"proj": 3}, "model.layers.0.self_attn.q_proj", None),  # PEFT matches whole dotted suffixes only
])
def test_pattern_keys_match_peft(patterns, module, expected):
    from peft.utils.other import get_pattern_key

    assert peft_pattern_key(patterns, module) == expected
    assert get_pattern_key(list(patterns), module) == (expected if expected is not None else module)


def _adapter(tmp_path, base, **edits):
    folder = save_peft_lora(base, tmp_path / "ad", seed=0)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(edits)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("edits,match", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "train biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"r": 0}, "positive integer"),
    ({"init_lora_weights": "pissa_niter_4"}, "changes the base weights"),
    ({"init_lora_weights": "olora"}, "changes the base weights"),
    ({"r": 8}, "config gives rank 8 but lora_A has shape"),
    ({"lora_alpha": "big"}, "finite number"),
])
def test_unsupported_or_inconsistent_configs_are_refused(tmp_path, base, edits, match):
    folder = _adapter(tmp_path, base, **edits)
    with pytest.raises(ExpertFormatError, match=match) as info:
        load_peft_lora(folder, name="bad")
    assert info.value.expert == "bad" and info.value.file.endswith((".json", ".safetensors"))


def test_missing_config_field_is_refused(tmp_path, base):
    folder = save_peft_lora(base, tmp_path / "ad")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExpertFormatError, match="no 'lora_alpha' field"):
        load_peft_lora(folder, name="bad")


def test_pickle_only_adapter_is_refused_without_loading_it(tmp_path, base):
    folder = save_peft_lora(base, tmp_path / "ad")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    # a pickle that would create a file if it were ever unpickled
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ExpertFormatError, match=r"only pickle weights found \(adapter_model.bin\).*never loads pickle"):
        load_peft_lora(folder, name="p")
    assert not marker.exists()


@pytest.mark.parametrize("damage,match", [
    ("truncate", "malformed safetensors"),
    ("missing", "missing adapter_model.safetensors"),
    ("noconfig", "missing adapter_config.json"),
    ("nan", "NaN or Inf"),
])
def test_broken_adapter_files_are_refused(tmp_path, base, damage, match):
    folder = save_peft_lora(base, tmp_path / "ad")
    f = folder / "adapter_model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "missing":
        f.unlink()
    elif damage == "noconfig":
        (folder / "adapter_config.json").unlink()
    elif damage == "nan":
        from safetensors.torch import load_file, save_file

        t = load_file(str(f))
        k = sorted(t)[0]
        t[k][0, 0] = float("nan")
        save_file(t, str(f))
    with pytest.raises(ExpertFormatError, match=match):
        load_peft_lora(folder, name="x")


def test_adapter_with_missing_factor_is_refused(tmp_path, base):
    from safetensors.torch import load_file, save_file

    folder = save_peft_lora(base, tmp_path / "ad")
    f = folder / "adapter_model.safetensors"
    t = load_file(str(f))
    del t[sorted(k for k in t if "lora_B" in k)[0]]
    save_file(t, str(f))
    with pytest.raises(ExpertFormatError, match="has no lora_B weight"):
        load_peft_lora(folder, name="x")


@pytest.mark.parametrize("mods,match", [
    ({}, "no module weights"),
    ({"m": LoRAWeights(torch.randn(2, 8), torch.randn(8, 3))}, "rank mismatch"),
    ({"m": LoRAWeights(torch.zeros(0, 8), torch.zeros(8, 0))}, "empty"),
    ({"m": LoRAWeights(torch.ones(2, 8, dtype=torch.int64), torch.ones(8, 2))}, "not a float"),
    ({"m": DeltaWeights(torch.randn(4, 8), torch.randn(3))}, "delta_bias has shape"),
    ({"m": LoRAWeights(torch.randn(2, 8), torch.randn(8, 2), float("inf"))}, "not finite"),
])
def test_malformed_experts_are_refused(mods, match):
    with pytest.raises(ExpertFormatError, match=match):
        Expert("e", mods)


def test_diff_of_a_finetune(base):
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.model.layers[0].mlp.up_proj.weight.add_(0.1)
        ft.model.layers[1].self_attn.o_proj.weight[0, 0] += 1.0
    e = expert_from_diff(ft, base, name="ft", description="fine-tune")
    assert sorted(e.modules) == ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    assert torch.allclose(e.modules["model.layers.0.mlp.up_proj"].delta, torch.full((64, 32), 0.1), atol=1e-6)
    assert e.metadata.source["type"] == "diff" and e.metadata.base_fingerprint["hidden_size"] == 32


def test_diff_reports_parameters_outside_linear_modules(base):
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.model.layers[0].mlp.up_proj.weight.add_(0.1)
        ft.model.norm.weight.add_(0.5)
    with pytest.warns(UserWarning, match=r"model\.norm\.weight"):
        e = expert_from_diff(ft, base, name="ft")
    assert e.metadata.extra["dropped_params"] == ["model.norm.weight"]
    with pytest.raises(ExpertFormatError, match="outside linear modules"):
        expert_from_diff(ft, base, name="ft", on_other_params="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expert_from_diff(ft, base, name="ft", on_other_params="ignore")


def test_diff_refuses_other_architectures_and_no_change(base):
    with pytest.raises(BaseMismatchError, match="shape"):
        expert_from_diff(tiny_llama(0, intermediate_size=48), base, name="x")
    with pytest.raises(ExpertFormatError, match="does not differ"):
        expert_from_diff(copy.deepcopy(base), base, name="x")


def test_low_rank_factors_are_the_best_approximation():
    torch.manual_seed(0)
    d = torch.randn(20, 12)
    w = low_rank_factors(d, 3)
    approx = w.delta_weight()
    assert w.rank == 3 and approx.shape == d.shape
    s = torch.linalg.svdvals(d)
    assert torch.linalg.matrix_norm(d - approx) == pytest.approx(float(s[3:].norm()), rel=1e-4)  # Eckart–Young
    exact = low_rank_factors(d, 12).delta_weight()
    assert torch.allclose(exact, d, atol=1e-5)
