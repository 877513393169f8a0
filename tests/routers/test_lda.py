"""LDA: the statistics of an expert's module inputs, the discriminant against the textbook formula, rows routed by
their own candidates only, statistics stored in the library and reused, and why the pooled covariance matters."""

from __future__ import annotations

import pytest
import torch

import moerge.routers.lda as lda
from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.routing import Candidates, LayerInfo, standardize
from moerge.routing.training import collate

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

PAIRS = [("reverse: a b c", "c b a"), ("reverse: x y", "y x"), ("reverse: one two three", "three two one")]


def _reference_inputs(base, tok, module, pairs, positions="answer"):
    """``layer_norm`` of ``module``'s inputs at the tokens that write the answer (each one's next token is the
    answer's: the prompt's last token through the answer's last), or at every token, collected by hand."""
    got = []
    b = collate(tok, pairs)
    h = base.get_submodule(module).register_forward_pre_hook(lambda m, a: got.append(a[0]))
    base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    keep = torch.zeros_like(b["labels"], dtype=torch.bool)
    keep[:, :-1] = b["labels"][:, 1:] != -100
    if positions == "all":
        keep = b["attention_mask"] == 1
    return standardize(got[0])[keep].double()


def test_statistics_are_the_mean_and_the_spread_of_the_answer_tokens():
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    expert = rand_expert(base, "e", seed=1)
    before = [p.clone() for p in base.parameters()]
    stats = lda.expert_statistics(base, tok, expert, PAIRS, rank=3, with_expert=False)
    assert set(stats) == set(expert.modules)
    for m, v in stats.items():
        z = _reference_inputs(base, tok, m, PAIRS)
        d = z.shape[1]
        mean, factors, count, residual = lda.unpack(v, d)
        assert int(count) == len(z)
        assert torch.allclose(mean.double(), z.mean(0), atol=1e-5)
        cov = (z - z.mean(0)).t() @ (z - z.mean(0)) / len(z)
        top = factors.double().t() @ factors.double()  # the top-3 part of the spread
        ev = torch.linalg.eigvalsh(cov).flip(0)
        assert torch.allclose(torch.linalg.eigvalsh(top).flip(0)[:3], ev[:3], rtol=1e-4, atol=1e-6)
        assert float(residual) == pytest.approx(float(ev[3:].sum().detach()) / (d - 3), rel=1e-4, abs=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), before))  # hooks gone, base untouched
    every = lda.expert_statistics(base, tok, expert, PAIRS, rank=3, with_expert=False, positions="all")
    for m, v in every.items():  # over the prompts' tokens too
        z = _reference_inputs(base, tok, m, PAIRS, positions="all")
        mean, _, count, _ = lda.unpack(v, z.shape[1])
        assert int(count) == len(z) > int(lda.unpack(stats[m], z.shape[1])[2])
        assert torch.allclose(mean.double(), z.mean(0), atol=1e-5)
    with_expert = lda.expert_statistics(base, tok, expert, PAIRS, rank=3)
    m = next(m for m in with_expert if ".1." in m)  # a later layer sees the expert's change of earlier ones
    assert not torch.allclose(with_expert[m], stats[m])


def test_discriminant_is_fishers_with_the_pooled_covariance():
    torch.manual_seed(0)
    d, r = 12, 2
    router = build_router("lda", rank=r, top_k=None, temperature=2.0)
    names = ("a", "b", "c")
    truth = {}
    for i, n in enumerate(names):
        mean = torch.randn(d)
        factors = torch.randn(r, d) * 0.5
        count, residual = 10 + 5 * i, 0.1 + 0.05 * i
        truth[n] = (mean, factors, count, residual)
        router._set_data(n, {"m": lda.pack(mean, factors, count, residual)})
    x = torch.randn(2, 4, d) * 3 + 1
    cands = Candidates(torch.tensor([[0, 1, 2], [2, 0, -1]]), torch.zeros(2, 3), names)
    logits = router.logits(x, cands, LayerInfo(0, "m", d, d))
    z = standardize(x).double()
    for b in range(2):
        row = [i for i in cands.ids[b].tolist() if i >= 0]
        n_tot = sum(truth[names[i]][2] for i in row)
        share = {i: truth[names[i]][2] / n_tot for i in row}
        s2 = sum(share[i] * truth[names[i]][3] for i in row)
        sigma = sum(share[i] * (truth[names[i]][1].t() @ truth[names[i]][1]).double() for i in row)
        sigma = sigma + s2 * torch.eye(d, dtype=torch.float64)
        ref = torch.stack([(z[b] @ torch.linalg.solve(sigma, truth[names[i]][0].double())
                            - 0.5 * truth[names[i]][0].double() @ torch.linalg.solve(sigma, truth[names[i]][0].double()))
                           / 2.0 for i in row], -1)  # (T, n): the textbook logits
        got = logits[b, :, : len(row)].double()
        # the gate subtracts the candidates' mean logit (the softmax is the same): equal up to that shift
        assert torch.allclose(got, ref - ref.mean(-1, keepdim=True), atol=1e-3, rtol=1e-4)
        assert torch.allclose(torch.softmax(got, -1), torch.softmax(ref, -1), atol=1e-5)
        assert torch.isinf(logits[b, :, len(row):]).all()


def test_a_candidate_without_statistics_scores_as_the_average_one():
    """A placeholder (a deferred expert under GLIDER, zeros) is neither always first nor always last: its logit is
    the candidates' mean, so the global prior decides its place."""
    torch.manual_seed(2)
    d = 8
    router = build_router("lda", rank=2, top_k=None)
    names = ("a", "b", "new")
    for n in names[:2]:
        router._set_data(n, {"m": lda.pack(torch.randn(d) * 3, torch.randn(2, d), 20, 0.2)})
    router._set_data("new", {"m": torch.zeros(3 * d + 2)})
    logits = router.logits(torch.randn(1, 50, d), Candidates(torch.tensor([[0, 1, 2]]), torch.zeros(1, 3), names),
                           LayerInfo(0, "m", d, d))[0]
    assert torch.allclose(logits[:, 2], torch.zeros(50)) and torch.allclose(logits[:, :2].mean(-1), torch.zeros(50),
                                                                            atol=1e-4)
    assert (logits[:, 2] > logits[:, :2].min(-1).values).all() and (logits[:, 2] < logits[:, :2].max(-1).values).all()


def test_a_rows_gate_depends_on_its_own_candidates_only():
    torch.manual_seed(1)
    d = 8
    router = build_router("lda", rank=2, top_k=None)
    names = ("a", "b", "c", "d")
    for n in names:
        router._set_data(n, {"m": lda.pack(torch.randn(d), torch.randn(2, d), 20, 0.2)})
    x = torch.randn(1, 3, d)
    layer = LayerInfo(0, "m", d, d)
    alone = router.logits(x, Candidates(torch.tensor([[0, 1]]), torch.zeros(1, 2), names), layer)
    together = router.logits(x.expand(2, -1, -1), Candidates(torch.tensor([[0, 1], [2, 3]]), torch.zeros(2, 2), names),
                             layer)
    assert torch.allclose(together[0], alone[0], atol=1e-5)  # not pooled with row 1's experts


def test_the_pooled_covariance_separates_what_the_means_alone_cannot():
    """Two experts whose tokens differ along a quiet direction while both vary a lot along a loud one: the nearest
    mean confuses them, the discriminant does not."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 400
    loud, quiet = torch.zeros(d), torch.zeros(d)
    loud[0], loud[1], quiet[2], quiet[3] = 1.0, -1.0, 1.0, -1.0  # zero-sum, as standardized inputs are
    shift = 0.3 * quiet + 0.2 * loud

    def tokens(sign):
        return sign * shift / 2 + torch.randn(n, 1, generator=g) * 3 * loud + 0.05 * torch.randn(n, d, generator=g)

    router = build_router("lda", rank=2, top_k=None)
    names = ("pos", "neg")
    for name, sign in zip(names, (1, -1)):
        z = tokens(sign)
        _, s, vh = torch.linalg.svd(z - z.mean(0), full_matrices=False)
        router._set_data(name, {"m": lda.pack(z.mean(0), vh[:2] * (s[:2] / n ** 0.5).unsqueeze(1), n,
                                              float((s[2:] ** 2).sum()) / n / (d - 2))})
    test = torch.cat([tokens(1), tokens(-1)]).unsqueeze(0)  # (1, 2n, d)
    truth = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    cands = Candidates(torch.tensor([[0, 1]]), torch.zeros(1, 2), names)
    picked = router.logits(test, cands, LayerInfo(0, "m", d, d))[0].argmax(-1)
    means = torch.stack([lda.unpack(router.statistics_of(n_)["m"], d)[0] for n_ in names])
    nearest = torch.cdist(standardize(test[0]), means).argmin(-1)
    assert (picked == truth).float().mean() > 0.95
    assert (nearest == truth).float().mean() < 0.8


def test_statistics_computed_on_add_stored_in_the_library_and_reused(tmp_path, monkeypatch):
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(("e0", "e1")):
        lib.add(rand_expert(base, n, seed=i, examples=[p for p, _ in PAIRS]))
    calls = []
    real = lda.expert_statistics

    def counting(*a, **kw):
        calls.append(a[2].name)
        return real(*a, **kw)

    monkeypatch.setattr(lda, "expert_statistics", counting)
    model = MoErgeModel.from_library(base, lib, router=build_router("lda", rank=4), tokenizer=tok)
    assert sorted(calls) == ["e0", "e1"]
    kind = model.router.routing_kind
    assert kind == "lda-r4"
    stored = ExpertLibrary.open(lib.root).routing_for("e0", kind, lib["e0"].digest())
    assert stored is not None
    raw = next((lib.root / "experts" / "e0").glob("routing-lda-r4-*"))
    from safetensors.torch import load_file

    tensors = load_file(raw)  # q_proj and v_proj read the same input: stored once, under both names
    main = [k for k in tensors if not k.endswith("@n")]
    assert len(main) == 2 * 2 and sum("q_proj+" in k and k.endswith("v_proj") for k in main) == 2
    assert {m for k in main for m in k.split("+")} == set(lib["e0"].modules)
    assert all(tensors[k].dtype == torch.float16 and tensors[k + "@n"].dtype == torch.float32 for k in main)
    ids = tok(["reverse: p q"], return_tensors="pt")["input_ids"]
    first = model(input_ids=ids).logits
    calls.clear()
    again = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(lib.root),
                                     router=build_router("lda", rank=4), tokenizer=tok)
    assert calls == []  # read from the library, not computed
    # stored in float16: the same routing up to rounding
    assert torch.allclose(again(input_ids=ids).logits, first, atol=1e-2)
    e0_file = (lib.root / "experts" / "e0").glob("routing-lda-r4-*")
    before = {p.name: p.read_bytes() for p in e0_file}
    assert before
    model.add_expert(rand_expert(tiny_chat_llama(), "e2", seed=5, examples=["reverse: k l m"]))
    model.wait_routing()
    e2 = ExpertLibrary.open(lib.root)
    assert e2.routing_for("e2", kind, e2["e2"].digest()) is not None  # computed (in a child process) and stored
    assert {p.name: p.read_bytes() for p in (lib.root / "experts" / "e0").glob("routing-lda-r4-*")} == before


def test_config_is_checked():
    assert build_router("lda", rank=4).routing_kind == "lda-r4"
    assert build_router("lda", rank=4, positions="all").routing_kind == "lda-r4-all"  # stored apart
    for bad in ({"rank": 0}, {"temperature": 0}, {"rank": 1.5}, {"positions": "prompt"}):
        with pytest.raises(ValueError):
            build_router("lda", **bad)
