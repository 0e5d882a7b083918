// Fused time loops for MLX on the CPU: one primitive runs all frames of a GRU layer or of Mamba's
// selective scan, forward or backward.
//
// MLX dispatches each op of a per-frame loop separately, and its BLAS call for the GRU's recurrent
// (batch x H) @ (H x 3H) product runs on all cores, which at batch 8 costs twice the one-thread
// time in synchronisation. Here the batch rows are split over the cores; each frame is one
// product with w_hh, packed once per call (common.h's Packed), plus one pass over the gates. Batch 8,
// 500 frames, H 256: forward 15 -> 7.4 ms, backward 21 -> 8.7 ms against one MKL SGEMM per frame,
// which repacked w_hh every frame (batch 1: 4.2 -> 2.5 ms against a GEMV). Float32 only; other dtypes
// and the GPU use dfn4lab.backbones' MLX-op loops, which are also the reference the tests compare
// against.
//
// GRU layouts are row-major and contiguous: xi, gh, dxi, dgh (batch, time, 3H) with gates r, z, n
// as in torch.nn.GRU; ys, h_prev, dy (batch, time, H); h0 (batch, H); w_hh (3H, H); b_hh (3H).

#include <optional>

#include "common.h"

namespace dfn4lab_kernels {
namespace {

// The gates of one row and frame: y = GRU(x, h) with g = h w_hh^T. The gate loops are functions of
// restrict-qualified pointers so that GCC vectorizes them (with possible aliasing it did not).
inline void gates_forward(const float* __restrict x, const float* __restrict g,
                          const float* __restrict b, const float* __restrict h, float* __restrict y,
                          int H) {
  for (int j = 0; j < H; ++j) {
    const float r = sigmoid_r(x[j] + g[j] + b[j]);
    const float z = sigmoid_r(x[H + j] + g[H + j] + b[H + j]);
    const float n = tanh_r(x[2 * H + j] + r * (g[2 * H + j] + b[2 * H + j]));
    y[j] = n + z * (h[j] - n);
  }
}

// Its backward: dxi (ox) and dgh (og) of the frame from d = dL/dy plus the carried dL/dh (c), which
// becomes the carry for the frame before. Here g includes b_hh.
inline void gates_backward(const float* __restrict x, const float* __restrict g,
                           const float* __restrict h, const float* __restrict d,
                           float* __restrict ox, float* __restrict og, float* __restrict c, int H) {
  for (int j = 0; j < H; ++j) {
    const float r = sigmoid_r(x[j] + g[j]), z = sigmoid_r(x[H + j] + g[H + j]);
    const float hn = g[2 * H + j], n = tanh_r(x[2 * H + j] + r * hn);
    const float gd = c[j] + d[j];  // dL/dh_t
    const float dn = gd * (1 - z) * (1 - n * n);
    const float dz = gd * (h[j] - n) * z * (1 - z);
    const float dr = dn * hn * r * (1 - r);
    ox[j] = og[j] = dr;
    ox[H + j] = og[H + j] = dz;
    ox[2 * H + j] = dn;
    og[2 * H + j] = dn * r;
    c[j] = gd * z;
  }
}

// Packing w_hh costs about one frame's product: below this many frames (a streaming hop) the
// products read w_hh as it is (forward: a GEMV per row; backward: an axpy per row of w_hh).
constexpr int kPackFrames = 4;

// ys for rows [r0, r1): ys_t = GRU(xi_t, ys_{t-1}), ys_{-1} = h0; wt is w_hh^T packed, or null.
void forward_rows(const float* xi, const float* h0, const float* w, const Packed* wt, const float* b,
                  float* ys, int r0, int r1, int T, int H) {
  const int rows = r1 - r0;
  xi += size_t(r0) * T * 3 * H, h0 += size_t(r0) * H, ys += size_t(r0) * T * H;
  std::vector<float> gh(size_t(rows) * 3 * H);
  for (int t = 0; t < T; ++t) {
    const float* hp = t == 0 ? h0 : ys + size_t(t - 1) * H;
    const int ldh = t == 0 ? H : T * H;
    if (wt) packed_gemm(hp, ldh, *wt, gh.data(), 3 * H, rows, false);
    for (int i = 0; i < rows; ++i) {
      const float* h = hp + size_t(i) * ldh;
      float* g = gh.data() + size_t(i) * 3 * H;
      if (!wt) gemv(w, h, nullptr, g, 3 * H, H);
      gates_forward(xi + (size_t(i) * T + t) * 3 * H, g, b, h, ys + (size_t(i) * T + t) * H, H);
    }
  }
}

// dxi, dgh and dh (= dh0 at the end) for rows [r0, r1), frames in reverse; pw is w_hh packed, or null.
void backward_rows(const float* dy, const float* xi, const float* gh, const float* hp, const float* w,
                   const Packed* pw, float* dxi, float* dgh, float* dh, int r0, int r1, int T, int H) {
  const int rows = r1 - r0;
  const size_t o3 = size_t(r0) * T * 3 * H, o1 = size_t(r0) * T * H;
  dy += o1, hp += o1, xi += o3, gh += o3, dxi += o3, dgh += o3, dh += size_t(r0) * H;
  std::fill(dh, dh + size_t(rows) * H, 0.0f);
  for (int t = T - 1; t >= 0; --t) {
    for (int i = 0; i < rows; ++i) {
      const size_t row = size_t(i) * T + t;
      const float *x = xi + row * 3 * H, *g = gh + row * 3 * H, *h = hp + row * H;
      const float* d = dy + row * H;
      gates_backward(x, g, h, d, dxi + row * 3 * H, dgh + row * 3 * H, dh + size_t(i) * H, H);
    }
    // dh_{t-1} += dgh_t w_hh over this block's rows of frame t
    const float* d = dgh + size_t(t) * 3 * H;
    const size_t ld = size_t(T) * 3 * H;
    if (pw) {
      packed_gemm(d, ld, *pw, dh, H, rows, true);
      continue;
    }
    for (int i = 0; i < rows; ++i)
      for (int k = 0; k < 3 * H; ++k) axpy(d[i * ld + k], w + size_t(k) * H, dh + size_t(i) * H, H);
  }
}

// Forward: ys (batch, time, H) from xi (batch, time, 3H), h0, w_hh, b_hh.
class GRUForward : public CpuLoop {
 public:
  using CpuLoop::CpuLoop;
  const char* name() const override { return "GRUForward"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int bs = in[0].shape(0), T = in[0].shape(1), H = in[1].shape(1);
    return [xi = in[0].data<float>(), h0 = in[1].data<float>(), w = in[2].data<float>(),
            b = in[3].data<float>(), ys = out[0].data<float>(), bs, T, H]() {
      std::optional<Packed> wt;  // w_hh^T, packed once for all frames
      if (T >= kPackFrames) wt.emplace(w, H, 3 * H, 1, H);
      const Packed* p = wt ? &*wt : nullptr;
      for_row_blocks(bs, [=](int r0, int r1) { forward_rows(xi, h0, w, p, b, ys, r0, r1, T, H); });
    };
  }
};

// Backward: from dy, xi, gh (= h_prev w_hh^T + b_hh, all frames), h_prev, w_hh to dxi, dgh
// (both (batch, time, 3H)) and dh0 (batch, H). The weight gradient is one matmul outside.
class GRUBackward : public CpuLoop {
 public:
  using CpuLoop::CpuLoop;
  const char* name() const override { return "GRUBackward"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int bs = in[1].shape(0), T = in[1].shape(1), H = in[3].shape(2);
    return [dy = in[0].data<float>(), xi = in[1].data<float>(), gh = in[2].data<float>(),
            hp = in[3].data<float>(), w = in[4].data<float>(), dxi = out[0].data<float>(),
            dgh = out[1].data<float>(), dh = out[2].data<float>(), bs, T, H]() {
      std::optional<Packed> pw;  // w_hh as (3H, H), packed once for all frames
      if (T >= kPackFrames) pw.emplace(w, 3 * H, H, H, 1);
      const Packed* p = pw ? &*pw : nullptr;
      for_row_blocks(bs, [=](int r0, int r1) {
        backward_rows(dy, xi, gh, hp, w, p, dxi, dgh, dh, r0, r1, T, H);
      });
    };
  }
};

// ------------------------------------------------------------------------------ selective scan
//
// Mamba's h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = C_t . h_t per channel d, over
// u, delta (batch, time, D), A (D, N) <= 0, B, C (batch, time, N), h (batch, D, N).

// Inside a row the states are held as (N, D), transposed from the API's (D, N): state n of all
// channels is contiguous, so each update runs down D channels as one vector loop with no
// horizontal sums (with N = 16 a (D, N) loop is one short vector per channel plus a reduction).
void to_nd(const float* dn, float* nd, int D, int N) {
  for (int d = 0; d < D; ++d)
    for (int n = 0; n < N; ++n) nd[size_t(n) * D + d] = dn[size_t(d) * N + n];
}

void to_dn(const float* nd, float* dn, int D, int N) {
  for (int d = 0; d < D; ++d)
    for (int n = 0; n < N; ++n) dn[size_t(d) * N + n] = nd[size_t(n) * D + d];
}

// State n of all channels, one frame: s = 2^(delta a2) s + x b_n; y += c_n s. Restrict-qualified:
// with possible aliasing GCC keeps a scalar copy of the loop and ran it.
inline void scan_state(float* __restrict s, float* __restrict y, const float* __restrict dt,
                       const float* __restrict a2, const float* __restrict x, float bn, float cn,
                       int D) {
  for (int d = 0; d < D; ++d) {
    s[d] = exp2_neg(dt[d] * a2[d]) * s[d] + x[d] * bn;
    y[d] += cn * s[d];
  }
}

// y and the last state h for rows [r0, r1).
void scan_forward_rows(const float* u, const float* dl, const float* a, const float* b,
                       const float* c, const float* h0, float* y, float* h, int r0, int r1, int T,
                       int D, int N) {
  const size_t DN = size_t(D) * N;
  std::vector<float> a2(DN), s(DN), x(D);
  to_nd(a, a2.data(), D, N);
  for (float& v : a2) v *= kLog2e;
  for (int i = r0; i < r1; ++i) {
    to_nd(h0 + i * DN, s.data(), D, N);
    for (int t = 0; t < T; ++t) {
      const size_t row = size_t(i) * T + t;
      const float *ut = u + row * D, *dt = dl + row * D, *bt = b + row * N, *ct = c + row * N;
      float* yt = y + row * D;
      for (int d = 0; d < D; ++d) x[d] = dt[d] * ut[d], yt[d] = 0.0f;
      for (int n = 0; n < N; ++n)
        scan_state(s.data() + size_t(n) * D, yt, dt, a2.data() + size_t(n) * D, x.data(), bt[n],
                   ct[n], D);
    }
    to_dn(s.data(), h + i * DN, D, N);
  }
}

// Gradients for rows [r0, r1): the forward is rerun into `hist` (time + 1 states of the row),
// then the reverse pass. dA is accumulated per row (dA_rows (batch, D, N)), summed by the caller.
void scan_backward_rows(const float* u, const float* dl, const float* a, const float* b,
                        const float* c, const float* h0, const float* dy, const float* dhT,
                        float* du, float* ddl, float* dA_rows, float* db, float* dc, float* dh0,
                        int r0, int r1, int T, int D, int N) {
  const size_t DN = size_t(D) * N;
  std::vector<float> an(DN), a2(DN), hist((size_t(T) + 1) * DN), g(DN), dA(DN), x(D), sdl(D),
      su(D);
  to_nd(a, an.data(), D, N);
  for (size_t k = 0; k < DN; ++k) a2[k] = an[k] * kLog2e;
  for (int i = r0; i < r1; ++i) {
    to_nd(h0 + i * DN, hist.data(), D, N);
    for (int t = 0; t < T; ++t) {
      const size_t row = size_t(i) * T + t;
      const float *ut = u + row * D, *dt = dl + row * D, *bt = b + row * N;
      for (int d = 0; d < D; ++d) x[d] = dt[d] * ut[d];
      for (int n = 0; n < N; ++n) {
        const size_t o = size_t(n) * D;
        const float *hp = hist.data() + size_t(t) * DN + o, *ad = a2.data() + o;
        float* hn = hist.data() + size_t(t + 1) * DN + o;
#pragma omp simd
        for (int d = 0; d < D; ++d) hn[d] = exp2_neg(dt[d] * ad[d]) * hp[d] + x[d] * bt[n];
      }
    }
    to_nd(dhT + i * DN, g.data(), D, N);  // dL/dh_t, carried backwards; ends as dL/dh0
    std::fill(dA.begin(), dA.end(), 0.0f);
    for (int t = T - 1; t >= 0; --t) {
      const size_t row = size_t(i) * T + t;
      const float *ut = u + row * D, *dt = dl + row * D, *bt = b + row * N, *ct = c + row * N;
      const float* gy = dy + row * D;
      std::fill(sdl.begin(), sdl.end(), 0.0f);
      std::fill(su.begin(), su.end(), 0.0f);
      for (int n = 0; n < N; ++n) {
        const size_t o = size_t(n) * D;
        const float *hp = hist.data() + size_t(t) * DN + o, *hc = hist.data() + size_t(t + 1) * DN + o;
        const float *ad = a2.data() + o, *aa = an.data() + o;
        float *gn_ = g.data() + o, *dAn = dA.data() + o;
        const float bn = bt[n], cn = ct[n];
        float sc = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : sc, sb)
        for (int d = 0; d < D; ++d) {
          sc += gy[d] * hc[d];
          const float gn = gn_[d] + gy[d] * cn;  // dL/dh_t
          const float decay = exp2_neg(dt[d] * ad[d]);
          const float dd = gn * hp[d] * decay;  // dL/d(delta A) through the decay
          sdl[d] += dd * aa[d] + gn * ut[d] * bn;
          dAn[d] += dd * dt[d];
          sb += gn * dt[d] * ut[d];
          su[d] += gn * dt[d] * bn;
          gn_[d] = gn * decay;
        }
        dc[row * N + n] = sc;
        db[row * N + n] = sb;
      }
      std::copy(sdl.begin(), sdl.end(), ddl + row * D);
      std::copy(su.begin(), su.end(), du + row * D);
    }
    to_dn(g.data(), dh0 + i * DN, D, N);
    to_dn(dA.data(), dA_rows + i * DN, D, N);
  }
}

class ScanForward : public CpuLoop {
 public:
  using CpuLoop::CpuLoop;
  const char* name() const override { return "ScanForward"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int bs = in[0].shape(0), T = in[0].shape(1), D = in[0].shape(2), N = in[2].shape(1);
    return [u = in[0].data<float>(), dl = in[1].data<float>(), a = in[2].data<float>(),
            b = in[3].data<float>(), c = in[4].data<float>(), h0 = in[5].data<float>(),
            y = out[0].data<float>(), h = out[1].data<float>(), bs, T, D, N]() {
      for_row_blocks(bs, [=](int r0, int r1) {
        scan_forward_rows(u, dl, a, b, c, h0, y, h, r0, r1, T, D, N);
      });
    };
  }
};

class ScanBackward : public CpuLoop {
 public:
  using CpuLoop::CpuLoop;
  const char* name() const override { return "ScanBackward"; }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int bs = in[0].shape(0), T = in[0].shape(1), D = in[0].shape(2), N = in[2].shape(1);
    return [u = in[0].data<float>(), dl = in[1].data<float>(), a = in[2].data<float>(),
            b = in[3].data<float>(), c = in[4].data<float>(), h0 = in[5].data<float>(),
            dy = in[6].data<float>(), dhT = in[7].data<float>(), du = out[0].data<float>(),
            ddl = out[1].data<float>(), dA = out[2].data<float>(), db = out[3].data<float>(),
            dc = out[4].data<float>(), dh0 = out[5].data<float>(), bs, T, D, N]() {
      const size_t DN = size_t(D) * N;
      std::vector<float> dA_rows(size_t(bs) * DN);  // per batch row, summed below: no shared writes
      for_row_blocks(bs, [&, u, dl, a, b, c, h0, dy, dhT, du, ddl, db, dc, dh0](int r0, int r1) {
        scan_backward_rows(u, dl, a, b, c, h0, dy, dhT, du, ddl, dA_rows.data(), db, dc, dh0, r0,
                           r1, T, D, N);
      });
      std::fill(dA, dA + DN, 0.0f);
      for (int i = 0; i < bs; ++i)
        for (size_t k = 0; k < DN; ++k) dA[k] += dA_rows[i * DN + k];
    };
  }
};

mx::array gru_forward(const mx::array& xi, const mx::array& h0, const mx::array& w_hh,
                      const mx::array& b_hh, mx::StreamOrDevice s) {
  check(xi, 3, "xi");
  check(h0, 2, "h0");
  check(w_hh, 2, "w_hh");
  check(b_hh, 1, "b_hh");
  const int bs = xi.shape(0), T = xi.shape(1), H = h0.shape(1);
  if (h0.shape(0) != bs || xi.shape(2) != 3 * H || w_hh.shape(0) != 3 * H || w_hh.shape(1) != H ||
      b_hh.shape(0) != 3 * H)
    throw std::invalid_argument("gru_forward: shapes do not match (batch, time, 3H), (batch, H)");
  auto st = mx::to_stream(s);
  return mx::array({bs, T, H}, mx::float32, std::make_shared<GRUForward>(st),
                   {prepared(xi, st), prepared(h0, st), prepared(w_hh, st), prepared(b_hh, st)});
}

std::vector<mx::array> gru_backward(const mx::array& dy, const mx::array& xi, const mx::array& gh,
                                    const mx::array& h_prev, const mx::array& w_hh,
                                    mx::StreamOrDevice s) {
  check(dy, 3, "dy");
  check(xi, 3, "xi");
  check(gh, 3, "gh");
  check(h_prev, 3, "h_prev");
  check(w_hh, 2, "w_hh");
  const int bs = xi.shape(0), T = xi.shape(1), H = h_prev.shape(2);
  if (dy.shape() != h_prev.shape() || gh.shape() != xi.shape() || xi.shape(2) != 3 * H ||
      h_prev.shape(0) != bs || h_prev.shape(1) != T || w_hh.shape(0) != 3 * H || w_hh.shape(1) != H)
    throw std::invalid_argument("gru_backward: shapes do not match");
  auto st = mx::to_stream(s);
  return mx::array::make_arrays({{bs, T, 3 * H}, {bs, T, 3 * H}, {bs, H}},
                                {mx::float32, mx::float32, mx::float32},
                                std::make_shared<GRUBackward>(st),
                                {prepared(dy, st), prepared(xi, st), prepared(gh, st),
                                 prepared(h_prev, st), prepared(w_hh, st)});
}

void check_scan(const mx::array& u, const mx::array& dl, const mx::array& a, const mx::array& b,
                const mx::array& c, const mx::array& h) {
  check(u, 3, "u");
  check(dl, 3, "delta");
  check(a, 2, "a");
  check(b, 3, "b");
  check(c, 3, "c");
  check(h, 3, "h");
  const int bs = u.shape(0), T = u.shape(1), D = u.shape(2), N = a.shape(1);
  if (dl.shape() != u.shape() || a.shape(0) != D || b.shape() != mx::Shape{bs, T, N} ||
      c.shape() != b.shape() || h.shape() != mx::Shape{bs, D, N})
    throw std::invalid_argument(
        "selective scan: shapes do not match u (batch, time, D), a (D, N), b (batch, time, N)");
}

std::vector<mx::array> scan_forward(const mx::array& u, const mx::array& dl, const mx::array& a,
                                    const mx::array& b, const mx::array& c, const mx::array& h,
                                    mx::StreamOrDevice s) {
  check_scan(u, dl, a, b, c, h);
  auto st = mx::to_stream(s);
  std::vector<mx::array> in;
  for (auto* x : {&u, &dl, &a, &b, &c, &h}) in.push_back(prepared(*x, st));
  return mx::array::make_arrays({u.shape(), h.shape()}, {mx::float32, mx::float32},
                                std::make_shared<ScanForward>(st), in);
}

std::vector<mx::array> scan_backward(const mx::array& u, const mx::array& dl, const mx::array& a,
                                     const mx::array& b, const mx::array& c, const mx::array& h,
                                     const mx::array& dy, const mx::array& dh_last,
                                     mx::StreamOrDevice s) {
  check_scan(u, dl, a, b, c, h);
  check(dy, 3, "dy");
  check(dh_last, 3, "dh_last");
  if (dy.shape() != u.shape() || dh_last.shape() != h.shape())
    throw std::invalid_argument("selective scan: cotangent shapes do not match the outputs");
  auto st = mx::to_stream(s);
  std::vector<mx::array> in;
  for (auto* x : {&u, &dl, &a, &b, &c, &h, &dy, &dh_last}) in.push_back(prepared(*x, st));
  return mx::array::make_arrays(
      {u.shape(), u.shape(), a.shape(), b.shape(), c.shape(), h.shape()},
      std::vector<mx::Dtype>(6, mx::float32), std::make_shared<ScanBackward>(st), in);
}

}  // namespace

void register_recurrences(nb::module_& m) {
  m.def("gru_forward", &gru_forward, nb::arg("xi"), nb::arg("h0"), nb::arg("w_hh"),
        nb::arg("b_hh"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "All hidden states (batch, time, H) of a GRU layer from its input projections xi.");
  m.def("gru_backward", &gru_backward, nb::arg("dy"), nb::arg("xi"), nb::arg("gh"),
        nb::arg("h_prev"), nb::arg("w_hh"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "(dxi, dgh, dh0) of gru_forward, given the recurrent projections gh of all frames.");
  m.def("scan_forward", &scan_forward, nb::arg("u"), nb::arg("delta"), nb::arg("a"), nb::arg("b"),
        nb::arg("c"), nb::arg("h"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "(y (batch, time, D), last state (batch, D, N)) of Mamba's selective scan.");
  m.def("scan_backward", &scan_backward, nb::arg("u"), nb::arg("delta"), nb::arg("a"),
        nb::arg("b"), nb::arg("c"), nb::arg("h"), nb::arg("dy"), nb::arg("dh_last"), nb::kw_only(),
        nb::arg("stream") = nb::none(), "(du, ddelta, da, db, dc, dh) of scan_forward.");
}

}  // namespace dfn4lab_kernels
