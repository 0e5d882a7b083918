// Grouped linear map (upstream's GroupedLinearEinsum), forward and both gradients, without copies:
// group g of a row is x[r, g I : (g + 1) I] times w[g] (I, H), written to y[r, g H : (g + 1) H]. Each
// group is one SGEMM on strided rows (lda = G I), the groups split over the cores.
//
// In MLX ops the groups are a batched matmul over a transposed copy of x, and the output is copied
// back to row-major: two passes over the data besides the small, slow GEMMs.
//
//   forward: y (R, G H) from x (R, G I), w (G, I, H)
//   dx:      dx (R, G I) from dy (R, G H), w      (dx_g = dy_g w_g^T)
//   dw:      dw (G, I, H) from x, dy               (dw_g = x_g^T dy_g)

#include "common.h"

namespace dfn4lab_kernels {
namespace {

enum Kind { kForward, kInputGrad, kWeightGrad };

// fn(g) for every group: groups split over the cores, one BLAS thread each (MKL; other BLAS keep their
// setting). One group keeps the BLAS's own threads, and little work (`work` in multiply-adds, under
// 8 kMinWork: a few rows) runs on the calling thread: starting threads there costs more than it saves.
template <class F>
void for_groups(int G, size_t work, F&& fn) {
  if (G == 1 || work < kMinWork * 8) {
    for (int g = 0; g < G; ++g) fn(g);
    return;
  }
  for_row_blocks(G, [&](int g0, int g1) {
    OneBlasThread one;
    for (int g = g0; g < g1; ++g) fn(g);
  });
}

class GroupedLinear : public CpuLoop {
 public:
  GroupedLinear(mx::Stream s, Kind kind) : CpuLoop(s), kind_(kind) {}
  const char* name() const override {
    if (kind_ == kForward) return "GroupedLinear";
    return kind_ == kInputGrad ? "GroupedLinearInputGrad" : "GroupedLinearWeightGrad";
  }

 protected:
  Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    // forward: (x, w); input grad: (dy, w); weight grad: (x, dy)
    const int R = in[0].shape(0);
    const mx::array& w = kind_ == kWeightGrad ? out[0] : in[1];
    const int G = w.shape(0), I = w.shape(1), H = w.shape(2);
    return [a = in[0].data<float>(), b = in[1].data<float>(), o = out[0].data<float>(), R, G, I, H,
            kind = kind_]() {
      for_groups(G, size_t(R) * G * I * H, [=](int g) {
        const size_t wg = size_t(g) * I * H;
        if (kind == kForward)  // y_g = x_g w_g
          cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, R, H, I, 1.0f, a + size_t(g) * I, G * I, b + wg, H,
                      0.0f, o + size_t(g) * H, G * H);
        else if (kind == kInputGrad)  // dx_g = dy_g w_g^T
          cblas_sgemm(kRowMajor, kNoTrans, kTrans, R, I, H, 1.0f, a + size_t(g) * H, G * H, b + wg, H,
                      0.0f, o + size_t(g) * I, G * I);
        else  // dw_g = x_g^T dy_g
          cblas_sgemm(kRowMajor, kTrans, kNoTrans, I, H, R, 1.0f, a + size_t(g) * I, G * I,
                      b + size_t(g) * H, G * H, 0.0f, o + wg, H);
      });
    };
  }

 private:
  Kind kind_;
};

void check_weight(const mx::array& w) {
  check(w, 3, "w");
  if (w.shape(0) < 1 || w.shape(1) < 1 || w.shape(2) < 1)
    throw std::invalid_argument("grouped_linear: w must be (groups, in, out) with sizes >= 1");
}

mx::array grouped_linear(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  check(x, 2, "x");
  check_weight(w);
  if (x.shape(1) != w.shape(0) * w.shape(1))
    throw std::invalid_argument("grouped_linear: x must be (rows, groups * in) for w (groups, in, out)");
  auto st = mx::to_stream(s);
  return mx::array({x.shape(0), w.shape(0) * w.shape(2)}, mx::float32,
                   std::make_shared<GroupedLinear>(st, kForward), {prepared(x, st), prepared(w, st)});
}

mx::array grouped_linear_input_grad(const mx::array& dy, const mx::array& w, mx::StreamOrDevice s) {
  check(dy, 2, "dy");
  check_weight(w);
  if (dy.shape(1) != w.shape(0) * w.shape(2))
    throw std::invalid_argument("grouped_linear: dy must be (rows, groups * out) for w (groups, in, out)");
  auto st = mx::to_stream(s);
  return mx::array({dy.shape(0), w.shape(0) * w.shape(1)}, mx::float32,
                   std::make_shared<GroupedLinear>(st, kInputGrad), {prepared(dy, st), prepared(w, st)});
}

mx::array grouped_linear_weight_grad(const mx::array& x, const mx::array& dy, int groups,
                                     mx::StreamOrDevice s) {
  check(x, 2, "x");
  check(dy, 2, "dy");
  if (groups < 1 || x.shape(0) != dy.shape(0) || x.shape(1) % groups || dy.shape(1) % groups)
    throw std::invalid_argument("grouped_linear: x (rows, groups * in) and dy (rows, groups * out)");
  auto st = mx::to_stream(s);
  return mx::array({groups, x.shape(1) / groups, dy.shape(1) / groups}, mx::float32,
                   std::make_shared<GroupedLinear>(st, kWeightGrad), {prepared(x, st), prepared(dy, st)});
}

}  // namespace

void register_linear(nb::module_& m) {
  m.def("grouped_linear", &grouped_linear, nb::arg("x"), nb::arg("w"), nb::kw_only(),
        nb::arg("stream") = nb::none(), "y (rows, groups * out): each group of x times its w[g].");
  m.def("grouped_linear_input_grad", &grouped_linear_input_grad, nb::arg("dy"), nb::arg("w"),
        nb::kw_only(), nb::arg("stream") = nb::none(), "dx (rows, groups * in) of grouped_linear.");
  m.def("grouped_linear_weight_grad", &grouped_linear_weight_grad, nb::arg("x"), nb::arg("dy"),
        nb::arg("groups"), nb::kw_only(), nb::arg("stream") = nb::none(),
        "dw (groups, in, out) of grouped_linear.");
}

}  // namespace dfn4lab_kernels
