"""The native CPU step (moerge/runtime/csrc/routed_step.cpp) against the torch formulas it replaces: each gate
finish, top-k and all candidates, padding slots and columns, tokens with no finite logit, sequence weights, both
layouts of W, several rows and tokens; end to end, a routed model answers as on the torch path (logits, greedy
tokens, routing trace), on more threads at once; bad operands are refused; without a build the torch path runs."""

from __future__ import annotations

import copy
import shutil
import threading
import warnings

import pytest
import torch

from moerge import MoErgeModel
from moerge.routers import build_router
from moerge.routing import select_weights
from moerge.runtime import native

from helpers import VOCAB, rand_expert, tiny_llama

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the native step")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.available(), "the native step did not build on a machine with a compiler"


def _operands(B, T, IN, OUT, K, ranks, seed, pad_slot=False, columns=True):
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks) + 2  # two padding columns (slot -1) at the end
    x = torch.randn(B, T, IN, generator=g)
    y = torch.randn(B, T, OUT, generator=g)
    Wc = torch.randn(B, K + R, IN, generator=g) / IN ** 0.5
    Wc[:, K + R - 2:] = 0.0
    W = Wc.transpose(1, 2) if columns else Wc.transpose(1, 2).contiguous()  # (B, IN, K + R)
    Bt = torch.randn(B, R, OUT, generator=g)
    Bt[:, R - 2:] = 0.0
    slots = torch.cat([torch.full((r,), k, dtype=torch.int32) for k, r in enumerate(ranks)]
                      + [torch.full((2,), -1, dtype=torch.int32)]).repeat(B, 1)
    bias = torch.randn(B, 1, K, generator=g)
    if pad_slot:
        bias[:, :, -1] = float("-inf")  # a candidate slot this row does not have
        bias[-1, :, :] = float("-inf")  # and a row with none at all: its weights are 0
    return x, y, W, Bt, slots, bias


def _reference(x, y, W, Bt, slots, bias, finish, top_k):
    K = bias.shape[-1]
    z = torch.bmm(x, W)
    xv = z[..., :K]
    if finish == "abs":
        xv = xv.abs()
    elif finish == "standardized":
        xv = xv * torch.rsqrt(x.var(-1, correction=0, keepdim=True) + 1e-5)
    w = select_weights(xv + bias, top_k)
    E = torch.zeros(slots.shape[0], K, slots.shape[1])
    for b in range(slots.shape[0]):
        for r, k in enumerate(slots[b].tolist()):
            if k >= 0:
                E[b, k, r] = 1.0
    return y + torch.bmm(z[..., K:] * torch.bmm(w, E), Bt), w


@pytest.mark.parametrize("finish", ["none", "abs", "standardized"])
@pytest.mark.parametrize("top_k", [1, 2, None])
@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 2)])
def test_step_equals_the_torch_formulas(finish, top_k, columns, B, T):
    x, y, W, Bt, slots, bias = _operands(B, T, 48, 40, 4, (3, 2, 4, 1), seed=B * 10 + T, pad_slot=B > 1,
                                         columns=columns)
    want_y, want_w = _reference(x, y, W, Bt, slots, bias, finish, top_k)
    run = native.step(W, Bt, slots, bias, 4, finish, top_k)
    got_w = run(x, y)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    if B > 1:  # the row without candidates got nothing
        assert torch.equal(got_w[-1], torch.zeros_like(got_w[-1]))


def test_sequence_weights_step_is_shrink_then_expand():
    x, y, W, Bt, _, _ = _operands(2, 3, 32, 24, 0, (4, 4), seed=5)
    want = y + torch.bmm(torch.bmm(x, W), Bt)
    out = native.step(W, Bt, None, None, 0, "none", None)(x, y)
    assert out is None
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_infinite_logits_give_zero_weights_as_the_torch_path():
    x, y, W, Bt, slots, bias = _operands(1, 1, 16, 8, 3, (2, 2, 2), seed=2)
    bias[0, 0, 0] = float("inf")
    want_y, want_w = _reference(x, y.clone(), W, Bt, slots, bias, "none", 2)
    got_w = native.step(W, Bt, slots, bias, 3, "none", 2)(x, y)
    assert torch.equal(got_w, want_w) and torch.equal(got_w, torch.zeros_like(got_w))
    torch.testing.assert_close(y, want_y)


@pytest.mark.parametrize("finish", ["abs", "standardized"])
@pytest.mark.parametrize("T", [1, 5])
def test_rows_read_where_they_lie_equal_the_gathered_copy(finish, T):
    """A bank's rows read by index (no copy: column r of row b is row idx[b, r] of A_all and Bt_all, times its
    scale), as a joined batch of two requests of different widths and a request without factors, against each
    request's gathered copy stepped alone. Wide enough (IN, OUT not multiples of 8) to run every vector loop."""
    g = torch.Generator().manual_seed(11)
    IN, OUT, r = 45, 70, 3
    A_all = torch.randn(1 + 6 * r, IN, generator=g) / IN ** 0.5
    A_all[0] = 0.0
    Bt_all = torch.randn(1 + 6 * r, OUT, generator=g)
    Bt_all[0] = 0.0

    def request(B, K, seed):
        gg = torch.Generator().manual_seed(seed)
        experts = torch.stack([torch.randperm(6, generator=gg)[:K] for _ in range(B)])  # (B, K)
        idx = (1 + experts.unsqueeze(-1) * r + torch.arange(r)).reshape(B, K * r)
        idx = torch.cat([idx, torch.zeros(B, 1, dtype=torch.long)], 1)  # one padding column (row 0)
        scale = torch.rand(B, K * r + 1, generator=gg) + 0.5
        slots = torch.cat([torch.arange(K).repeat_interleave(r).expand(B, -1), torch.full((B, 1), -1)], 1)
        Vt = (torch.randn(B, K, IN, generator=gg) / IN ** 0.5).transpose(1, 2)  # each vector contiguous
        bias = torch.randn(B, 1, K, generator=gg)
        x = torch.randn(B, T, IN, generator=gg)
        return (A_all, idx, Bt_all, idx, scale, Vt, slots.to(torch.int32), bias), x

    (s1, x1), (s2, x2) = request(2, 3, 1), request(3, 2, 2)
    none = (torch.zeros(1, IN), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, OUT),
            torch.zeros(1, 0, dtype=torch.long), None, torch.zeros(1, IN, 1), torch.zeros(1, 0, dtype=torch.int32),
            torch.zeros(1, 1, 1))
    x = torch.cat([x1, torch.randn(1, T, IN, generator=g), x2])
    y = torch.randn(6, T, OUT, generator=g)
    want = y.clone()
    got_w = native.step_segments([s1, none, s2], 3, finish, 2)(x, y)
    for seg, rows, k in ((s1, slice(0, 2), 3), (s2, slice(3, 6), 2)):
        A, idx, Bt, _, scale, Vt, slots, bias = seg
        W = torch.cat([Vt.transpose(1, 2), A[idx]], 1).transpose(1, 2)  # the gathered copy, by columns
        Bg = Bt[idx] * scale.unsqueeze(-1)
        want_y, want_w = _reference(x[rows], want[rows], W, Bg, slots, bias, finish, 2)
        torch.testing.assert_close(y[rows], want_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_w[rows, :, :k], want_w, rtol=1e-5, atol=1e-6)
        assert torch.equal(got_w[rows, :, k:], torch.zeros_like(got_w[rows, :, k:]))  # padded slots: never chosen
    assert torch.equal(y[2], want[2])  # the request without factors: nothing added
    with pytest.raises(RuntimeError, match="out of range"):
        bad = list(s1)
        bad[1] = s1[1].clone().fill_(A_all.shape[0])
        native.step_segments([tuple(bad)], 3, finish, 2)


def test_bad_operands_are_refused_and_change_nothing():
    x, y, W, Bt, slots, bias = _operands(1, 1, 16, 8, 2, (2, 2), seed=3)
    with pytest.raises(RuntimeError, match="W and Bt do not match"):
        native.step(W, Bt[:, 1:], slots, bias, 2, "abs", 1)
    with pytest.raises(RuntimeError, match="a gate needs Vt, slots and bias"):
        native.step(W, Bt, None, None, 2, "abs", 1)
    with pytest.raises(RuntimeError, match="float32"):
        native.step(W.double(), Bt.double(), slots, bias, 2, "abs", 1)
    run = native.step(W, Bt, slots, bias, 2, "abs", 1)
    before = y.clone()
    with pytest.raises(RuntimeError, match="does not match"):
        run(x[..., 1:], y)
    with pytest.raises(RuntimeError, match="float32"):
        run(x.double(), y)
    assert torch.equal(y, before)


def _model(router="arrow", **kw):
    base = tiny_llama()
    model = MoErgeModel(copy.deepcopy(base), build_router(router, **kw))
    experts = [rand_expert(base, f"e{i}", seed=i, rank=(2, 4, 3)[i % 3]) for i in range(5)]
    model.expert_set.install(experts, model.router)
    return model


def _decode(model, ids, steps=5, **route):
    out = []
    with torch.no_grad(), model.routing(input_ids=ids, **route) as state:
        res = model.base(input_ids=ids, use_cache=True)
        for _ in range(steps):
            nxt = res.logits[:, -1:].argmax(-1)
            res = model.base(input_ids=nxt, past_key_values=res.past_key_values, use_cache=True)
            out.append(res.logits)
        trace = state.trace()
    return torch.cat(out, 1), trace


@pytest.mark.parametrize("router,kw", [("arrow", {"top_k": 2}), ("arrow", {"top_k": 1}), ("phatgoose", {"top_k": None}),
                                       ("xlora", {"top_k": None}), ("forced", {})])
@pytest.mark.parametrize("rows", [3, 20])
def test_routed_decode_equals_the_torch_path(router, kw, rows, monkeypatch):
    """(PHATGOOSE and X-LoRA gates of these random experts give all candidates the same logit, so their top-k is a
    tie, which torch.topk breaks as it likes and the native step by the lower slot: they mix every candidate.)"""
    forced = router == "forced"  # sequence weights: a forced mix per row
    model = _model("arrow" if forced else router, **kw)
    ids = torch.randint(3, VOCAB, (rows, 7), generator=torch.Generator().manual_seed(4))
    mixes = [{"e0": 0.7, "e1": 0.3}, {"e2": 1.0}, {"e1": 0.5, "e3": 0.25, "e4": 0.25}]
    route = {"experts": [mixes[r % 3] for r in range(rows)]} if forced else {}
    calls = []
    real = native.step_segments

    class Counting:  # the bound step, counting the steps it runs (with the trace's sums kept by the step itself)
        def __init__(self, run):
            self.run = run

        def __call__(self, x, y):
            calls.append(x.shape)
            return self.run(x, y)

        def call_sum(self, x, y):
            calls.append(x.shape)
            return self.run.call_sum(x, y)

        def take_usage(self):
            return self.run.take_usage()

    def counting(*a, **k):
        return Counting(real(*a, **k))

    monkeypatch.setattr(native, "step_segments", counting)
    fast, fast_trace = _decode(model, ids, **route)
    assert any(c[:2] == (rows, 1) for c in calls), "no decode step ran natively"
    monkeypatch.setenv("MOERGE_NO_KERNEL", "1")
    slow, slow_trace = _decode(model, ids, **route)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    for a, b in zip(fast_trace, slow_trace):
        assert a.candidates == b.candidates
        for name, v in a.experts.items():
            assert v == pytest.approx(b.experts[name], abs=1e-5)
        assert a.layer_usage.keys() == b.layer_usage.keys()  # per module, summed by the step or handed over
        for module, usage in a.layer_usage.items():
            assert usage == pytest.approx(b.layer_usage[module], abs=1e-5)


def test_which_steps_run_natively(monkeypatch):
    y = torch.zeros(1, 1, 4)
    assert native.PARALLEL  # this machine's compiler has OpenMP: every step
    long = torch.zeros(2, 4 * native.MAX_UNCOPIED_TOKENS, 4)
    assert native.fits(long, long) and native.fits(long, long, uncopied=True)
    monkeypatch.setattr(native, "PARALLEL", False)  # a build without OpenMP: one thread
    assert native.fits(torch.zeros(40, 1, 4), torch.zeros(40, 1, 4))  # a decode step of any batch
    assert native.fits(torch.zeros(1, native.MAX_TOKENS, 4), torch.zeros(1, native.MAX_TOKENS, 4))
    assert not native.fits(torch.zeros(2, native.MAX_TOKENS, 4), torch.zeros(2, native.MAX_TOKENS, 4))
    prompt = torch.zeros(2, native.MAX_UNCOPIED_TOKENS // 2, 4)
    assert native.fits(prompt, prompt, uncopied=True) and not native.fits(long, long, uncopied=True)
    assert not native.fits(torch.zeros(1, 1, 4), torch.zeros(1, 1, 8)[..., ::2])  # y is written in place
    assert native.fits(torch.zeros(1, 1, 4), y)


def test_generate_is_the_same_from_concurrent_threads():
    model = _model("arrow", top_k=2)
    prompts = [torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    alone = [model.generate(input_ids=p, max_new_tokens=6, do_sample=False) for p in prompts]
    got: dict[int, torch.Tensor] = {}

    def run(i):
        got[i] = model.generate(input_ids=prompts[i], max_new_tokens=6, do_sample=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(alone):
        assert torch.equal(got[i], want)


def test_without_a_build_the_torch_path_runs_and_says_so(monkeypatch):
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    model = _model("arrow", top_k=2)
    want, _ = _decode(model, ids)

    def broken(verbose=False):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "build", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native.available()
        got, _ = _decode(_model("arrow", top_k=2), ids)
    assert any("native CPU step could not be built" in str(w.message) and "no compiler here" in str(w.message)
               for w in caught)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gated", [False, True])
def test_copying_out_of_the_bank_gives_its_rows_and_lets_the_bank_go(gated):
    """The copies are the bank's rows (the gate's vectors in front, LoRA scales folded into Bt), in the dtype asked
    for; once they are made the gathered factors hold no reference to the bank, which a later swap may then reuse."""
    import weakref

    from moerge.routing import LinearGate
    from moerge.runtime.gathered import BankRows, GatheredLoRA

    g = torch.Generator().manual_seed(5)
    IN, OUT, B, R, K = 12, 9, 2, 4, 2
    A_all, Bt_all = torch.randn(7, IN, generator=g), torch.randn(7, OUT, generator=g)
    idx = torch.randint(0, 7, (B, R), generator=g)
    col_w = torch.rand(B, R, 1, generator=g)
    Vt = torch.randn(B, IN, K, generator=g)
    gate = LinearGate(Vt, torch.zeros(B, 1, K)) if gated else None
    rows = BankRows(A_all, Bt_all, idx, col_w)
    alive = weakref.ref(rows)
    lora = GatheredLoRA(None, None, None, gate, bank=rows, dtype=torch.float64, device=A_all.device)
    del rows
    assert lora.rank == R and lora.shape == (B, IN, OUT) and not lora.copied
    W, Bt = lora.W, lora.Bt  # copied on first use
    want_W = A_all[idx].transpose(1, 2)
    if gated:
        want_W = torch.cat([Vt, want_W], 2)
    torch.testing.assert_close(W, want_W.double())
    torch.testing.assert_close(Bt, (Bt_all[idx] * col_w).double())
    assert W.dtype == Bt.dtype == torch.float64 and lora.copied and lora.bank is None and alive() is None
    assert lora.rank == R and lora.shape == (B, IN, OUT)
    lora.copy_out()  # again: nothing left to copy from, nothing changes
    assert lora.W is W and lora.Bt is Bt
