"""Twin-Merging: the shared/exclusive split against dense references, and the twin router's contract."""

from __future__ import annotations

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.delta import truncate_factors
from moerge.adapters.twin_split import SHARED_NAME, twin_split
from moerge.errors import RoutingError
from moerge.library.derive import make_twin_library
from moerge.routers import build_router

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

DESC = {"sort": "Sort a list of numbers in ascending order.", "french": "Translate English text into French.",
        "sql": "Write an SQL query that answers a question about a database table."}


def test_truncate_factors_is_the_best_low_rank_approximation():
    torch.manual_seed(0)
    A, B = torch.randn(6, 20), torch.randn(12, 6)
    for r in (1, 3, 6):
        lw = truncate_factors(A, B, r)
        U, S, Vh = torch.linalg.svd(B @ A)
        ref = (U[:, :r] * S[:r]) @ Vh[:r]
        assert torch.allclose(lw.B @ lw.A, ref, atol=1e-4)


def test_split_shared_is_the_average_and_full_rank_exclusive_is_exact():
    base = tiny_chat_llama()
    experts = [rand_expert(base, n, seed=i, rank=2) for i, n in enumerate(DESC)]
    shared, excl = twin_split(experts, rank=64)
    for m in experts[0].modules:
        avg = sum(e.modules[m].delta_weight(torch.float32) for e in experts) / 3
        assert torch.allclose(shared.modules[m].delta_weight(torch.float32), avg, atol=1e-5)
        for e, x in zip(experts, excl):
            assert torch.allclose(x.modules[m].delta_weight(torch.float32) + avg,
                                  e.modules[m].delta_weight(torch.float32), atol=1e-4)
    assert [x.name for x in excl] == list(DESC) and excl[0].metadata.source["type"] == "twin-exclusive"
    _, low = twin_split(experts, rank=1)
    assert all(w.rank == 1 for w in low[0].modules.values())
    with pytest.raises(ValueError, match="at least 2"):
        twin_split(experts[:1])


def test_twin_router_shared_always_on_and_matches_the_expert_at_full_rank(tmp_path):
    base = tiny_chat_llama()
    src = ExpertLibrary.create(tmp_path / "src", base_model=base)
    for i, (n, d) in enumerate(DESC.items()):
        src.add(rand_expert(base, n, seed=i, rank=2, description=d))
    twin = make_twin_library(src, tmp_path / "twin", rank=64, dtype=torch.float32)
    assert twin.names() == [SHARED_NAME, *DESC]
    tok = tiny_tokenizer()
    model = MoErgeModel.from_library(base, twin, router=build_router("twin", candidates=2), tokenizer=tok)
    prompts = ["Arrange 12, 5, 8 and 1 from smallest to largest.", "Please put 'good night' into French."]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    state = model.route(**batch)
    w = state.candidates.weights
    assert state.candidates.row_names(0)[:2] == [SHARED_NAME, "sort"]
    assert state.candidates.row_names(1)[:2] == [SHARED_NAME, "french"]
    assert torch.allclose(w[:, 0], torch.ones(2)) and torch.allclose(w[:, 1:].sum(1), torch.ones(2))
    # shared + one exclusive part at weight 1 = that original expert (the split is exact at full rank)
    orig = MoErgeModel.from_library(tiny_chat_llama(), src, router="explicit")
    got = model(**batch, experts={SHARED_NAME: 1.0, "sort": 1.0}).logits
    ref = orig(**batch, experts={"sort": 1.0}).logits
    assert torch.allclose(got, ref, atol=1e-4)
    with pytest.raises(RoutingError, match="twin_shared"):
        MoErgeModel.from_library(tiny_chat_llama(), src, router="twin", tokenizer=tok)(**batch)
