// The Python module dfn4lab.kernels._kernels: the recurrences (GRU, selective scan), attention,
// the conv blocks' convolutions, the grouped linear map, batch norm and DeepFilterNet3's streaming hop.

#include "common.h"

namespace dfn4lab_kernels {
void register_recurrences(nb::module_& m);
void register_attention(nb::module_& m);
void register_conv(nb::module_& m);
void register_linear(nb::module_& m);
void register_norm(nb::module_& m);
void register_stream(nb::module_& m);
}  // namespace dfn4lab_kernels

NB_MODULE(_kernels, m) {
  m.doc() =
      "dfn4lab's fused CPU primitives for MLX (recurrences.cpp, attention.cpp, conv.cpp, "
      "linear.cpp, norm.cpp, stream.cpp).";
  dfn4lab_kernels::register_recurrences(m);
  dfn4lab_kernels::register_attention(m);
  dfn4lab_kernels::register_conv(m);
  dfn4lab_kernels::register_linear(m);
  dfn4lab_kernels::register_norm(m);
  dfn4lab_kernels::register_stream(m);
}
