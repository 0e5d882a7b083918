// Causal softmax attention for MLX on the CPU, forward and backward, one primitive each.
//
// MLX's CPU attention for several queries is matmuls around a softmax over the whole
// (time x time) score matrix in element-wise ops, about 3 ns per element for 2^x alone, and it
// computes the masked half too. Here each (batch, head) row runs in blocks of queries that meet
// only the keys they may see, with the softmax in one vectorized pass; the backward is
// FlashAttention-2's (scores recomputed from the saved log-sum-exp). Float32 only; other dtypes
// and the GPU use dfn4lab.backbones' MLX ops, the tests' reference.
//
// Layouts: q, o, dout (batch, heads, T, d); k, v (batch, heads, S, d), S = cached + T. Query i
// sits at key index cached + i and sees keys j with cached + i - window < j <= cached + i
// (window 0: no lower bound). lse (batch, heads, T): base-2 log-sum-exp of each query's scores.

#include "common.h"

namespace dfn4lab_kernels {
namespace {

constexpr int kBlock = 64;  // queries per block

struct Geometry {
  int T, S, D, window;
  float scale;
  int lo(int i) const { return window > 0 ? std::max(0, S - T + i - window + 1) : 0; }
  int hi(int i) const { return S - T + i + 1; }  // keys [lo(i), hi(i)) are seen by query i
};

// Base-2 scores of queries [i0, i0 + n) against keys [lo, lo + len) into s (n x len).
void scores(const Geometry& g, const float* Q, const float* K, int i0, int n, int lo, int len,
            float* s) {
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, len, g.D, g.scale * kLog2e, Q + size_t(i0) * g.D,
              g.D, K + size_t(lo) * g.D, g.D, 0.0f, s, len);
}

void forward_rows(const float* q, const float* k, const float* v, float* o, float* lse,
                  const Geometry& g, int r0, int r1) {
  OneBlasThread one;
  const int T = g.T, S = g.S, D = g.D;
  std::vector<float> s(size_t(kBlock) * S);
  for (int r = r0; r < r1; ++r) {
    const float *Q = q + size_t(r) * T * D, *K = k + size_t(r) * S * D, *V = v + size_t(r) * S * D;
    float *O = o + size_t(r) * T * D, *L = lse + size_t(r) * T;
    for (int i0 = 0; i0 < T; i0 += kBlock) {
      const int n = std::min(kBlock, T - i0), lo = g.lo(i0), len = g.hi(i0 + n - 1) - lo;
      scores(g, Q, K, i0, n, lo, len, s.data());
      for (int i = 0; i < n; ++i) {
        float* p = s.data() + size_t(i) * len;
        const int a = g.lo(i0 + i) - lo, b = g.hi(i0 + i) - lo;
        float m = p[a], sum = 0.0f;
#pragma omp simd reduction(max : m)
        for (int j = a; j < b; ++j) m = std::max(m, p[j]);
#pragma omp simd reduction(+ : sum)
        for (int j = a; j < b; ++j) {
          p[j] = exp2_neg(p[j] - m);
          sum += p[j];
        }
        const float inv = 1.0f / sum;
        std::fill(p, p + a, 0.0f);
        for (int j = a; j < b; ++j) p[j] *= inv;
        std::fill(p + b, p + len, 0.0f);
        L[i0 + i] = m + std::log2(sum);
      }
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, D, len, 1.0f, s.data(), len,
                  V + size_t(lo) * D, D, 0.0f, O + size_t(i0) * D, D);
    }
  }
}

void backward_rows(const float* q, const float* k, const float* v, const float* o,
                   const float* lse, const float* dout, float* dq, float* dk, float* dv,
                   const Geometry& g, int r0, int r1) {
  OneBlasThread one;
  const int T = g.T, S = g.S, D = g.D;
  std::vector<float> p(size_t(kBlock) * S), ds(size_t(kBlock) * S), delta(kBlock);
  for (int r = r0; r < r1; ++r) {
    const size_t qo = size_t(r) * T * D, ko = size_t(r) * S * D;
    const float *Q = q + qo, *K = k + ko, *V = v + ko, *O = o + qo, *dO = dout + qo;
    const float* L = lse + size_t(r) * T;
    float *dQ = dq + qo, *dK = dk + ko, *dV = dv + ko;
    std::fill(dK, dK + size_t(S) * D, 0.0f);
    std::fill(dV, dV + size_t(S) * D, 0.0f);
    for (int i0 = 0; i0 < T; i0 += kBlock) {
      const int n = std::min(kBlock, T - i0), lo = g.lo(i0), len = g.hi(i0 + n - 1) - lo;
      const float* dOb = dO + size_t(i0) * D;
      scores(g, Q, K, i0, n, lo, len, p.data());
      for (int i = 0; i < n; ++i) {
        float* pi = p.data() + size_t(i) * len;
        const int a = g.lo(i0 + i) - lo, b = g.hi(i0 + i) - lo;
        const float li = L[i0 + i];
        std::fill(pi, pi + a, 0.0f);
        for (int j = a; j < b; ++j) pi[j] = exp2_neg(pi[j] - li);
        std::fill(pi + b, pi + len, 0.0f);
        float d = 0.0f;  // dO_i . O_i = sum_j P_ij dP_ij
#pragma omp simd reduction(+ : d)
        for (int c = 0; c < D; ++c) d += dOb[size_t(i) * D + c] * O[size_t(i0 + i) * D + c];
        delta[i] = d;
      }
      // dV += P^T dO; dP = dO V^T; dS = P (dP - delta) scale; dQ = dS K; dK += dS^T Q
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, len, D, n, 1.0f, p.data(), len, dOb, D, 1.0f,
                  dV + size_t(lo) * D, D);
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, len, D, 1.0f, dOb, D, V + size_t(lo) * D, D,
                  0.0f, ds.data(), len);
      for (int i = 0; i < n; ++i) {
        const float* pi = p.data() + size_t(i) * len;
        float* di = ds.data() + size_t(i) * len;
        for (int j = 0; j < len; ++j) di[j] = pi[j] * (di[j] - delta[i]) * g.scale;
      }
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, D, len, 1.0f, ds.data(), len,
                  K + size_t(lo) * D, D, 0.0f, dQ + size_t(i0) * D, D);
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, len, D, n, 1.0f, ds.data(), len,
                  Q + size_t(i0) * D, D, 1.0f, dK + size_t(lo) * D, D);
    }
  }
}

class AttentionPrimitive : public CpuLoop {
 public:
  AttentionPrimitive(mx::Stream s, float scale, int window)
      : CpuLoop(s), scale_(scale), window_(window) {}

 protected:
  Geometry geometry(const std::vector<mx::array>& in) const {
    return {in[0].shape(2), in[1].shape(2), in[0].shape(3), window_, scale_};
  }
  static int rows(const mx::array& q) { return q.shape(0) * q.shape(1); }
  float scale_;
  int window_;
};

// (o, lse) from q, k, v.
class AttentionForward : public AttentionPrimitive {
 public:
  using AttentionPrimitive::AttentionPrimitive;
  const char* name() const override { return "AttentionForward"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    return [q = in[0].data<float>(), k = in[1].data<float>(), v = in[2].data<float>(),
            o = out[0].data<float>(), lse = out[1].data<float>(), g = geometry(in),
            n = rows(in[0])]() {
      for_row_blocks(n, [=](int r0, int r1) { forward_rows(q, k, v, o, lse, g, r0, r1); });
    };
  }
};

// (dq, dk, dv) from q, k, v, o, lse, dout.
class AttentionBackward : public AttentionPrimitive {
 public:
  using AttentionPrimitive::AttentionPrimitive;
  const char* name() const override { return "AttentionBackward"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    return [q = in[0].data<float>(), k = in[1].data<float>(), v = in[2].data<float>(),
            o = in[3].data<float>(), lse = in[4].data<float>(), dout = in[5].data<float>(),
            dq = out[0].data<float>(), dk = out[1].data<float>(), dv = out[2].data<float>(),
            g = geometry(in), n = rows(in[0])]() {
      for_row_blocks(n, [=](int r0, int r1) {
        backward_rows(q, k, v, o, lse, dout, dq, dk, dv, g, r0, r1);
      });
    };
  }
};

void check_attention(const mx::array& q, const mx::array& k, const mx::array& v, int window) {
  check(q, 4, "q");
  check(k, 4, "k");
  check(v, 4, "v");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(1) != k.shape(1) ||
      q.shape(3) != k.shape(3) || k.shape(2) < q.shape(2) || window < 0)
    throw std::invalid_argument(
        "attention: shapes do not match q (batch, heads, T, d), k and v (batch, heads, S >= T, d)");
}

std::vector<mx::array> attention_forward(const mx::array& q, const mx::array& k,
                                         const mx::array& v, float scale, int window,
                                         mx::StreamOrDevice s) {
  check_attention(q, k, v, window);
  auto st = mx::to_stream(s);
  auto lse = mx::Shape{q.shape(0), q.shape(1), q.shape(2)};
  return mx::array::make_arrays({q.shape(), lse}, {mx::float32, mx::float32},
                                std::make_shared<AttentionForward>(st, scale, window),
                                {prepared(q, st), prepared(k, st), prepared(v, st)});
}

std::vector<mx::array> attention_backward(const mx::array& q, const mx::array& k,
                                          const mx::array& v, const mx::array& o,
                                          const mx::array& lse, const mx::array& dout,
                                          float scale, int window, mx::StreamOrDevice s) {
  check_attention(q, k, v, window);
  check(o, 4, "o");
  check(lse, 3, "lse");
  check(dout, 4, "dout");
  if (o.shape() != q.shape() || dout.shape() != q.shape())
    throw std::invalid_argument("attention: o and dout must have q's shape");
  if (lse.shape() != mx::Shape{q.shape(0), q.shape(1), q.shape(2)})
    throw std::invalid_argument("attention: lse must be (batch, heads, T)");
  auto st = mx::to_stream(s);
  std::vector<mx::array> in;
  for (auto* x : {&q, &k, &v, &o, &lse, &dout}) in.push_back(prepared(*x, st));
  return mx::array::make_arrays({q.shape(), k.shape(), v.shape()},
                                std::vector<mx::Dtype>(3, mx::float32),
                                std::make_shared<AttentionBackward>(st, scale, window), in);
}

}  // namespace

void register_attention(nb::module_& m) {
  m.def("attention_forward", &attention_forward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("scale"), nb::arg("window"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "(o, lse) of causal softmax attention; the queries are the last T of the S keys.");
  m.def("attention_backward", &attention_backward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("o"), nb::arg("lse"), nb::arg("dout"), nb::arg("scale"), nb::arg("window"),
        nb::kw_only(), nb::arg("stream") = nb::none(), "(dq, dk, dv) of attention_forward.");
}

}  // namespace dfn4lab_kernels
