// Shared by dfn4lab's CPU kernels: the BLAS entry point, one-thread BLAS, fast 2^x, the rational
// activations, vector loops (dot, axpy, a batch-1 GEMV), products with a weight packed once (a
// recurrence's), argument checks, the split of independent rows over the cores, and the primitive that
// runs as one task.

#pragma once

#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);

namespace dfn4lab_kernels {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr float kLog2e = 1.4426950408889634f;

// The bound BLAS's thread count for the calling thread only (MKL); none elsewhere.
using SetLocalThreads = int (*)(int);
inline SetLocalThreads mkl_set_local() {
  static auto fn = reinterpret_cast<SetLocalThreads>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return fn;
}

struct OneBlasThread {  // each worker runs small GEMMs, too small to share between cores
  int saved = 0;
  OneBlasThread() { if (auto f = mkl_set_local()) saved = f(1); }
  ~OneBlasThread() { if (auto f = mkl_set_local()) f(saved); }
};

// 2^x for x <= 0 (a decay): 2^n from the exponent bits, n = x rounded to the nearest integer, times
// Cephes' exp2f polynomial for the rest f in [-1/2, 1/2]; relative error < 1e-7 in float32, and
// unbiased near x = 0, where Mamba's decays sit: a product of 3000 of them drifts 2e-8 (a floor-based
// form, evaluated near f = 1 there, drifted 2e-6). Vectorizes (given -fno-trapping-math,
// CMakeLists.txt), unlike exp2f.
inline float exp2_neg(float x) {
  x = x < -126.0f ? -126.0f : x;
  const float n = std::floor(x + 0.5f), f = x - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = 1.0f + f * p;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Eigen's float tanh (the same rational form as dfn4lab.activations): max abs error ~3e-7.
inline float tanh_r(float x) {
  constexpr float c = 7.90531110763549805f;
  x = x < -c ? -c : (x > c ? c : x);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

inline float sigmoid_r(float x) { return 0.5f + 0.5f * tanh_r(0.5f * x); }

inline void axpy(float a, const float* __restrict x, float* __restrict y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

inline float dot(const float* __restrict a, const float* __restrict b, int n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = W x + b (b may be null, or y itself: a residual), W (rows, cols) row-major. Eight rows at a
// time: eight independent FMA chains, so the loads, not the FMA latency, set the pace (batch-1 weights
// stream from L2 or L3 every frame).
inline void gemv(const float* __restrict w, const float* __restrict x, const float* b, float* y,
                 int rows, int cols) {
  int r = 0;
  for (; r + 8 <= rows; r += 8) {
    const float* v = w + size_t(r) * cols;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
    for (int k = 0; k < cols; ++k) {
      const float xk = x[k];
      a0 += v[k] * xk, a1 += v[cols + k] * xk, a2 += v[2 * cols + k] * xk;
      a3 += v[3 * cols + k] * xk, a4 += v[4 * cols + k] * xk, a5 += v[5 * cols + k] * xk;
      a6 += v[6 * cols + k] * xk, a7 += v[7 * cols + k] * xk;
    }
    const float a[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int i = 0; i < 8; ++i) y[r + i] = (b ? b[r + i] : 0.0f) + a[i];
  }
  for (; r < rows; ++r) y[r] = (b ? b[r] : 0.0f) + dot(w + size_t(r) * cols, x, cols);
}

// A weight B (K x N) packed once for many products with a few rows: column panels of kPanel, each
// K x kPanel contiguous (the last zero-padded), so a product streams each panel from L2 in order.
// B's element (k, n) is b[k * sk + n * sn]: W^T of a row-major W (N x K) is sk = 1, sn = K.
//
// Why not SGEMM: a recurrence multiplies the same weight by a few rows (a batch block) every frame,
// and MKL repacks the weight on each call: 20 % of DFN3's batch-8 forward was MKL's copy routines.
constexpr int kPanel = 64;  // of 16, 32, 64 and 128 the fastest GRU step here (batch 4-16, H 256)

struct Packed {
  int K = 0, N = 0;
  std::vector<float> data;  // (panels, K, kPanel)
  Packed(const float* b, int K_, int N_, size_t sk, size_t sn)
      : K(K_), N(N_), data(size_t(K_) * ((N_ + kPanel - 1) / kPanel) * kPanel, 0.0f) {
    for (int n0 = 0; n0 < N; n0 += kPanel) {
      float* panel = data.data() + size_t(n0) * K;
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < std::min(kPanel, N - n0); ++j)
          panel[size_t(k) * kPanel + j] = b[k * sk + (n0 + j) * sn];
    }
  }
};

// c (R x N, stride ldc) = (accumulate ? c : 0) + a (R x K, stride lda) B, for R rows at once: R x kPanel
// accumulators per panel, one pass over the panel per R rows.
template <int R>
void packed_rows(const float* __restrict a, size_t lda, const Packed& b, float* __restrict c,
                 size_t ldc, bool accumulate) {
  const int K = b.K, N = b.N;
  for (int n0 = 0; n0 < N; n0 += kPanel) {
    const float* __restrict panel = b.data.data() + size_t(n0) * K;
    const int width = std::min(kPanel, N - n0);
    float acc[R][kPanel] = {};
    for (int k = 0; k < K; ++k) {
      const float* __restrict w = panel + size_t(k) * kPanel;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float x = a[r * lda + k];
#pragma omp simd
        for (int j = 0; j < kPanel; ++j) acc[r][j] += x * w[j];
      }
    }
    for (int r = 0; r < R; ++r) {
      float* out = c + r * ldc + n0;
      for (int j = 0; j < width; ++j) out[j] = (accumulate ? out[j] : 0.0f) + acc[r][j];
    }
  }
}

// Any number of rows: blocks of 4, then the rest.
inline void packed_gemm(const float* a, size_t lda, const Packed& b, float* c, size_t ldc, int rows,
                        bool accumulate) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) packed_rows<4>(a + r * lda, lda, b, c + r * ldc, ldc, accumulate);
  for (; r + 2 <= rows; r += 2) packed_rows<2>(a + r * lda, lda, b, c + r * ldc, ldc, accumulate);
  if (r < rows) packed_rows<1>(a + r * lda, lda, b, c + r * ldc, ldc, accumulate);
}

inline void check(const mx::array& a, int ndim, const char* what) {
  if (a.dtype() != mx::float32 || a.ndim() != size_t(ndim))
    throw std::invalid_argument(std::string("dfn4lab kernel: ") + what + " must be float32 with " +
                                std::to_string(ndim) + " dims");
}

inline mx::array prepared(const mx::array& a, const mx::Stream& s) { return mx::contiguous(a, false, s); }

// The cores this process may use.
inline int cores() {
  int n = std::thread::hardware_concurrency();
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
#endif
  return std::max(1, n);
}

// Independent rows (a recurrence's batch rows, blocks of rows, groups) split over the cores: fn(r0, r1)
// on one thread per core, at most one per row; the calling thread takes the first block.
template <class F>
void for_row_blocks(int rows, F&& fn) {
  const int n = std::max(1, std::min(cores(), rows));
  std::vector<std::thread> pool;
  for (int k = 1; k < n; ++k)
    pool.emplace_back([&fn, rows, n, k] { fn(rows * k / n, rows * (k + 1) / n); });
  fn(0, rows / n);
  for (auto& t : pool) t.join();
}

// Rows [0, N) of `width` elements each, split evenly over the cores with at least kMinWork elements
// per thread: small inputs (a streaming hop) run on the calling thread, with no thread started.
constexpr size_t kMinWork = 1 << 15;

template <class F>
void for_rows(size_t N, size_t width, F&& fn) {
  const size_t most = std::min<size_t>(N, std::max<size_t>(1, N * width / kMinWork));
  const int threads = int(std::min<size_t>(cores(), most));
  if (threads <= 1) return fn(size_t(0), N);
  for_row_blocks(threads, [&](int b0, int b1) { fn(N * b0 / threads, N * b1 / threads); });
}

// A primitive whose work is one CPU task: the outputs are allocated here, and `task` returns the
// work as a closure over data pointers and sizes only (it runs on MLX's CPU stream after eval_cpu
// has returned; MLX keeps the buffers alive until then).
class CpuLoop : public mx::Primitive {
 public:
  using Task = std::function<void()>;
  explicit CpuLoop(mx::Stream s) : mx::Primitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    for (auto& a : out) {
      a.set_data(mx::allocator::malloc(a.nbytes()));
      enc.set_output_array(a);
    }
    enc.dispatch(task(in, out));
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only");
  }

 protected:
  virtual Task task(const std::vector<mx::array>& in, std::vector<mx::array>& out) = 0;
};

}  // namespace dfn4lab_kernels
