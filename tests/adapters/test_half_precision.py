"""Experts on a half-precision base compute in float32 by default, as PEFT's adapters do (``autocast_adapter_dtype``):
the output agrees with PEFT's default forward to within bf16 rounding, where computing them in bf16 does not;
``expert_dtype=torch.bfloat16`` keeps the base's precision."""

from __future__ import annotations

import copy

import torch

from moerge import ExpertLibrary, MoErgeModel

from helpers import save_peft_lora, tiny_llama


def test_adapters_compute_in_float32_on_a_bf16_base_as_peft_does(tmp_path):
    from peft import PeftModel

    base32 = tiny_llama(hidden_size=64, intermediate_size=128)
    folder = save_peft_lora(base32, tmp_path / "ad", r=16, target_modules="all-linear")
    base = copy.deepcopy(base32).to(torch.bfloat16)
    ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))

    def peft(autocast: bool) -> torch.Tensor:
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folder), autocast_adapter_dtype=autocast).eval()
        with torch.no_grad():
            return pm(input_ids=ids).logits.float()

    def ours(**kwargs) -> tuple[torch.Tensor, torch.dtype]:
        lib = ExpertLibrary.create(tmp_path / f"lib{len(kwargs)}", base_model=base)
        model = MoErgeModel.from_library(copy.deepcopy(base), lib, router="explicit", **kwargs)
        model.add_expert(folder, name="ad")
        with torch.no_grad():
            out = model(input_ids=ids, experts={"ad": 1.0}).logits
        assert out.dtype == torch.bfloat16  # the model's output stays in the base's dtype
        return out.float(), next(iter(model.expert_set.layers.values())).bank.A_all.dtype

    reference, bf16_adapters = peft(True), peft(False)
    gap = float((reference - bf16_adapters).abs().max())  # what computing the adapters in bf16 costs
    ulp = torch.finfo(torch.bfloat16).eps * float(reference.abs().max())
    assert gap > ulp

    default, dtype = ours()
    assert dtype == torch.float32
    assert float((default - reference).abs().max()) <= ulp  # at most one rounding step of the largest logit

    kept, dtype = ours(expert_dtype=torch.bfloat16)
    assert dtype == torch.bfloat16
    assert not torch.equal(kept, default)  # the option does keep the base's precision
