"""The fused routed-LoRA kernel (moerge.runtime.kernels) against the torch path.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors): the same kernel code,
executed by numpy. The ``gpu`` tests run it compiled on CUDA and skip cleanly without one.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import MoErgeModel
from moerge.routers import build_router
from moerge.routing import LinearGate, select_weights

from helpers import VOCAB, rand_expert, tiny_llama

triton = pytest.importorskip("triton")


def _reference(x, y, Vt, A, Bt, bias, slots, finish, top_k, h_dtype=None):
    """The torch path's formulas, written out: weights from the gate, columns times their slot's weight (``h_dtype``:
    the low-rank activations rounded to it before the expand, as the kernel does for half-precision factors)."""
    w = select_weights(LinearGate(Vt, bias, finish).logits(x, x @ Vt), top_k)  # (B, T, K)
    E = torch.nn.functional.one_hot(slots.clamp(min=0).long(), Vt.shape[-1]).float() * (slots >= 0).unsqueeze(-1)
    h = (x @ A) * (w @ E.transpose(1, 2))
    if h_dtype is not None:
        h = h.to(h_dtype).to(x.dtype)
    return y + h @ Bt, w


def _case(B=3, T=5, IN=40, OUT=24, K=4, r=3, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    R = K * r
    x = torch.randn(B, T, IN, generator=g)
    Vt, A, Bt = torch.randn(B, IN, K, generator=g), torch.randn(B, IN, R, generator=g), torch.randn(B, R, OUT, generator=g)
    bias = torch.randn(B, 1, K, generator=g)
    if B > 2:
        bias[1, 0, 2] = float("-inf")  # a candidate without a gate vector
        bias[2, 0, :] = float("-inf")  # a row where no candidate can be chosen: no expert at all
    slots = (torch.arange(R) // r).repeat(B, 1).int()
    slots[0, -2:] = -1  # padding columns (a candidate of smaller rank)
    y = torch.randn(B, T, OUT, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(y), cast(Vt), cast(A), cast(Bt), bias.to(device), slots.to(device)


@pytest.mark.parametrize("finish", ["abs", "standardized", "none"])
@pytest.mark.parametrize("top_k", [1, 2, None])
def test_kernel_matches_the_torch_formulas(interpreted, finish, top_k):
    x, y, Vt, A, Bt, bias, slots = _case()
    ref, w_ref = _reference(x, y.clone(), Vt, A, Bt, bias, slots, finish, top_k)
    out = y.clone()
    w = interpreted.routed_lora_(x, out, torch.cat([Vt, A], 2), Bt, gate_k=4, bias=bias, slots=slots,
                                 finish=finish, top_k=top_k)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (w[2] == 0).all()  # no finite logit: no expert, the base output unchanged
    torch.testing.assert_close(out[2], y[2])


def test_kernel_without_gate_and_with_strided_factors(interpreted):
    x, y, _, A, Bt, _, _ = _case(T=37)  # more tokens than one block
    At = A.transpose(1, 2).contiguous().transpose(1, 2)  # (B, in, R) with unit stride along in, as gathered
    out = y.clone()
    assert interpreted.routed_lora_(x, out, At, Bt) is None
    torch.testing.assert_close(out, y + (x @ A) @ Bt, atol=1e-4, rtol=1e-4)


def test_kernel_half_precision(interpreted):
    x, y, Vt, A, Bt, bias, slots = _case(dtype=torch.float16)
    ref, _ = _reference(x.float(), y.float(), Vt.float(), A.float(), Bt.float(), bias, slots, "abs", 2)
    out = y.clone()
    interpreted.routed_lora_(x, out, torch.cat([Vt, A], 2), Bt, gate_k=4, bias=bias, slots=slots, finish="abs",
                             top_k=2)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("gated", [True, False])
def test_kernel_over_several_token_and_output_blocks(interpreted, gated):
    # T = 40: two token blocks of 32, the second masked; OUT = 200: four output blocks of 64, the last masked;
    # R = 80: two column steps of the expand (64, then 16 of a masked 64); IN = 70: two input steps of the shrink
    x, y, Vt, A, Bt, bias, slots = _case(T=40, IN=70, OUT=200, K=4, r=20, seed=3)
    out = y.clone()
    if gated:
        ref, w_ref = _reference(x, y.clone(), Vt, A, Bt, bias, slots, "abs", 2)
        w = interpreted.routed_lora_(x, out, torch.cat([Vt, A], 2), Bt, gate_k=4, bias=bias, slots=slots,
                                     finish="abs", top_k=2)
        torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)
    else:
        ref = y + (x @ A) @ Bt
        assert interpreted.routed_lora_(x, out, A, Bt) is None
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (out[:2, -1, -1] != y[:2, -1, -1]).all()  # the last token's last output (both blocks masked) is added


def test_a_decode_step_spreads_the_expand_over_output_blocks(interpreted, monkeypatch):
    shrink, expand = interpreted._grids(1, 1, 576)
    assert shrink == (1, 1) and expand[:2] == (1, 1) and expand[2] > 1  # one row, one token: 9 programs of 64
    assert interpreted._grids(1, 1, 1536)[1][2] >= 24
    grids = []
    real = interpreted._grids
    monkeypatch.setattr(interpreted, "_grids", lambda *a: grids.append(real(*a)) or grids[-1])
    x, y, Vt, A, Bt, bias, slots = _case(B=1, T=1, IN=64, OUT=576, K=4, r=4, seed=4)
    ref, _ = _reference(x, y.clone(), Vt, A, Bt, bias, slots, "abs", 2)
    out = y.clone()
    interpreted.routed_lora_(x, out, torch.cat([Vt, A], 2), Bt, gate_k=4, bias=bias, slots=slots, finish="abs",
                             top_k=2)
    assert grids == [((1, 1), (1, 1, 9))]  # the launch uses these grids
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_the_shrink_steps_fit_in_shared_memory():
    from moerge.runtime import kernels as K

    # float32 A tiles of 64 x 512 columns, pipelined, would need ~300 KB of shared memory (H200: 227 KiB a block)
    assert K._block_in(512, 4) == 32 and K._block_in(256, 4) == 64 and K._block_in(512, 2) == 64


def _model(dtype: torch.dtype = torch.float32):
    base = tiny_llama()
    model = MoErgeModel(copy.deepcopy(base).to(dtype), build_router("arrow", top_k=2))
    experts = [rand_expert(base, f"e{i}", seed=i, rank=(2, 4, 3)[i % 3],
                           modules=("q_proj", "v_proj", "down_proj") if i % 2 else ("q_proj", "o_proj", "up_proj"))
               for i in range(5)]
    model.expert_set.install(experts, model.router)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 base: float32 experts, as PEFT's
def test_routed_model_with_the_kernel_equals_the_torch_path(interpreted, monkeypatch, dtype):
    model = _model(dtype)
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    calls = []
    real = interpreted.routed_lora_

    tokens = []

    def spy(*a, **k):
        calls.append(k.get("gate_k"))
        tokens.append(a[0].shape[1])
        return real(*a, **k)

    with torch.no_grad():
        monkeypatch.setattr(interpreted, "ENABLED", False)
        ref = model(input_ids=ids).logits
        ref_usage = model.last_routing
        ref_mixed = model(input_ids=ids, experts=[{"e0": 0.3, "e1": 0.7}, {"e2": 1.0}, {}]).logits
        monkeypatch.setattr(interpreted, "ENABLED", True)
        monkeypatch.setattr(interpreted, "routed_lora_", spy)
        out = model(input_ids=ids).logits
        usage = model.last_routing
        mixed = model(input_ids=ids, experts=[{"e0": 0.3, "e1": 0.7}, {"e2": 1.0}, {}]).logits
    assert calls and all(k == 5 for k in calls[: len(calls) // 2])  # local gating: 5 candidates in the kernel
    assert 0 in calls  # sequence weights: the kernel without its gate
    tol = 1e-4 if dtype == torch.float32 else 8e-3  # bf16 outputs: one rounding step
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(mixed, ref_mixed, atol=tol, rtol=tol)
    for a, b in zip(usage, ref_usage):  # the kernel's gate weights feed the routing trace
        # bf16: a hidden state one rounding step apart moves a later layer's weights by ~1e-5
        assert a.experts == pytest.approx(b.experts, abs=1e-5 if dtype == torch.float32 else 1e-4)
    # greedy generation with the KV cache: the same tokens
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    tokens.clear()
    gen = model.generate(ids, **kw)
    assert 1 in tokens  # the decode steps ran in the kernel too (not the native CPU step)
    monkeypatch.setattr(interpreted, "ENABLED", False)
    assert torch.equal(gen, model.generate(ids, **kw))


def test_a_shape_the_gpu_cannot_launch_falls_back_to_the_torch_path(interpreted, monkeypatch):
    from triton.runtime.errors import OutOfResources

    model = _model()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        monkeypatch.setattr(interpreted, "ENABLED", False)
        ref = model(input_ids=ids).logits
        monkeypatch.setattr(interpreted, "ENABLED", True)
        launches = []

        def too_large(*a, **k):
            launches.append(1)
            raise OutOfResources(300_000, 232_448, "shared memory")

        monkeypatch.setattr(interpreted, "_launch", too_large)
        monkeypatch.setattr(interpreted, "TOO_LARGE", set())
        out = model(input_ids=ids).logits
        tried = len(launches)
        again = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)
    assert tried and len(launches) == tried  # the shapes refused once are not launched again
    assert interpreted.TOO_LARGE and all(d == torch.float32 for _, d, _ in interpreted.TOO_LARGE)


def test_the_kernel_is_not_used_for_selections_it_does_not_do(interpreted, monkeypatch):
    model = _model()
    model.set_router(build_router("arrow", top_k=2, top_p=0.5))
    monkeypatch.setattr(interpreted, "routed_lora_", lambda *a, **k: pytest.fail("kernel used for top_p"))
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (2, 5)))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 70])
def test_kernel_on_cuda(dtype, T):
    from moerge.runtime import kernels as K

    x, y, Vt, A, Bt, bias, slots = _case(B=32, T=T, IN=576, OUT=1536, K=4, r=8, dtype=dtype, device="cuda")
    half = dtype != torch.float32
    ref, w_ref = _reference(x.float(), y.float(), Vt.float(), A.float(), Bt.float(), bias, slots, "abs", 2,
                            h_dtype=dtype if half else None)
    out = y.clone()
    w = K.routed_lora_(x, out, torch.cat([Vt, A], 2), Bt, gate_k=4, bias=bias, slots=slots, finish="abs", top_k=2)
    if half:  # outputs of about ±300 (h ≈ ±24 per column): the sum is rounded to bfloat16 (rtol 2^-7), and another
        # summation order can move an h across one rounding step (1/8 at |h| ≈ 24, times |Bt| ≤ 4)
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), atol=1.0, rtol=2 ** -7)
    else:
        torch.testing.assert_close(out.float(), ref, atol=1e-3, rtol=1e-3)
    if dtype == torch.float32:
        torch.testing.assert_close(w, w_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@cuda
def test_routed_model_on_cuda_equals_cpu():
    model = _model()
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cpu = model(input_ids=ids).logits
        model.to("cuda")
        gpu = model(input_ids=ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
