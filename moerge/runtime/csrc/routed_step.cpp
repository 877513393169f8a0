// One routed LoRA step on CPU in a single call: what GatheredModule's fast step does in about ten torch calls.
//
// For each row b and token t (float32 throughout):
//   g[k]   = x[b, t] . v[b, k]                    v: the fused gate's vectors (Kg per row)
//   logits = finish(g) + bias[b]                  finish: none, |.| (Arrow), . / sigma(x) (PHATGOOSE, X-LoRA)
//   w      = softmax over the top_k logits         others 0; a token with no finite logit gets all zeros
//   h[r]   = (x[b, t] . a[b, r]) * s[b, r] * w[slot[b, r]]     without a gate: no w; 0 at padding (slot -1)
//   y[b, t] += sum_r h[r] * bt[b, r]              in place; columns whose weight is 0 are neither shrunk nor expanded
// and the weights w (B, T, Kg) are returned (None without a gate).
//
// Each column is a contiguous row of some 2-D tensor, found by index: a[b, r] is row a_idx[b, r] of A and bt[b, r]
// row b_idx[b, r] of Bt. Those are either the layers' banks themselves (the rows of every expert: a request reads its
// candidates' rows where they lie, nothing is copied) or a request's gathered copy. The rows of the step are given
// as segments, each with its own tensors (the requests of a joined batch); narrower segments are padded (a padded
// gate slot's logit is -inf, a padded column is skipped).
//
// The formulas are moerge.runtime.gathered.GatheredModule's and the Triton kernel's (moerge/runtime/kernels.py);
// moerge/runtime/native.py builds this file and decides when it runs.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
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

// 8 floats as one vector (GCC/Clang vector extensions: AVX registers with -march=native on x86, pairs of NEON
// registers on ARM); loads and stores need no alignment.
typedef float v8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
inline float hsum(v8 v) {
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

// a . b with four independent chains of vector FMAs (one chain would wait on each FMA's latency).
float dot(const float* a, const float* b, int64_t n) {
  v8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 += load8(a + i) * load8(b + i);
    s1 += load8(a + i + 8) * load8(b + i + 8);
    s2 += load8(a + i + 16) * load8(b + i + 16);
    s3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= n; i += 8) s0 += load8(a + i) * load8(b + i);
  float s = hsum((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x . c[0..3] at once: x is read once for four columns.
void dot4(const float* x, const float* const* c, int64_t n, float* out) {
  const float *c0 = c[0], *c1 = c[1], *c2 = c[2], *c3 = c[3];
  v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8 xv = load8(x + i);
    a0 += xv * load8(c0 + i);
    a1 += xv * load8(c1 + i);
    a2 += xv * load8(c2 + i);
    a3 += xv * load8(c3 + i);
  }
  float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
  for (; i < n; ++i) s[0] += x[i] * c0[i], s[1] += x[i] * c1[i], s[2] += x[i] * c2[i], s[3] += x[i] * c3[i];
  for (int u = 0; u < 4; ++u) out[u] = s[u];
}

// y += v[0] b[0] + ... + v[3] b[3]: y read and written once for four rows.
void axpy4(float* y, const float* v, const float* const* b, int64_t n) {
  const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  const float v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3];
  int64_t o = 0;
  for (; o + 8 <= n; o += 8)
    store8(y + o, load8(y + o) + ((v0 * load8(b0 + o) + v1 * load8(b1 + o)) + (v2 * load8(b2 + o) + v3 * load8(b3 + o))));
  for (; o < n; ++o) y[o] += (v0 * b0[o] + v1 * b1[o]) + (v2 * b2[o] + v3 * b3[o]);
}

void axpy(float* y, float v, const float* b, int64_t n) {
  int64_t o = 0;
  for (; o + 8 <= n; o += 8) store8(y + o, load8(y + o) + v * load8(b + o));
  for (; o < n; ++o) y[o] += v * b[o];
}

// out[j] = x . c[j] for j < m.
void dots(const float* x, const float* const* c, int64_t m, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) dot4(x, c + j, n, out + j);
  for (; j < m; ++j) out[j] = dot(x, c[j], n);
}

constexpr int64_t kGrain = 8;  // tokens per task of a parallel step (fewer: the step runs on the calling thread)
constexpr int64_t kParallelWork = 1 << 20;  // multiply-adds (at most) from which a step's tokens run in parallel

using Opt = std::optional<torch::Tensor>;
// (A (n, IN), a_idx (b, R) int64, Bt (m, OUT), b_idx (b, R) int64, scale (b, R) f32 | None,
//  Vt (b, IN, Kg) with each vector contiguous | None, slots (b, R) int32 | None, bias (b, 1, Kg) f32 | None)
using Segment = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, Opt, Opt, Opt, Opt>;

void rows_of(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && !t.is_cuda() && t.stride(1) == 1,
              "moerge native step: ", what, " must be a 2-d float32 CPU tensor with contiguous rows");
}

struct Scratch {  // one thread's working memory for a token
  std::vector<float> h, logits, wt, cws;
  std::vector<const float*> cols;
  std::vector<int64_t> order, which;
  Scratch(int64_t n, int64_t kg) : h(n), logits(kg), wt(kg), cws(n), cols(n), order(kg), which(n) {}
};

// A request's operands for one module, checked and turned into pointer tables once; called at every step.
struct Step {
  std::vector<torch::Tensor> keep;  // the tensors the pointers point into
  int64_t B = 0, IN = -1, OUT = -1, kg = 0, R = 0, finish, top_k;
  std::vector<const float*> acol, bcol, gcol;  // (B, R), (B, R), (B, kg); nullptr: padding
  std::vector<float> scale, bias;              // (B, R), (B, kg)
  std::vector<int32_t> slot;                   // (B, R)

  Step(const std::vector<Segment>& segments, int64_t kg_, int64_t finish_, int64_t top_k_)
      : kg(kg_), finish(finish_), top_k(top_k_) {
    check(kg >= 0 && finish >= 0 && finish <= 2, "bad gate");
    for (const auto& s : segments) {
      const auto& a_idx = std::get<1>(s);
      check(a_idx.dim() == 2, "a_idx must be (B, R)");
      B += a_idx.size(0);
      R = std::max(R, a_idx.size(1));
    }
    acol.assign(B * R, nullptr), bcol.assign(B * R, nullptr), scale.assign(B * R, 0.f), slot.assign(B * R, -1);
    gcol.assign(B * kg, nullptr), bias.assign(B * kg, -std::numeric_limits<float>::infinity());
    int64_t row0 = 0;
    for (const auto& s : segments) row0 = add(s, row0);
  }

  int64_t add(const Segment& s, int64_t row0) {
    auto [A, a_idx_, Bt, b_idx_, scale_, Vt_, slots_, bias_] = s;
    rows_of(A, "A");
    rows_of(Bt, "Bt");
    check(IN < 0 || A.size(1) == IN, "segments' inputs differ");
    check(OUT < 0 || Bt.size(1) == OUT, "segments' outputs differ");
    IN = A.size(1), OUT = Bt.size(1);
    torch::Tensor a_idx = a_idx_.to(at::kLong).contiguous(), b_idx = b_idx_.to(at::kLong).contiguous();
    const int64_t b = a_idx.size(0), r = a_idx.size(1);
    check(b_idx.sizes() == a_idx.sizes(), "a_idx and b_idx differ in shape");
    const int64_t* ai = a_idx.data_ptr<int64_t>();
    const int64_t* bi = b_idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < b * r; ++i)
      check(ai[i] >= 0 && ai[i] < A.size(0) && bi[i] >= 0 && bi[i] < Bt.size(0), "a row index is out of range");
    torch::Tensor sc;
    if (scale_) {
      sc = scale_->to(at::kFloat).contiguous();
      check(sc.numel() == b * r, "scale must be (B, R)");
    }
    const float* Ap = A.data_ptr<float>();
    const float* Bp = Bt.data_ptr<float>();
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < r; ++j) {
        const int64_t at = (row0 + i) * R + j, src = i * r + j;
        acol[at] = Ap + ai[src] * A.stride(0);
        bcol[at] = Bp + bi[src] * Bt.stride(0);
        scale[at] = sc.defined() ? sc.data_ptr<float>()[src] : 1.f;
      }
    keep.insert(keep.end(), {A, Bt});
    if (kg > 0) {
      check(Vt_.has_value() && slots_.has_value() && bias_.has_value(), "a gate needs Vt, slots and bias");
      const torch::Tensor& Vt = *Vt_;
      check(Vt.dim() == 3 && Vt.size(0) == b && Vt.size(1) == IN && Vt.size(2) <= kg, "Vt must be (B, IN, Kg)");
      check(Vt.scalar_type() == at::kFloat && !Vt.is_cuda() && (Vt.stride(1) == 1 || Vt.size(1) == 1),
            "Vt must be float32 on CPU with each vector contiguous");
      const int64_t k = Vt.size(2);
      torch::Tensor sl = slots_->to(at::kInt).contiguous(), bs = bias_->to(at::kFloat).contiguous();
      check(sl.numel() == b * r, "slots must be (B, R)");
      check(bs.numel() == b * k, "bias must be (B, 1, Kg)");
      const float* Vp = Vt.data_ptr<float>();
      for (int64_t i = 0; i < b; ++i) {
        for (int64_t j = 0; j < k; ++j) {
          gcol[(row0 + i) * kg + j] = Vp + i * Vt.stride(0) + j * Vt.stride(2);
          bias[(row0 + i) * kg + j] = bs.data_ptr<float>()[i * k + j];
        }
        for (int64_t j = 0; j < r; ++j) {
          const int32_t v = sl.data_ptr<int32_t>()[i * r + j];
          check(v < k, "a slot is out of range");
          slot[(row0 + i) * R + j] = v;
        }
      }
      keep.push_back(Vt);
    } else {
      for (int64_t i = 0; i < b; ++i)
        for (int64_t j = 0; j < r; ++j) slot[(row0 + i) * R + j] = 0;  // no gate: every column counts
    }
    return row0 + b;
  }

  // One token of row b: its gate, and its experts' part added to yr (R floats of scratch in h, kg in the others).
  void token(int64_t b, const float* xr, float* yr, float* wr, Scratch& sc) const {
    float *h = sc.h.data(), *logits = sc.logits.data(), *wt = sc.wt.data(), *cws = sc.cws.data();
    const float** cols = sc.cols.data();
    int64_t *order = sc.order.data(), *which = sc.which.data();
    if (kg > 0) {
      float sd = 1.f;
      if (finish == 2) {
        double s1 = 0, s2 = 0;
        for (int64_t i = 0; i < IN; ++i) s1 += xr[i];
        const double mean = s1 / IN;
        for (int64_t i = 0; i < IN; ++i) s2 += (xr[i] - mean) * (xr[i] - mean);
        sd = 1.f / std::sqrt(static_cast<float>(s2 / IN) + 1e-5f);
      }
      const float* const* g = gcol.data() + b * kg;
      int64_t m = 0;
      for (int64_t k = 0; k < kg; ++k)
        if (g[k]) cols[m] = g[k], which[m++] = k;
      dots(xr, cols, m, IN, h);
      for (int64_t k = 0; k < kg; ++k) logits[k] = 0.f;
      for (int64_t j = 0; j < m; ++j) logits[which[j]] = h[j];
      for (int64_t k = 0; k < kg; ++k) {
        float z = logits[k];
        if (finish == 1) z = std::fabs(z);
        else if (finish == 2) z *= sd;
        logits[k] = z + bias[b * kg + k];
      }
      select(logits, kg, top_k, wt, order);
      std::copy(wt, wt + kg, wr);
    }
    int64_t m = 0;  // the columns this token uses (a candidate it did not choose is not read)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t c = b * R + r;
      const int32_t s = slot[c];
      const float cw = s < 0 || !acol[c] ? 0.f : (kg > 0 ? wt[s] : 1.f) * scale[c];
      if (cw != 0.f) cols[m] = acol[c], which[m] = r, cws[m++] = cw;
    }
    dots(xr, cols, m, IN, h);
    for (int64_t j = 0; j < m; ++j) h[j] *= cws[j], cols[j] = bcol[b * R + which[j]];
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) axpy4(yr, h + j, cols + j, OUT);  // four rows of Bt per pass over y
    for (; j < m; ++j) axpy(yr, h[j], cols[j], OUT);
  }

  // Adds the routed part to y in place; returns the gate's weights (B, T, Kg), none without a gate.
  std::optional<torch::Tensor> call(torch::Tensor x, torch::Tensor y) const {
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
    float* wp = kg > 0 ? w.data_ptr<float>() : nullptr;
    // tokens in parallel on torch's threads when there is enough work (a prompt of a real model's modules): a
    // parallel region costs a fork and a join, and on a machine whose cores are busy the join waits for a thread
    // the OS has not scheduled, so small steps stay on this thread
    const int64_t work = B * T * (IN * (kg + R) + OUT * R);
    const int64_t grain = work >= kParallelWork ? kGrain : B * T;
    at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
      Scratch sc(std::max(R, kg), kg);
      for (int64_t bt = begin; bt < end; ++bt) token(bt / T, xp + bt * IN, yp + bt * OUT, wp ? wp + bt * kg : nullptr, sc);
    });
    if (kg == 0) return std::nullopt;
    return w;
  }

  // call() keeping only each row's sum of the gate's weights over tokens (and the count of tokens), for a routing
  // trace that needs no per-token weights: no tensor per call reaches Python. take_usage() hands them over.
  void call_sum(torch::Tensor x, torch::Tensor y) {
    std::optional<torch::Tensor> w = call(x, y);
    if (!w) return;
    const int64_t T = x.size(1);
    if (!usage.defined()) usage = torch::zeros({B, kg}, x.options());
    float* u = usage.data_ptr<float>();
    const float* wp = w->data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t k = 0; k < kg; ++k) u[b * kg + k] += wp[(b * T + t) * kg + k];
    tokens += T;
  }

  std::tuple<std::optional<torch::Tensor>, int64_t> take_usage() {
    std::optional<torch::Tensor> u;
    if (usage.defined()) u = usage;
    const int64_t n = tokens;
    usage = torch::Tensor(), tokens = 0;
    return {u, n};
  }

  torch::Tensor usage;  // (B, kg) summed weights since the last take_usage()
  int64_t tokens = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Step>(m, "Step")
      .def(py::init<const std::vector<Segment>&, int64_t, int64_t, int64_t>())
      .def("__call__", &Step::call, "add the routed part to y in place; the gate's weights",
           py::call_guard<py::gil_scoped_release>())
      .def("call_sum", &Step::call_sum, "add the routed part to y in place; sum the gate's weights per row",
           py::call_guard<py::gil_scoped_release>())
      .def("take_usage", &Step::take_usage, "(the summed weights (B, Kg) or None, their tokens), and reset them");
}
