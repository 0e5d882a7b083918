// The conv blocks' convolutions that MLX runs as strided copies and slice sums, on channels-last
// arrays, each with its backward; rows split over the cores.
//
// Depthwise along frequency ((1, K) kernels, stride s, zero padding p), and its transpose, each the
// other's input gradient, plus the taps' gradient:
//   correlate: y[r, q] = sum_j w[j] x[r, s q + j - p]            x (R, F, C) -> y (R, n, C)
//   scatter:   x[r, f] = sum_{q, j: s q + j - p = f} w[j] y[r, q]  y (R, n, C) -> x (R, F, C)
//   tap_grad:  dw[j] = sum_{r, q} x[r, s q + j - p] y[r, q]          -> dw (K, C)
// A depthwise conv is `correlate` (backward: `scatter`, `tap_grad`), a transposed one `scatter`
// (backward: `correlate`, `tap_grad` with the roles swapped). In MLX ops the conv is a sum of strided
// slices over a zero-padded copy, and its backward scatters each tap into a zero copy of the input.
//
// Time taps of a (K, 1) kernel (DFN3's df_convp: grouped, run as a block-diagonal weight with the
// pointwise conv merged in), after one matmul z = x W of all K taps side by side, causal, zero history:
//   time_taps: y[b, t, f, o] = sum_i z[b, t + i - (K - 1), f, i O + o]   z (B, T, F, K O) -> (B, T, F, O)
// In MLX ops: a zero-padded copy of x, then K strided slices of z summed.

#include <mutex>

#include "common.h"

namespace dfn4lab_kernels {
namespace {

struct Geometry {
  int F, n, C, K, s, p;  // input and output positions, channels, taps, stride, padding
};

// o[c] += w[c] a[c]
inline void madd(const float* __restrict w, const float* __restrict a, float* __restrict o, int C) {
  for (int c = 0; c < C; ++c) o[c] += w[c] * a[c];
}

// fn(q, j, f) for every output position q and tap j that reads input position f inside the input.
template <class Fn>
inline void for_taps(const Geometry& g, Fn&& fn) {
  for (int q = 0; q < g.n; ++q)
    for (int j = 0; j < g.K; ++j) {
      const int f = g.s * q + j - g.p;
      if (f >= 0 && f < g.F) fn(q, j, f);
    }
}

// Rows [r0, r1): correlate x (F positions) -> y (n), or scatter y (n) -> x (F).
void conv_rows(const float* in, const float* w, float* out, const Geometry& g, bool scatter, size_t r0,
               size_t r1) {
  const size_t in_len = size_t(scatter ? g.n : g.F) * g.C, out_len = size_t(scatter ? g.F : g.n) * g.C;
  for (size_t r = r0; r < r1; ++r) {
    const float* a = in + r * in_len;
    float* o = out + r * out_len;
    std::fill(o, o + out_len, 0.0f);
    for_taps(g, [&](int q, int j, int f) {
      if (scatter)
        madd(w + j * g.C, a + q * g.C, o + f * g.C, g.C);
      else
        madd(w + j * g.C, a + f * g.C, o + q * g.C, g.C);
    });
  }
}

// dw (K, C): per row a float partial sum, added in double (rows x n terms in all).
void tap_grad(const float* x, const float* y, float* dw, const Geometry& g, size_t R) {
  const size_t KC = size_t(g.K) * g.C;
  std::vector<double> total(KC, 0.0);
  std::mutex lock;
  for_rows(R, size_t(g.F) * g.C, [&](size_t r0, size_t r1) {
    std::vector<double> acc(KC, 0.0);
    std::vector<float> part(KC);
    for (size_t r = r0; r < r1; ++r) {
      const float* xr = x + r * g.F * g.C;
      const float* yr = y + r * g.n * g.C;
      std::fill(part.begin(), part.end(), 0.0f);
      for_taps(g, [&](int q, int j, int f) {
        madd(xr + f * g.C, yr + q * g.C, part.data() + j * g.C, g.C);
      });
      for (size_t k = 0; k < KC; ++k) acc[k] += part[k];
    }
    std::lock_guard<std::mutex> guard(lock);
    for (size_t k = 0; k < KC; ++k) total[k] += acc[k];
  });
  for (size_t k = 0; k < KC; ++k) dw[k] = float(total[k]);
}

enum Kind { kCorrelate, kScatter, kTapGrad };

class Depthwise : public CpuLoop {
 public:
  Depthwise(mx::Stream st, Kind kind, Geometry g) : CpuLoop(st), kind_(kind), g_(g) {}
  const char* name() const override {
    if (kind_ == kCorrelate) return "DepthwiseCorrelate";
    return kind_ == kScatter ? "DepthwiseScatter" : "DepthwiseTapGrad";
  }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const size_t R = in[0].shape(0);
    return [a = in[0].data<float>(), b = in[1].data<float>(), o = out[0].data<float>(), R, g = g_,
            kind = kind_]() {
      if (kind == kTapGrad) return tap_grad(a, b, o, g, R);
      const size_t width = size_t(std::max(g.F, g.n)) * g.C;
      for_rows(R, width, [&](size_t r0, size_t r1) {
        conv_rows(a, b, o, g, kind == kScatter, r0, r1);
      });
    };
  }

 private:
  Kind kind_;
  Geometry g_;
};

void check_geometry(const mx::array& x, const mx::array& y, const Geometry& g) {
  if (g.s < 1 || g.p < 0 || g.K < 1 || g.F < 1 || g.n < 1 || x.shape(0) != y.shape(0) ||
      x.shape(1) != g.F || y.shape(1) != g.n || x.shape(2) != g.C || y.shape(2) != g.C)
    throw std::invalid_argument("depthwise: x (R, F, C) and y (R, n, C) do not match");
}

// correlate: a = x (R, F, C) -> y (R, size = n, C); scatter: a = y (R, n, C) -> x (R, size = F, C).
mx::array depthwise(const mx::array& a, const mx::array& w, int stride, int pad, int size, Kind kind,
                    mx::StreamOrDevice s) {
  check(a, 3, kind == kCorrelate ? "x" : "y");
  check(w, 2, "w");
  const int in = a.shape(1), C = a.shape(2), K = w.shape(0);
  const Geometry g = kind == kCorrelate ? Geometry{in, size, C, K, stride, pad}
                                        : Geometry{size, in, C, K, stride, pad};
  if (w.shape(1) != C || size < 1 || stride < 1 || pad < 0)
    throw std::invalid_argument("depthwise: taps must be (K, C) for an input (R, positions, C); size >= 1");
  auto st = mx::to_stream(s);
  return mx::array({a.shape(0), size, C}, mx::float32, std::make_shared<Depthwise>(st, kind, g),
                   {prepared(a, st), prepared(w, st)});
}

// dw (K, C) from x (R, F, C) and y (R, n, C).
mx::array depthwise_tap_grad(const mx::array& x, const mx::array& y, int taps, int stride, int pad,
                             mx::StreamOrDevice s) {
  check(x, 3, "x");
  check(y, 3, "y");
  const Geometry g{x.shape(1), y.shape(1), x.shape(2), taps, stride, pad};
  check_geometry(x, y, g);
  auto st = mx::to_stream(s);
  return mx::array({taps, g.C}, mx::float32, std::make_shared<Depthwise>(st, kTapGrad, g),
                   {prepared(x, st), prepared(y, st)});
}


// y (B, T, F, O) from z (B, T, F, K O); rows (b, t) split over the cores.
class TimeTaps : public CpuLoop {
 public:
  TimeTaps(mx::Stream st, int taps, bool grad) : CpuLoop(st), K_(taps), grad_(grad) {}
  const char* name() const override { return grad_ ? "TimeTapsGrad" : "TimeTaps"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int T = in[0].shape(1), F = in[0].shape(2);
    const int O = grad_ ? in[0].shape(3) : in[0].shape(3) / K_;
    const size_t rows = size_t(in[0].shape(0)) * T;
    return [a = in[0].data<float>(), o = out[0].data<float>(), rows, T, F, O, K = K_, grad = grad_]() {
      const size_t frame = size_t(F) * O;  // one frame of y; K of them make one of z
      for_rows(rows, frame * K, [&](size_t r0, size_t r1) {
        for (size_t r = r0; r < r1; ++r) {
          const int t = int(r % T);
          if (!grad) {  // y[t] = sum_i z[t + i - (K - 1)][tap i]
            float* y = o + r * frame;
            std::fill(y, y + frame, 0.0f);
            for (int i = std::max(0, K - 1 - t); i < K; ++i) {
              const float* z = a + (r + i - (K - 1)) * frame * K + size_t(i) * O;
              for (int f = 0; f < F; ++f)
                for (int c = 0; c < O; ++c) y[size_t(f) * O + c] += z[size_t(f) * K * O + c];
            }
          } else {  // dz[t][tap i] = dy[t - i + K - 1] where that frame exists
            float* dz = o + r * frame * K;
            for (int i = 0; i < K; ++i) {
              const int src = t - i + K - 1;
              const float* dy = src < T ? a + (r - t + src) * frame : nullptr;
              for (int f = 0; f < F; ++f) {
                float* d = dz + (size_t(f) * K + i) * O;
                if (dy)
                  std::copy(dy + size_t(f) * O, dy + size_t(f + 1) * O, d);
                else
                  std::fill(d, d + O, 0.0f);
              }
            }
          }
        }
      });
    };
  }

 private:
  int K_;
  bool grad_;
};

// y (B, T, F, O) from z (B, T, F, taps O).
mx::array time_taps(const mx::array& z, int taps, mx::StreamOrDevice s) {
  check(z, 4, "z");
  if (taps < 1 || z.shape(3) % taps)
    throw std::invalid_argument("time_taps: z's last axis must hold the taps side by side");
  auto st = mx::to_stream(s);
  return mx::array({z.shape(0), z.shape(1), z.shape(2), z.shape(3) / taps}, mx::float32,
                   std::make_shared<TimeTaps>(st, taps, false), {prepared(z, st)});
}

// dz (B, T, F, taps O) from dy (B, T, F, O).
mx::array time_taps_grad(const mx::array& dy, int taps, mx::StreamOrDevice s) {
  check(dy, 4, "dy");
  if (taps < 1) throw std::invalid_argument("time_taps: taps must be >= 1");
  auto st = mx::to_stream(s);
  return mx::array({dy.shape(0), dy.shape(1), dy.shape(2), dy.shape(3) * taps}, mx::float32,
                   std::make_shared<TimeTaps>(st, taps, true), {prepared(dy, st)});
}

}  // namespace

void register_conv(nb::module_& m) {
  m.def(
      "depthwise_correlate",
      [](const mx::array& x, const mx::array& w, int stride, int pad, int n, mx::StreamOrDevice s) {
        return depthwise(x, w, stride, pad, n, kCorrelate, s);
      },
      nb::arg("x"), nb::arg("w"), nb::arg("stride"), nb::arg("pad"), nb::arg("n"), nb::kw_only(),
      nb::arg("stream") = nb::none(),
      "y (R, n, C): y[r, q] = sum_j w[j] x[r, stride q + j - pad] (zero outside x).");
  m.def(
      "depthwise_scatter",
      [](const mx::array& y, const mx::array& w, int stride, int pad, int F, mx::StreamOrDevice s) {
        return depthwise(y, w, stride, pad, F, kScatter, s);
      },
      nb::arg("y"), nb::arg("w"), nb::arg("stride"), nb::arg("pad"), nb::arg("F"), nb::kw_only(),
      nb::arg("stream") = nb::none(),
      "x (R, F, C): the transpose of depthwise_correlate applied to y.");
  m.def("depthwise_tap_grad", &depthwise_tap_grad, nb::arg("x"), nb::arg("y"), nb::arg("taps"),
        nb::arg("stride"), nb::arg("pad"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "dw (taps, C): sum over rows and q of x[r, stride q + j - pad] y[r, q].");
  m.def("time_taps", &time_taps, nb::arg("z"), nb::arg("taps"), nb::kw_only(),
        nb::arg("stream") = nb::none(),
        "y (B, T, F, O): sum over taps i of z[:, t + i - (taps - 1), :, i O : (i + 1) O], zero history.");
  m.def("time_taps_grad", &time_taps_grad, nb::arg("dy"), nb::arg("taps"), nb::kw_only(),
        nb::arg("stream") = nb::none(), "dz (B, T, F, taps O) of time_taps.");
}

}  // namespace dfn4lab_kernels
