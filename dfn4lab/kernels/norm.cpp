// Training-mode batch normalisation fused with the activation after it (the conv blocks' BatchNorm
// + ReLU), forward and backward, on channels-last rows x (N, C); and eval mode's act(x + bias).
//
// MLX runs the ops of a batch norm one pass each (mean, variance, normalise; the backward's
// reductions and broadcasts) on one core per stream. Here the forward is two passes over x and the
// backward two over (x, y, dy), with the rows split over the cores. Per-channel sums are accumulated
// in double over blocks of float partial sums; the forward's are shifted by the channel's first
// value, so the variance keeps float32 accuracy when the mean is large against the spread.
//
// act: 0 none, 1 ReLU, 2 sigmoid (common.h's rational form, as dfn4lab.activations); the backward
// reads the activation's derivative from its output y.

#include <mutex>

#include "common.h"

namespace dfn4lab_kernels {
namespace {

constexpr int kBlock = 256;  // rows summed in float before they are added in double

inline float act_forward(float z, int act) {
  return act == 1 ? (z > 0.0f ? z : 0.0f) : (act == 2 ? sigmoid_r(z) : z);
}

inline float act_grad(float y, int act) {  // d act / dz as a function of the output
  return act == 1 ? (y > 0.0f ? 1.0f : 0.0f) : (act == 2 ? y * (1.0f - y) : 1.0f);
}

// Per channel c over rows [r0, r1): s1 += sum f1(row, c), s2 += sum f2(row, c), float partial sums
// over kBlock rows added in double. `term(row, c, &a, &b)` gives one row's two terms.
template <class Term>
void channel_sums(size_t r0, size_t r1, int C, double* s1, double* s2, Term&& term) {
  std::vector<float> p1(C), p2(C);
  for (size_t r = r0; r < r1; r += kBlock) {
    std::fill(p1.begin(), p1.end(), 0.0f);
    std::fill(p2.begin(), p2.end(), 0.0f);
    const size_t end = std::min(r1, r + kBlock);
    for (size_t i = r; i < end; ++i) term(i, p1.data(), p2.data());
    for (int c = 0; c < C; ++c) s1[c] += p1[c], s2[c] += p2[c];
  }
}

// The sums of all rows: each block's sums, added under a lock.
template <class Term>
void all_channel_sums(size_t N, int C, std::vector<double>& s1, std::vector<double>& s2, Term term) {
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  std::mutex lock;
  for_rows(N, C, [&](size_t r0, size_t r1) {
    std::vector<double> a(C, 0.0), b(C, 0.0);
    channel_sums(r0, r1, C, a.data(), b.data(), term);
    std::lock_guard<std::mutex> guard(lock);
    for (int c = 0; c < C; ++c) s1[c] += a[c], s2[c] += b[c];
  });
}

class NormPrimitive : public CpuLoop {
 public:
  NormPrimitive(mx::Stream s, float eps, int act) : CpuLoop(s), eps_(eps), act_(act) {}

 protected:
  float eps_;
  int act_;
};

// (y (N, C), mean (C), biased var (C)) from x (N, C), weight (C), bias (C).
class BatchNormForward : public NormPrimitive {
 public:
  using NormPrimitive::NormPrimitive;
  const char* name() const override { return "BatchNormForward"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const size_t N = in[0].shape(0);
    const int C = in[0].shape(1);
    return [x = in[0].data<float>(), w = in[1].data<float>(), b = in[2].data<float>(),
            y = out[0].data<float>(), mean = out[1].data<float>(), var = out[2].data<float>(),
            N, C, eps = eps_, act = act_]() {
      std::vector<double> s1, s2;
      all_channel_sums(N, C, s1, s2, [=](size_t i, float* __restrict p1, float* __restrict p2) {
        const float* __restrict xr = x + i * C;
        for (int c = 0; c < C; ++c) {
          const float d = xr[c] - x[c];  // shifted by row 0: no cancellation when |mean| >> std
          p1[c] += d, p2[c] += d * d;
        }
      });
      std::vector<float> scale(C);
      for (int c = 0; c < C; ++c) {
        const double m = s1[c] / N, v = std::max(s2[c] / N - m * m, 0.0);
        mean[c] = float(x[c] + m), var[c] = float(v);
        scale[c] = float(w[c] / std::sqrt(v + eps));
      }
      // (x - mean) first, as MLX's ops: folding the mean into a shift loses digits when |mean| >> std
      for_rows(N, C, [&, x, y, b, mean, C, act](size_t r0, size_t r1) {
        const float* __restrict sc = scale.data();
        for (size_t i = r0; i < r1; ++i) {
          const float* __restrict xr = x + i * C;
          float* __restrict yr = y + i * C;
          for (int c = 0; c < C; ++c) yr[c] = act_forward((xr[c] - mean[c]) * sc[c] + b[c], act);
        }
      });
    };
  }
};

// (dx (N, C), dweight (C), dbias (C)) from x, weight, mean, var, y and dy.
class BatchNormBackward : public NormPrimitive {
 public:
  using NormPrimitive::NormPrimitive;
  const char* name() const override { return "BatchNormBackward"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const size_t N = in[0].shape(0);
    const int C = in[0].shape(1);
    return [x = in[0].data<float>(), w = in[1].data<float>(), mean = in[2].data<float>(),
            var = in[3].data<float>(), y = in[4].data<float>(), dy = in[5].data<float>(),
            dx = out[0].data<float>(), dw = out[1].data<float>(), db = out[2].data<float>(), N, C,
            eps = eps_, act = act_]() {
      // g = dy act'(y): the gradient at the normalised value z = xhat w + b
      std::vector<double> sg, sgx;
      all_channel_sums(N, C, sg, sgx, [=](size_t i, float* __restrict p1, float* __restrict p2) {
        const float *__restrict xr = x + i * C, *__restrict yr = y + i * C, *__restrict dr = dy + i * C;
        for (int c = 0; c < C; ++c) {
          const float g = dr[c] * act_grad(yr[c], act);
          p1[c] += g, p2[c] += g * (xr[c] - mean[c]);
        }
      });
      // dx = a g + k1 (x - mean) + k0 with a = w invstd, k1 = -a invstd^2 sum(g (x - mean)) / N,
      // k0 = -a sum(g) / N
      std::vector<float> a(C), k1(C), k0(C);
      for (int c = 0; c < C; ++c) {
        const double inv = 1.0 / std::sqrt(double(var[c]) + eps), ac = w[c] * inv;
        a[c] = float(ac), k1[c] = float(-ac * inv * inv * sgx[c] / N), k0[c] = float(-ac * sg[c] / N);
        db[c] = float(sg[c]), dw[c] = float(sgx[c] * inv);
      }
      for_rows(N, C, [&, x, y, dy, dx, mean, C, act](size_t r0, size_t r1) {
        const float *__restrict pa = a.data(), *__restrict p1 = k1.data(), *__restrict p0 = k0.data();
        for (size_t i = r0; i < r1; ++i) {
          const float *__restrict xr = x + i * C, *__restrict yr = y + i * C, *__restrict dr = dy + i * C;
          float* __restrict o = dx + i * C;
          for (int c = 0; c < C; ++c)
            o[c] = pa[c] * (dr[c] * act_grad(yr[c], act)) + p1[c] * (xr[c] - mean[c]) + p0[c];
        }
      });
    };
  }
};

// y = act(x + bias) over x (N, C): eval mode's folded BatchNorm, one pass on every core.
class BiasAct : public CpuLoop {
 public:
  BiasAct(mx::Stream s, int act) : CpuLoop(s), act_(act) {}
  const char* name() const override { return "BiasAct"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const size_t N = in[0].shape(0);
    const int C = in[0].shape(1);
    return [x = in[0].data<float>(), b = in[1].data<float>(), y = out[0].data<float>(), N, C,
            act = act_]() {
      for_rows(N, C, [=](size_t r0, size_t r1) {
        for (size_t i = r0; i < r1; ++i) {
          const float* __restrict xr = x + i * C;
          float* __restrict yr = y + i * C;
          for (int c = 0; c < C; ++c) yr[c] = act_forward(xr[c] + b[c], act);
        }
      });
    };
  }

 private:
  int act_;
};

void check_norm(const mx::array& x, int act, std::initializer_list<const mx::array*> channels) {
  check(x, 2, "x");
  if (act < 0 || act > 2) throw std::invalid_argument("batch_norm: act is 0 (none), 1 (relu) or 2 (sigmoid)");
  if (x.shape(0) < 2) throw std::invalid_argument("batch_norm: training needs more than one row");
  for (auto* a : channels) {
    check(*a, 1, "a per-channel vector");
    if (a->shape(0) != x.shape(1)) throw std::invalid_argument("batch_norm: per-channel sizes must be x's C");
  }
}

std::vector<mx::array> batch_norm_forward(const mx::array& x, const mx::array& weight,
                                          const mx::array& bias, float eps, int act,
                                          mx::StreamOrDevice s) {
  check_norm(x, act, {&weight, &bias});
  auto st = mx::to_stream(s);
  const mx::Shape c{x.shape(1)};
  return mx::array::make_arrays({x.shape(), c, c}, std::vector<mx::Dtype>(3, mx::float32),
                                std::make_shared<BatchNormForward>(st, eps, act),
                                {prepared(x, st), prepared(weight, st), prepared(bias, st)});
}

std::vector<mx::array> batch_norm_backward(const mx::array& x, const mx::array& weight,
                                           const mx::array& mean, const mx::array& var,
                                           const mx::array& y, const mx::array& dy, float eps, int act,
                                           mx::StreamOrDevice s) {
  check_norm(x, act, {&weight, &mean, &var});
  check(y, 2, "y");
  check(dy, 2, "dy");
  if (y.shape() != x.shape() || dy.shape() != x.shape())
    throw std::invalid_argument("batch_norm: y and dy must have x's shape");
  auto st = mx::to_stream(s);
  std::vector<mx::array> in;
  for (auto* a : {&x, &weight, &mean, &var, &y, &dy}) in.push_back(prepared(*a, st));
  const mx::Shape c{x.shape(1)};
  return mx::array::make_arrays({x.shape(), c, c}, std::vector<mx::Dtype>(3, mx::float32),
                                std::make_shared<BatchNormBackward>(st, eps, act), in);
}

mx::array bias_act(const mx::array& x, const mx::array& bias, int act, mx::StreamOrDevice s) {
  check(x, 2, "x");
  check(bias, 1, "bias");
  if (act < 0 || act > 2) throw std::invalid_argument("bias_act: act is 0 (none), 1 (relu) or 2 (sigmoid)");
  if (bias.shape(0) != x.shape(1)) throw std::invalid_argument("bias_act: bias must have x's C values");
  auto st = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<BiasAct>(st, act),
                   {prepared(x, st), prepared(bias, st)});
}

}  // namespace

void register_norm(nb::module_& m) {
  m.def("bias_act", &bias_act, nb::arg("x"), nb::arg("bias"), nb::arg("act"), nb::kw_only(),
        nb::arg("stream") = nb::none(), "act(x + bias) over x (N, C).");
  m.def("batch_norm_forward", &batch_norm_forward, nb::arg("x"), nb::arg("weight"), nb::arg("bias"),
        nb::arg("eps"), nb::arg("act"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "(y, mean, biased var) of training-mode batch norm and activation over x (N, C).");
  m.def("batch_norm_backward", &batch_norm_backward, nb::arg("x"), nb::arg("weight"),
        nb::arg("mean"), nb::arg("var"), nb::arg("y"), nb::arg("dy"), nb::arg("eps"), nb::arg("act"),
        nb::kw_only(), nb::arg("stream") = nb::none(), "(dx, dweight, dbias) of batch_norm_forward.");
}

}  // namespace dfn4lab_kernels
