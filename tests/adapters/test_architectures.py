"""Every architecture moerge is said to serve, against PEFT's own forward: a tiny random model of each, an
"all-linear" PEFT adapter (PEFT expands it against the model, skipping the output layer; MoE models' routed experts
are fused 3-D parameters, so their adapters here target the attention: tests/adapters/test_moe_peft.py covers the
fused experts and routers), and the routed output of the expert at
weight 1.0 compared with PEFT's to 1e-5."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.peft_loader import load_peft_lora

from helpers import VOCAB, peft_logits, save_peft_lora

IDS = torch.tensor([[5, 17, 33, 9, 61, 4, 12, 40], [7, 3, 88, 21, 50, 2, 11, 30]])
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

ARCHITECTURES = {
    # model_type: (config overrides, LoRA settings)
    "llama": ({}, {}),
    "mistral": ({}, {"use_rslora": True}),
    "qwen2": ({}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
    "qwen3": ({"head_dim": 8}, {}),
    "gemma": ({"head_dim": 8}, {}),
    "gemma2": ({"head_dim": 8}, {"exclude_modules": ["down_proj"]}),
    "gemma3_text": ({"head_dim": 8}, {}),
    "phi3": ({}, {}),  # fused qkv_proj and gate_up_proj
    "gpt2": (dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0), {}),  # Conv1D: fan_in_fan_out
    "gpt_neox": (dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, pad_token_id=0), {}),
    "opt": (dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0), {}),
    "falcon": (dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    pad_token_id=0), {}),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, {"target_modules": ATTENTION}),
    "qwen2_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 32}, {"target_modules": ATTENTION}),
}


def tiny(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides, _ = ARCHITECTURES[model_type]
    base = {} if model_type in ("gpt2", "gpt_neox", "opt", "falcon") else SMALL
    config = AutoConfig.for_model(model_type, **{**base, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.config._name_or_path = f"tiny-{model_type}"
    return model.eval()


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_architecture_matches_peft(tmp_path, model_type):
    base = tiny(model_type)
    _, lora = ARCHITECTURES[model_type]
    settings = {"target_modules": "all-linear", **lora}
    if model_type == "gpt2":
        settings["fan_in_fan_out"] = True
    folder = save_peft_lora(base, tmp_path / "ad", **settings)
    expert = load_peft_lora(folder, name="ad")
    assert not any(m.endswith("lm_head") for m in expert.modules)  # all-linear leaves the output layer alone
    ref = peft_logits(base, folder, IDS)
    assert not torch.allclose(ref, base(input_ids=IDS).logits, atol=1e-3)
    model = MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.create(tmp_path / "lib", base_model=base),
                                     router="explicit")
    model.add_expert(folder, name="ad")
    assert len(model.patched_modules) == len(expert.modules)
    with torch.no_grad():
        ours = model(input_ids=IDS, experts={"ad": 1.0}).logits
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
