"""One merge path: ``MoErgeModel.merge`` and ``merge_experts`` + ``fold_into`` give the same model for every merge
method, with and without LiNeS, on a Llama base with biases and on a GPT-2 (``Conv1D``) base, with LoRA and dense
experts that target different subsets of the layers (so LiNeS counting layers from the experts would show)."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import DeltaWeights, Expert, ExpertLibrary, LoRAWeights, MoErgeModel
from moerge.adapters.merge import base_num_layers, fold_into, list_merge_methods, merge_experts, merge_into
from moerge.core.fingerprint import linear_modules

from helpers import tiny_gpt2, tiny_llama

WEIGHTS = {"x": 0.7, "y": -0.4, "z": 0.5}
LINES = (0.2, 0.8)
# per expert: (kind, the blocks it targets, the module names it targets within a block); no expert reaches the
# last of the three blocks, so counting layers from the experts' modules would give 2
TARGETS = {
    "llama": {"x": ("lora", (0, 1), ("q_proj", "down_proj")), "y": ("dense", (0,), ("q_proj", "v_proj")),
              "z": ("lora", (1,), ("q_proj", "o_proj"))},
    "gpt2": {"x": ("lora", (0, 1), ("c_attn", "mlp.c_proj")), "y": ("dense", (0,), ("c_attn", "c_fc")),
             "z": ("lora", (1,), ("c_attn", "attn.c_proj"))},
}


def _base(kind: str) -> torch.nn.Module:
    if kind == "llama":
        return tiny_llama(0, num_hidden_layers=3, attention_bias=True)  # q/k/v/o carry biases
    base = tiny_gpt2(0)
    cfg = base.config
    cfg.n_layer = 3
    return type(base)(cfg).eval()  # 3 blocks of Conv1D modules with biases


def _expert(base: torch.nn.Module, name: str, kind: str, blocks: tuple[int, ...], suffixes: tuple[str, ...],
            seed: int) -> Expert:
    """A random expert on the modules of ``blocks`` whose names end with one of ``suffixes``: LoRA (rank 3), or
    dense with a bias update where the module has a bias."""
    g = torch.Generator().manual_seed(seed)
    mods: dict[str, LoRAWeights | DeltaWeights] = {}
    for m, (out_f, in_f) in linear_modules(base).items():
        if not any(f".{b}." in m for b in blocks) or not m.endswith(suffixes):
            continue
        if kind == "lora":
            mods[m] = LoRAWeights(torch.randn(3, in_f, generator=g) / in_f ** 0.5,
                                  torch.randn(out_f, 3, generator=g) / 3 ** 0.5, 2.0)
        else:
            has_bias = base.get_submodule(m).bias is not None
            mods[m] = DeltaWeights(torch.randn(out_f, in_f, generator=g) * 0.1,
                                   torch.randn(out_f, generator=g) * 0.1 if has_bias else None)
    assert mods
    return Expert(name, mods)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def setup(request, tmp_path_factory):
    """A 3-block base, a MoErgeModel over three experts (two LoRA, one dense with biases), and token ids."""
    kind = request.param
    base = _base(kind)
    lib = ExpertLibrary.create(tmp_path_factory.mktemp(kind) / "lib", base_model=base)
    for i, (n, (ek, blocks, suffixes)) in enumerate(TARGETS[kind].items()):
        lib.add(_expert(base, n, ek, blocks, suffixes, seed=10 + i))
    reference = copy.deepcopy(base)
    model = MoErgeModel.from_library(base, lib, router="explicit")
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    return model, reference, ids


def _options(method: str) -> dict:
    return {"generator": torch.Generator().manual_seed(7)} if method.startswith("dare") else {}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layer_scaling", [None, LINES], ids=["plain", "lines"])
@pytest.mark.parametrize("method", list_merge_methods())
def test_model_merge_equals_merge_experts_and_fold_into(setup, method, layer_scaling):
    model, reference, ids = setup
    experts = [model.get_expert(n) for n in WEIGHTS]
    order = [n for n, _ in reference.named_modules()]
    merged = merge_experts(experts, WEIGHTS, method, layer_scaling=layer_scaling, module_order=order,
                           num_layers=base_num_layers(reference) if layer_scaling else None, **_options(method))
    expected = _logits(fold_into(copy.deepcopy(reference), merged), ids)
    ours = _logits(model.merge(WEIGHTS, method, layer_scaling=layer_scaling, **_options(method)), ids)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, _logits(reference, ids), atol=1e-3)  # the merge changed the model
    # merge_into is the same path in one call
    into = merge_into(copy.deepcopy(reference), experts, WEIGHTS, method, layer_scaling=layer_scaling,
                      **_options(method))
    torch.testing.assert_close(_logits(into, ids), expected, atol=1e-5, rtol=1e-5)


def test_lines_counts_the_base_layers_not_the_experts(setup):
    model, reference, ids = setup
    assert base_num_layers(reference) == 3
    library_experts = [model.library.get(n) for n in WEIGHTS]  # their metadata records the base: 3 layers
    expected = _logits(model.merge(WEIGHTS, "ties", layer_scaling=LINES, density=0.5), ids)
    by_record = merge_experts(library_experts, WEIGHTS, "ties", layer_scaling=LINES, density=0.5)
    assert by_record.metadata.source["num_layers"] == 3
    torch.testing.assert_close(_logits(fold_into(copy.deepcopy(reference), by_record), ids), expected,
                               atol=1e-5, rtol=1e-5)
    # the experts reach blocks 0 and 1 only: counting 2 layers from them scales every module differently
    by_experts = merge_experts(library_experts, WEIGHTS, "ties", layer_scaling=LINES, density=0.5, num_layers=2)
    assert not torch.allclose(_logits(fold_into(copy.deepcopy(reference), by_experts), ids), expected, atol=1e-3)
    # without a recorded base or num_layers=, LiNeS is refused rather than guessed
    bare = [Expert(e.name, e.modules) for e in library_experts]
    with pytest.raises(ValueError, match="num_layers"):
        merge_experts(bare, WEIGHTS, "ties", layer_scaling=LINES, density=0.5)


def test_base_num_layers_counts_modules_when_the_config_does_not_say():
    bare = torch.nn.Module()
    bare.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    assert base_num_layers(bare) == 4 and base_num_layers(torch.nn.Linear(2, 2)) == 1
    assert base_num_layers(tiny_gpt2(0)) == 2  # GPT-2's config says n_layer


def test_merge_into_with_no_experts_leaves_the_model_and_unknown_experts_are_refused(setup):
    from moerge.errors import RoutingError

    model, reference, ids = setup
    plain = model.merge({})
    torch.testing.assert_close(_logits(plain, ids), _logits(reference, ids))
    with pytest.raises(RoutingError, match="nope"):
        model.merge({"x": 1.0, "nope": 1.0})
