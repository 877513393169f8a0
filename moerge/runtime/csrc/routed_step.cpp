// One routed LoRA step on CPU in a single call: what GatheredModule's fast step does in about ten torch calls.
//
// For each row b and token t (float32 throughout):
//   z      = x[b, t] @ W[b]                       W[b] = [gate vectors (Kg columns) | A factors^T (R columns)]
//   logits = finish(z[:Kg]) + bias[b]             finish: none, |.| (Arrow), . / sigma(x) (PHATGOOSE, X-LoRA)
//   w      = softmax over the top_k logits         others 0; a token with no finite logit gets all zeros
//   h[r]   = z[Kg + r] * w[slot[b, r]]             0 where slot is -1 (padding); without a gate h = z
//   y[b, t] += h @ Bt[b]                           in place; columns whose weight is 0 are skipped
// and the weights w (B, T, K) are returned (None without a gate).
//
// The formulas are moerge.runtime.gathered.GatheredModule's and the Triton kernel's (moerge/runtime/kernels.py);
// moerge/runtime/native.py builds this file and decides when it runs.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

void check(bool ok, const char* what) { TORCH_CHECK(ok, "moerge native step: ", what); }

// The top_k best of K logits (ties: the lower index first), their softmax; the others 0.
void select(const float* logits, int64_t K, int64_t top_k, float* w, int64_t* order) {
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t k = (top_k <= 0 || top_k >= K) ? K : top_k;
  for (int64_t i = 0; i < K; ++i) { w[i] = 0.f; order[i] = i; }
  if (k < K) {
    std::partial_sort(order, order + k, order + K, [&](int64_t a, int64_t b) {
      float la = logits[a], lb = logits[b];
      bool na = std::isnan(la), nb = std::isnan(lb);
      if (na != nb) return na;  // torch.topk puts NaN first
      return la > lb || (la == lb && a < b);
    });
  }
  float m = ninf;
  for (int64_t j = 0; j < k; ++j) m = std::max(m, logits[order[j]]);
  if (!(m > ninf)) return;  // no finite logit among the chosen (or NaN): all zeros, as softmax(...).nan_to_num_(0)
  float s = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    float e = std::exp(logits[order[j]] - m);
    w[order[j]] = e;
    s += e;
  }
  for (int64_t j = 0; j < k; ++j) {
    float v = w[order[j]] / s;
    w[order[j]] = std::isnan(v) ? 0.f : v;  // an infinite logit: NaN, which the torch path also turns to 0
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)  // vector lanes summed at the end (-fopenmp-simd; no OpenMP runtime)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// A request's operands for one module, checked once; called with (x, y) at every step.
//   W (B, IN, Kg + R) float32: either each column contiguous (stride (C·IN, 1, IN), as the gather lays it out: the
//     columns of candidates a token did not choose are then not read) or row-major contiguous (joined batches).
//   Bt (B, R, OUT) float32 contiguous; slots (B, R) int32 and bias (B, 1, Kg) float32 when Kg > 0.
//   finish: 0 none, 1 abs, 2 standardized. top_k <= 0: every candidate.
struct Step {
  torch::Tensor W, Bt, slots, bias;
  int64_t kg, finish, top_k, B, IN, C, R, OUT;
  bool columns;

  Step(torch::Tensor W_, torch::Tensor Bt_, c10::optional<torch::Tensor> slots_,
       c10::optional<torch::Tensor> bias_, int64_t kg_, int64_t finish_, int64_t top_k_)
      : W(W_), Bt(Bt_), kg(kg_), finish(finish_), top_k(top_k_) {
    check(W.dim() == 3 && Bt.dim() == 3, "W and Bt must be 3-d");
    check(W.scalar_type() == at::kFloat && Bt.scalar_type() == at::kFloat, "float32 factors only");
    check(!W.is_cuda() && !Bt.is_cuda(), "CPU tensors only");
    B = W.size(0), IN = W.size(1), C = W.size(2), R = Bt.size(1), OUT = Bt.size(2);
    check(Bt.size(0) == B && C == kg + R, "W and Bt do not match");
    check(Bt.is_contiguous(), "Bt must be contiguous");
    columns = W.stride(0) == C * IN && W.stride(1) == 1 && W.stride(2) == IN;
    check(columns || W.is_contiguous(), "W must be contiguous, by rows or by columns");
    check(kg >= 0 && finish >= 0 && finish <= 2, "bad gate");
    if (kg > 0) {
      check(slots_.has_value() && bias_.has_value(), "a gate needs slots and bias");
      slots = slots_->contiguous();
      bias = bias_->contiguous();
      check(slots.scalar_type() == at::kInt && slots.numel() == B * R, "slots must be (B, R) int32");
      check(bias.scalar_type() == at::kFloat && bias.numel() == B * kg, "bias must be (B, 1, Kg) float32");
    }
  }

  // Adds the routed part to y in place; returns the gate's weights (B, T, Kg), none without a gate.
  c10::optional<torch::Tensor> call(torch::Tensor x, torch::Tensor y) const {
    check(x.dim() == 3 && y.dim() == 3 && x.size(0) == B && x.size(2) == IN && y.size(0) == B &&
              y.size(1) == x.size(1) && y.size(2) == OUT,
          "x or y does not match the factors");
    check(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && !x.is_cuda() && !y.is_cuda(),
          "x and y must be float32 CPU tensors");
    check(y.is_contiguous(), "y must be contiguous");
    const int64_t T = x.size(1);
    torch::Tensor xc = x.contiguous();
    torch::Tensor w = kg > 0 ? torch::empty({B, T, kg}, x.options()) : torch::Tensor();
    const float* xp = xc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const float* Wp = W.data_ptr<float>();
    const float* Bp = Bt.data_ptr<float>();
    const int32_t* sp = kg > 0 ? slots.data_ptr<int32_t>() : nullptr;
    const float* bs = kg > 0 ? bias.data_ptr<float>() : nullptr;
    float* wp = kg > 0 ? w.data_ptr<float>() : nullptr;
    std::vector<float> z(C), h(R), logits(kg), wt(kg);
    std::vector<int64_t> order(kg);
    for (int64_t bt = 0; bt < B * T; ++bt) {  // few tokens per row (moerge.runtime.native.fits): one thread
      const int64_t b = bt / T;
      const float* xr = xp + bt * IN;
      const float* Wb = Wp + b * IN * C;
      if (!columns) {  // by rows: every column in one pass over the input
        std::fill(z.begin(), z.end(), 0.f);
        for (int64_t i = 0; i < IN; ++i) {
          const float xi = xr[i];
          const float* wr = Wb + i * C;
          for (int64_t c = 0; c < C; ++c) z[c] += xi * wr[c];
        }
      } else {
        for (int64_t k = 0; k < kg; ++k) z[k] = dot(xr, Wb + k * IN, IN);
      }
      if (kg > 0) {
        float scale = 1.f;
        if (finish == 2) {
          double s1 = 0, s2 = 0;
          for (int64_t i = 0; i < IN; ++i) s1 += xr[i];
          const double mean = s1 / IN;
          for (int64_t i = 0; i < IN; ++i) s2 += (xr[i] - mean) * (xr[i] - mean);
          scale = 1.f / std::sqrt(static_cast<float>(s2 / IN) + 1e-5f);
        }
        for (int64_t k = 0; k < kg; ++k) {
          float v = z[k];
          if (finish == 1) v = std::fabs(v);
          else if (finish == 2) v *= scale;
          logits[k] = v + bs[b * kg + k];
        }
        select(logits.data(), kg, top_k, wt.data(), order.data());
        std::copy(wt.begin(), wt.end(), wp + bt * kg);
      }
      const int32_t* sr = kg > 0 ? sp + b * R : nullptr;
      for (int64_t r = 0; r < R; ++r) {
        const float cw = kg > 0 ? (sr[r] >= 0 ? wt[sr[r]] : 0.f) : 1.f;
        if (cw == 0.f) { h[r] = 0.f; continue; }  // a candidate the token did not choose
        h[r] = (columns ? dot(xr, Wb + (kg + r) * IN, IN) : z[kg + r]) * cw;
      }
      float* yr = yp + bt * OUT;
      const float* Bb = Bp + b * R * OUT;
      for (int64_t r = 0; r < R; ++r) {
        const float v = h[r];
        if (v == 0.f) continue;  // its B factor is not read
        const float* br = Bb + r * OUT;
        for (int64_t o = 0; o < OUT; ++o) yr[o] += v * br[o];
      }
    }
    if (kg == 0) return c10::nullopt;
    return w;
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Step>(m, "Step")
      .def(py::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                    int64_t, int64_t, int64_t>())
      .def("__call__", &Step::call, "add the routed part to y in place; the gate's weights",
           py::call_guard<py::gil_scoped_release>());
}
