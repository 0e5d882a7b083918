// DeepFilterNet3's whole streaming hop as one C++ call: analysis STFT, features, the network for one
// frame, ERB mask and deep filter, synthesis. dfn4lab.stream.StreamingEnhancer runs it for the dfn3
// topology with any backbone (GRU, Mamba, attention) on the CPU in float32; everything else (the DFN4
// extras, the GPU) runs its compiled MLX hop.
//
// Why: the MLX hop is ~300 graph nodes of ~1-10 us of arithmetic each, and on the CPU each node also
// costs ~2 us of dispatch (a task and a thread wake-up on MLX's CPU stream): ~1 ms a hop against
// the official runtime's 0.4 ms. Here the same arithmetic runs as plain loops in one call: 0.2-0.3 ms.
// It is a second implementation of DfNet.step (one topology, one frame), so the tests hold it to the
// MLX hop and to offline enhancement with the same weights, for every backbone.
//
// Layouts: a frame's feature map is (freq, channels) row-major (dfn4lab.layers is channels-last);
// spectra are (freq, 2) interleaved (re, im). Weights arrive folded from dfn4lab.stream.native_net:
// BatchNorm in each conv block's last linear map, as ConvBlock's eval mode.

#include <memory>

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "common.h"
#include "mlx/3rdparty/pocketfft.h"

namespace dfn4lab_kernels {
namespace {

using Vec = std::vector<float>;
using In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;

enum Act { kRelu = 0, kSigmoid = 1, kTanh = 2, kNone = 3 };

Vec vec(nb::handle h) {
  auto a = nb::cast<In>(h);
  return Vec(a.data(), a.data() + a.size());
}

void activate(float* __restrict y, int n, int act) {
  if (act == kRelu)
    for (int i = 0; i < n; ++i) y[i] = y[i] > 0.0f ? y[i] : 0.0f;
  else if (act == kSigmoid)
    for (int i = 0; i < n; ++i) y[i] = sigmoid_r(y[i]);
  else if (act == kTanh)
    for (int i = 0; i < n; ++i) y[i] = tanh_r(y[i]);
}

// A folded ConvBlock for one output frame: causal in time (its kt input frames given oldest first),
// centred in frequency with stride; depthwise or transposed-depthwise taps (kt*kf, cin) then an
// optional pointwise (cin, cout); or dense: (cout, kt, kf, cin) for wide inputs, one GEMV per output
// bin over its gathered receptive field (df_convp: 0.236 -> 0.211 ms a hop against a dot per tap), and
// (kt, kf, cin, cout) for narrow ones (one or two input channels: the inner loop runs over cout).
struct Conv {
  bool dense = false, transposed = false;
  int kt = 1, kf = 1, stride = 1, cin = 0, cout = 0, act = kRelu;
  Vec w, pw, bias;

  explicit Conv(nb::handle spec) {
    auto t = nb::cast<nb::tuple>(spec);
    auto meta = nb::cast<std::vector<int>>(t[0]);
    dense = meta[0], transposed = meta[1], kt = meta[2], kf = meta[3], stride = meta[4];
    cin = meta[5], cout = meta[6], act = meta[7];
    w = vec(t[1]);
    if (!t[2].is_none()) pw = vec(t[2]);
    bias = vec(t[3]);
    const size_t taps = size_t(kt) * kf;
    if (w.size() != (dense ? taps * cin * cout : taps * cin) || (!dense && cin != cout) ||
        (!pw.empty() && pw.size() != size_t(cin) * cout) || bias.size() != size_t(cout) ||
        (transposed && (dense || kt != 1)) || stride < 1)
      throw std::invalid_argument("dfn4lab stream kernel: a conv block's weights do not fit its shape");
    if (dense && !wide()) {  // (cout, kt, kf, cin) -> (kt, kf, cin, cout)
      Vec v(w.size());
      const int taps = kt * kf;
      for (int o = 0; o < cout; ++o)
        for (int k = 0; k < taps; ++k)
          for (int c = 0; c < cin; ++c) v[(size_t(k) * cin + c) * cout + o] = w[(size_t(o) * taps + k) * cin + c];
      w = std::move(v);
    }
  }

  bool wide() const { return cin >= 8; }

  int out_freq(int f) const {
    const int p = kf / 2;
    return transposed ? (f - 1) * stride - 2 * p + kf + (stride > 1 ? p : 0) : (f + 2 * p - kf) / stride + 1;
  }

  // Input index of output bin fo under tap j, or -1 outside (zero padding / zero insertion).
  int source(int fo, int j, int f) const {
    const int p = kf / 2;
    int i = fo * stride + j - p;
    if (transposed) {
      const int u = fo + p - j;  // the zero-inserted input's index
      i = (u < 0 || u % stride) ? -1 : u / stride;
    }
    return i >= 0 && i < f ? i : -1;
  }

  // x: kt frames (f, cin) oldest first -> y (out_freq(f), cout); tmp holds (out_freq(f), cin).
  int operator()(const float* const* x, int f, float* y, float* tmp) const {
    const int fo_n = out_freq(f);
    if (dense && wide()) {  // per output bin: its receptive field gathered, one GEMV
      const int n = kt * kf * cin;
      for (int fo = 0; fo < fo_n; ++fo) {
        for (int i = 0; i < kt; ++i)
          for (int j = 0; j < kf; ++j) {
            const int s = source(fo, j, f);
            float* g = tmp + size_t(i * kf + j) * cin;
            if (s < 0)
              std::fill(g, g + cin, 0.0f);
            else
              std::copy(x[i] + size_t(s) * cin, x[i] + size_t(s + 1) * cin, g);
          }
        gemv(w.data(), tmp, bias.data(), y + size_t(fo) * cout, cout, n);
      }
    } else if (dense) {
      for (int fo = 0; fo < fo_n; ++fo) {
        float* yr = y + size_t(fo) * cout;
        std::copy(bias.begin(), bias.end(), yr);
        for (int i = 0; i < kt; ++i)
          for (int j = 0; j < kf; ++j) {
            const int s = source(fo, j, f);
            if (s < 0) continue;
            const float* xr = x[i] + size_t(s) * cin;
            for (int c = 0; c < cin; ++c) axpy(xr[c], w.data() + (size_t(i * kf + j) * cin + c) * cout, yr, cout);
          }
      }
    } else {
      float* z = pw.empty() ? y : tmp;
      std::fill(z, z + size_t(fo_n) * cin, 0.0f);
      for (int fo = 0; fo < fo_n; ++fo)
        for (int i = 0; i < kt; ++i)
          for (int j = 0; j < kf; ++j) {
            const int s = source(fo, j, f);
            if (s < 0) continue;
            const float* t = w.data() + size_t(i * kf + j) * cin;
            const float* xr = x[i] + size_t(s) * cin;
            float* zr = z + size_t(fo) * cin;
            for (int c = 0; c < cin; ++c) zr[c] += t[c] * xr[c];
          }
      for (int fo = 0; fo < fo_n; ++fo) {
        float* yr = y + size_t(fo) * cout;
        if (pw.empty()) {
          for (int c = 0; c < cout; ++c) yr[c] += bias[c];
        } else {
          std::copy(bias.begin(), bias.end(), yr);
          for (int c = 0; c < cin; ++c) axpy(z[size_t(fo) * cin + c], pw.data() + size_t(c) * cout, yr, cout);
        }
      }
    }
    activate(y, fo_n * cout, act);
    return fo_n;
  }
};

// GroupedLinear: x (groups, in/g) times w (groups, in/g, out/g) per group.
struct Grouped {
  int groups = 1, in = 0, out = 0;
  Vec w;
  Grouped() = default;
  explicit Grouped(nb::handle spec) {
    auto t = nb::cast<nb::tuple>(spec);
    auto a = nb::cast<In>(t[0]);
    groups = int(a.shape(0)), in = groups * int(a.shape(1)), out = groups * int(a.shape(2));
    w = vec(t[0]);
  }
  void operator()(const float* x, float* y, int act) const {
    const int gi = in / groups, go = out / groups;
    std::fill(y, y + out, 0.0f);
    for (int g = 0; g < groups; ++g)
      for (int i = 0; i < gi; ++i)
        axpy(x[g * gi + i], w.data() + (size_t(g) * gi + i) * go, y + size_t(g) * go, go);
    activate(y, out, act);
  }
};

// The temporal core of a SqueezedBackbone for one frame: x (hidden,) in place. Its per-stream state
// is a few buffers per layer (CoreState); t is the frame's index (attention's RoPE position).
using CoreState = std::vector<Vec>;

struct Core {
  virtual ~Core() = default;
  virtual CoreState init() const = 0;
  virtual void step(float* x, CoreState& s, long t, Vec& work) const = 0;
};

inline float silu(float x) { return x * sigmoid_r(x); }

// log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(-|x|); log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3,
// as its odd series to s^11 (abs error < 1e-7). Vectorizes, unlike log1p(exp(x)) (Mamba's step sizes:
// 3.9 -> 0.12 us per 512 values here).
inline float softplus(float x) {
  const float e = exp2_neg(-std::fabs(x) * kLog2e), s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 11;
  for (float k : {9.0f, 7.0f, 5.0f, 3.0f, 1.0f}) p = p * s2 + 1.0f / k;
  return std::max(x, 0.0f) + 2.0f * s * p;
}

// x * rsqrt(mean(x^2) + eps) * w, as mx.fast.rms_norm; y may be x.
void rms_norm(const float* x, const float* w, float* y, int n) {
  const float r = 1.0f / std::sqrt(dot(x, x, n) / float(n) + 1e-5f);
  for (int i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

Vec& sized(Vec& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v;
}

// torch.nn.GRU layers; gate order r, z, n. State: h per layer.
struct GruCore : Core {
  struct Layer {
    int in = 0, hidden = 0;
    Vec w_ih, b_ih, w_hh, b_hh;
  };
  std::vector<Layer> layers;

  explicit GruCore(nb::list spec) {
    for (auto item : spec) {
      auto t = nb::cast<nb::tuple>(item);
      auto a = nb::cast<In>(t[0]);
      layers.push_back({int(a.shape(1)), int(a.shape(0)) / 3, vec(t[0]), vec(t[1]), vec(t[2]), vec(t[3])});
    }
  }
  CoreState init() const override {
    CoreState s;
    for (auto& l : layers) s.emplace_back(l.hidden, 0.0f);
    return s;
  }
  void step(float* x, CoreState& s, long, Vec& work) const override {
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& l = layers[i];
      const int H = l.hidden;
      float *xi = sized(work, 6 * size_t(H)).data(), *gh = xi + 3 * H, *h = s[i].data();
      gemv(l.w_ih.data(), x, l.b_ih.data(), xi, 3 * H, l.in);
      gemv(l.w_hh.data(), h, l.b_hh.data(), gh, 3 * H, H);
      for (int j = 0; j < H; ++j) {
        const float r = sigmoid_r(xi[j] + gh[j]), z = sigmoid_r(xi[H + j] + gh[H + j]);
        const float n = tanh_r(xi[2 * H + j] + r * gh[2 * H + j]);
        h[j] = n + z * (h[j] - n);
      }
      std::copy(h, h + H, x);
    }
  }
};

// dfn4lab.backbones.MambaBlock's _mamba_step per layer, then the core's RMSNorm.
// State per layer: the last d_conv - 1 conv inputs (oldest first) and h (d_inner, d_state).
struct MambaCore : Core {
  struct Layer {
    int d, di, ds, dc, dr;
    Vec norm, w_in, conv_w, conv_b, w_x, w_dt, b_dt, a2, D, w_out;
  };
  std::vector<Layer> layers;
  Vec norm;

  MambaCore(nb::list spec, nb::handle final_norm) : norm(vec(final_norm)) {
    for (auto item : spec) {
      auto t = nb::cast<nb::tuple>(item);
      auto w_in = nb::cast<In>(t[1]), conv = nb::cast<In>(t[2]), w_dt = nb::cast<In>(t[5]);
      auto a2 = nb::cast<In>(t[7]);
      layers.push_back({int(w_in.shape(1)), int(conv.shape(0)), int(a2.shape(1)), int(conv.shape(1)),
                        int(w_dt.shape(1)), vec(t[0]), vec(t[1]), vec(t[2]), vec(t[3]), vec(t[4]),
                        vec(t[5]), vec(t[6]), vec(t[7]), vec(t[8]), vec(t[9])});
    }
  }
  CoreState init() const override {
    CoreState s;
    for (auto& l : layers) {
      s.emplace_back(size_t(l.dc - 1) * l.di, 0.0f);
      s.emplace_back(size_t(l.di) * l.ds, 0.0f);
    }
    return s;
  }
  void step(float* x, CoreState& s, long, Vec& work) const override {
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& l = layers[i];
      const int di = l.di, ds = l.ds, dc = l.dc, np = l.dr + 2 * ds;
      float* xn = sized(work, size_t(l.d) + 5 * size_t(di) + np).data();
      float *xz = xn + l.d, *u = xz + 2 * di, *p = u + di, *delta = p + np, *y = delta + di;
      float *conv = s[2 * i].data(), *h = s[2 * i + 1].data();
      rms_norm(x, l.norm.data(), xn, l.d);
      gemv(l.w_in.data(), xn, nullptr, xz, 2 * di, l.d);
      for (int c = 0; c < di; ++c) {  // causal depthwise conv, the last tap on this frame
        float acc = l.conv_b[c] + xz[c] * l.conv_w[size_t(c) * dc + dc - 1];
        for (int j = 0; j < dc - 1; ++j) acc += conv[size_t(j) * di + c] * l.conv_w[size_t(c) * dc + j];
        u[c] = silu(acc);
      }
      if (dc > 1) {  // shift the conv inputs by one frame
        std::copy(conv + di, conv + size_t(dc - 1) * di, conv);
        std::copy(xz, xz + di, conv + size_t(dc - 2) * di);
      }
      gemv(l.w_x.data(), u, nullptr, p, np, di);
      gemv(l.w_dt.data(), p, l.b_dt.data(), delta, di, l.dr);
      for (int c = 0; c < di; ++c) delta[c] = softplus(delta[c]);
      const float *bm = p + l.dr, *cm = bm + ds;
      for (int c = 0; c < di; ++c) {
        const float dl = delta[c], du = dl * u[c];
        float* hc = h + size_t(c) * ds;
        const float* a2 = l.a2.data() + size_t(c) * ds;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int n = 0; n < ds; ++n) {  // dl * a2 <= 0: a decay
          hc[n] = exp2_neg(dl * a2[n]) * hc[n] + du * bm[n];
          acc += hc[n] * cm[n];
        }
        y[c] = (acc + l.D[c] * u[c]) * silu(xz[di + c]);
      }
      gemv(l.w_out.data(), y, x, x, l.d, di);  // residual
    }
    rms_norm(x, norm.data(), x, int(norm.size()));
  }
};

// dfn4lab.backbones.AttentionBlock per layer (pre-norm causal attention with RoPE, GELU FFN), then
// the core's RMSNorm. State per layer: the rotated keys and values of past frames, (frames, d) rows;
// with a window, a ring of `window` rows (the softmax does not care about the keys' order).
struct AttentionCore : Core {
  struct Layer {
    Vec norm1, w_qkv, w_out, norm2, w_in, b_in, w_ffn, b_ffn;
  };
  std::vector<Layer> layers;
  Vec norm;
  int d, heads, window, ffn;

  AttentionCore(nb::list spec, nb::handle final_norm, int heads, int window)
      : norm(vec(final_norm)), d(int(norm.size())), heads(heads), window(window) {
    for (auto item : spec) {
      auto t = nb::cast<nb::tuple>(item);
      layers.push_back({vec(t[0]), vec(t[1]), vec(t[2]), vec(t[3]), vec(t[4]), vec(t[5]), vec(t[6]), vec(t[7])});
    }
    ffn = layers.empty() ? 0 : int(layers[0].b_in.size());
    if (d % heads || (d / heads) % 2)
      throw std::invalid_argument("dfn4lab stream kernel: attention needs an even head size");
  }
  CoreState init() const override { return CoreState(2 * layers.size()); }

  // MLX's non-traditional RoPE (mx.fast.rope, base 10000): pairs (i, i + hd/2) rotated by t * base^(-2i/hd).
  void rope(float* v, long t) const {
    const int hd = d / heads, half = hd / 2;
    for (int i = 0; i < half; ++i) {
      const float theta = float(t) * std::exp(-float(i) * std::log(10000.0f) / float(half));
      const float c = std::cos(theta), s = std::sin(theta);
      for (int h = 0; h < heads; ++h) {
        float *a = v + h * hd + i, *b = a + half;
        const float x1 = *a, x2 = *b;
        *a = x1 * c - x2 * s, *b = x1 * s + x2 * c;
      }
    }
  }

  void step(float* x, CoreState& s, long t, Vec& work) const override {
    const int hd = d / heads;
    const size_t keys = window ? size_t(std::min<long>(t + 1, window)) : size_t(t + 1);
    const float scale = 1.0f / std::sqrt(float(hd));
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& l = layers[i];
      float* xn = sized(work, 6 * size_t(d) + ffn + keys).data();
      float *qkv = xn + d, *att = qkv + 3 * d, *f = att + d, *p = f + ffn;
      rms_norm(x, l.norm1.data(), xn, d);
      gemv(l.w_qkv.data(), xn, nullptr, qkv, 3 * d, d);
      rope(qkv, t), rope(qkv + d, t);
      Vec &K = s[2 * i], &V = s[2 * i + 1];
      const size_t slot = window ? size_t(t % window) : size_t(t), rows = window ? size_t(window) : slot + 1;
      sized(K, rows * d), sized(V, rows * d);
      std::copy(qkv + d, qkv + 2 * d, K.begin() + slot * d);
      std::copy(qkv + 2 * d, qkv + 3 * d, V.begin() + slot * d);
      for (int h = 0; h < heads; ++h) {
        const float* q = qkv + h * hd;
        float m = -INFINITY, sum = 0.0f;
        for (size_t j = 0; j < keys; ++j) m = std::max(m, p[j] = dot(q, K.data() + j * d + h * hd, hd) * scale);
        for (size_t j = 0; j < keys; ++j) sum += p[j] = std::exp(p[j] - m);
        float* a = att + h * hd;
        std::fill(a, a + hd, 0.0f);
        for (size_t j = 0; j < keys; ++j) axpy(p[j] / sum, V.data() + j * d + h * hd, a, hd);
      }
      gemv(l.w_out.data(), att, x, x, d, d);  // residual
      rms_norm(x, l.norm2.data(), xn, d);
      gemv(l.w_in.data(), xn, l.b_in.data(), f, ffn, d);
      for (int k = 0; k < ffn; ++k) f[k] = 0.5f * f[k] * (1.0f + std::erf(f[k] * 0.70710678118654752f));
      for (int k = 0; k < d; ++k) xn[k] = x[k] + l.b_ffn[k];
      gemv(l.w_ffn.data(), f, xn, x, d, ffn);  // residual
    }
    rms_norm(x, norm.data(), x, d);
  }
};

// SqueezedBackbone: relu(linear_in) -> core -> relu(linear_out) if present. The core's spec from
// dfn4lab.stream.native_net: ("gru", layers) | ("mamba", layers, norm) | ("attention", layers, norm,
// heads, window or 0).
struct Squeezed {
  Grouped linear_in, linear_out;
  std::unique_ptr<Core> core;
  bool has_out = false;
  explicit Squeezed(nb::handle spec) {
    auto t = nb::cast<nb::tuple>(spec);
    linear_in = Grouped(t[0]);
    auto c = nb::cast<nb::tuple>(t[1]);
    auto kind = nb::cast<std::string>(c[0]);
    auto layers = nb::cast<nb::list>(c[1]);
    if (kind == "gru")
      core = std::make_unique<GruCore>(layers);
    else if (kind == "mamba")
      core = std::make_unique<MambaCore>(layers, c[2]);
    else
      core = std::make_unique<AttentionCore>(layers, c[2], nb::cast<int>(c[3]), nb::cast<int>(c[4]));
    has_out = !t[2].is_none();
    if (has_out) linear_out = Grouped(t[2]);
  }
  int hidden() const { return linear_in.out; }
  int out() const { return has_out ? linear_out.out : hidden(); }
  // x -> y (may be the same buffer); a: hidden() floats of scratch.
  void operator()(const float* x, float* y, CoreState& s, long t, float* a, Vec& work) const {
    linear_in(x, a, kRelu);
    core->step(a, s, t, work);
    if (has_out)
      linear_out(a, y, kRelu);
    else
      std::copy(a, a + hidden(), y);
  }
};

struct Weights {
  int fft, hop, freq, nb_erb, nb_df, la, order, df_history;
  float alpha, wnorm, lim;  // lim < 0: no attenuation limit
  std::vector<int> band;    // ERB band of each frequency bin
  Vec band_scale, window, erb_init, df_init;
  Conv erb_conv0, erb_conv1, erb_conv2, erb_conv3, df_conv0, df_conv1;
  Conv conv3p, convt3, conv2p, convt2, conv1p, convt1, conv0p, conv0_out, df_convp;
  Grouped df_fc_emb, df_skip, df_out;
  Squeezed enc_gru, erb_gru, df_gru;

  Weights(nb::dict cfg, nb::dict net)
      : erb_conv0(net["enc.erb_conv0"]), erb_conv1(net["enc.erb_conv1"]),
        erb_conv2(net["enc.erb_conv2"]), erb_conv3(net["enc.erb_conv3"]),
        df_conv0(net["enc.df_conv0"]), df_conv1(net["enc.df_conv1"]),
        conv3p(net["erb_dec.conv3p"]), convt3(net["erb_dec.convt3"]), conv2p(net["erb_dec.conv2p"]),
        convt2(net["erb_dec.convt2"]), conv1p(net["erb_dec.conv1p"]), convt1(net["erb_dec.convt1"]),
        conv0p(net["erb_dec.conv0p"]), conv0_out(net["erb_dec.conv0_out"]),
        df_convp(net["df_dec.df_convp"]), df_fc_emb(net["enc.df_fc_emb"]),
        df_skip(net["df_dec.df_skip"]), df_out(net["df_dec.df_out"]), enc_gru(net["enc.emb_gru"]),
        erb_gru(net["erb_dec.emb_gru"]), df_gru(net["df_dec.df_gru"]) {
    auto i = [&](const char* k) { return nb::cast<int>(cfg[k]); };
    auto f = [&](const char* k) { return nb::cast<float>(cfg[k]); };
    fft = i("fft_size"), hop = i("hop_size"), freq = fft / 2 + 1, la = i("conv_lookahead");
    nb_df = i("nb_df"), order = i("df_order"), df_history = order - 1 - i("df_lookahead");
    alpha = f("alpha"), wnorm = f("wnorm"), lim = f("lim");
    window = vec(cfg["window"]), erb_init = vec(cfg["erb_init"]), df_init = vec(cfg["df_init"]);
    auto widths = nb::cast<std::vector<int>>(cfg["erb_widths"]);
    nb_erb = int(widths.size());
    for (int b = 0; b < nb_erb; ++b) {
      band.insert(band.end(), widths[b], b);
      band_scale.push_back(1.0f / float(widths[b]));
    }
    if (int(band.size()) != freq || fft % 2 || hop > fft || window.size() != size_t(fft))
      throw std::invalid_argument("dfn4lab stream kernel: inconsistent DSP config");
    if (df_history < 0 || la < i("df_lookahead") || order < 1)
      throw std::invalid_argument("dfn4lab stream kernel: needs df_lookahead <= min(conv_lookahead, df_order - 1)");
    for (const Conv* c : {&erb_conv1, &erb_conv2, &erb_conv3, &df_conv1, &conv3p, &convt3, &conv2p,
                          &convt2, &conv1p, &convt1, &conv0p, &conv0_out})
      if (c->kt != 1) throw std::invalid_argument("dfn4lab stream kernel: only the input convs look back in time");
  }
};

// One stream's state. Frame histories are rings indexed by the frame counter t, zero at the start
// as the MLX hop's.
struct State {
  Vec ana, syn, erb_norm, df_norm;
  std::vector<Vec> erb_in, df_in, c0, spec;  // rings: conv inputs (kt), c0 (df_convp's kt), spectra
  CoreState enc_core, erb_core, df_core;     // the three backbones' states
  long t = 0;
};

std::vector<Vec> ring(int n, size_t size) {
  return std::vector<Vec>(n, Vec(size, 0.0f));
}

class Dfn3Stream {
 public:
  Dfn3Stream(nb::dict cfg, nb::dict net, int channels)
      : w_(std::make_shared<const Weights>(cfg, net)), plan_(w_->fft), states_(channels) {
    const auto& w = *w_;
    const int ch = w.erb_conv1.cin;
    // Every scratch buffer holds the largest of: a feature map, the DF coefficients, a gathered
    // receptive field (df_convp's), a spectrum.
    const auto& p = w.df_convp;
    const size_t big = std::max({size_t(std::max(w.nb_df, w.nb_erb)) * std::max({ch, p.cout, w.df_conv0.cout}),
                                 size_t(w.df_out.out), size_t(p.kt) * p.kf * p.cin, size_t(w.freq) * 2});
    for (auto* b : {&e0_, &e1_, &e2_, &e3_, &c1_, &a_, &d_, &tmp_, &coefs_, &p_}) b->assign(big, 0.0f);
    int hmax = 0;
    for (const Squeezed* s : {&w.enc_gru, &w.erb_gru, &w.df_gru})
      hmax = std::max({hmax, s->hidden(), s->out(), s->linear_in.in});
    hid_.assign(hmax, 0.0f);
    emb_.assign(hmax, 0.0f), cerb_.assign(hmax, 0.0f), cdf_.assign(hmax, 0.0f), skip_.assign(hmax, 0.0f);
    feat_erb_.assign(w.nb_erb, 0.0f), feat_df_.assign(2 * size_t(w.nb_df), 0.0f);
    spec_.assign(2 * size_t(w.freq), 0.0f), out_.assign(2 * size_t(w.freq), 0.0f);
    buf_.assign(w.fft, 0.0f);
    reset();
  }

  int channels() const { return int(states_.size()); }
  int lookahead() const { return w_->la; }

  void reset() {
    const auto& w = *w_;
    for (auto& s : states_) {
      s.ana.assign(w.fft - w.hop, 0.0f), s.syn.assign(w.fft - w.hop, 0.0f);
      s.erb_norm = w.erb_init, s.df_norm = w.df_init;
      s.erb_in = ring(w.erb_conv0.kt, w.nb_erb);
      s.df_in = ring(w.df_conv0.kt, 2 * size_t(w.nb_df));
      s.c0 = ring(w.df_convp.kt, size_t(w.nb_df) * w.df_conv0.cout);
      s.spec = ring(w.df_history + w.la + 1, 2 * size_t(w.freq));
      s.enc_core = w.enc_gru.core->init(), s.erb_core = w.erb_gru.core->init();
      s.df_core = w.df_gru.core->init();
      s.t = 0;
    }
  }

  // One hop per channel: x (channels, hop) -> out (channels, hop). False while the look-ahead fills
  // (the first `la` hops): out is then untouched and the synthesis not advanced, as the MLX hop.
  bool process(In x, nb::ndarray<float, nb::c_contig, nb::device::cpu> out) {
    const auto& w = *w_;
    if (x.ndim() != 2 || out.ndim() != 2 || int(x.shape(0)) != channels() ||
        int(out.shape(0)) != channels() || int(x.shape(1)) != w.hop || int(out.shape(1)) != w.hop)
      throw std::invalid_argument("dfn4lab stream kernel: expected (channels, hop) float32 in and out");
    nb::gil_scoped_release release;
    bool valid = false;
    for (int c = 0; c < channels(); ++c) {
      analysis(states_[c], x.data() + size_t(c) * w.hop);
      valid = frame(states_[c], false, out.data() + size_t(c) * w.hop);
    }
    return valid;
  }

  // The stream's last `la` frames (zero input past its end, as DfNet.flush): out (channels, la*hop).
  // Returns how many hops are valid (fewer when the stream had fewer than `la` frames).
  int flush(nb::ndarray<float, nb::c_contig, nb::device::cpu> out) {
    const auto& w = *w_;
    if (out.ndim() != 2 || int(out.shape(0)) != channels() || int(out.shape(1)) != w.la * w.hop)
      throw std::invalid_argument("dfn4lab stream kernel: expected a (channels, la*hop) float32 out");
    nb::gil_scoped_release release;
    int n = 0;
    for (int c = 0; c < channels(); ++c) {
      n = 0;
      for (int k = 0; k < w.la; ++k)
        if (frame(states_[c], true, out.data() + size_t(c) * w.la * w.hop + size_t(n) * w.hop)) ++n;
    }
    return n;
  }

 private:
  float* slot(std::vector<Vec>& r, long t) { return r[size_t(t % long(r.size()))].data(); }

  // Frames t-k+1 .. t of a ring, oldest first.
  std::vector<const float*> last(std::vector<Vec>& r, long t, int k) {
    std::vector<const float*> p(k);
    for (int i = 0; i < k; ++i) p[i] = slot(r, t - k + 1 + i + long(r.size()) * 2);
    return p;
  }

  // Windowed frame -> spectrum (scaled by wnorm) in spec_, then both features.
  void analysis(State& s, const float* x) {
    const auto& w = *w_;
    const int mem = w.fft - w.hop;
    std::copy(s.ana.begin(), s.ana.end(), buf_.begin());
    std::copy(x, x + w.hop, buf_.begin() + mem);
    std::copy(buf_.begin() + w.hop, buf_.end(), s.ana.begin());
    for (int n = 0; n < w.fft; ++n) buf_[n] *= w.window[n];
    plan_.exec(buf_.data(), 1.0f, true);  // halfcomplex: r0, r1, i1, ..., r_{n/2}
    spec_[0] = buf_[0] * w.wnorm, spec_[1] = 0.0f;
    for (int k = 1; k < w.freq - 1; ++k)
      spec_[2 * k] = buf_[2 * k - 1] * w.wnorm, spec_[2 * k + 1] = buf_[2 * k] * w.wnorm;
    spec_[2 * (w.freq - 1)] = buf_[w.fft - 1] * w.wnorm, spec_[2 * w.freq - 1] = 0.0f;

    const float a = w.alpha, one_a = 1.0f - w.alpha;
    std::fill(feat_erb_.begin(), feat_erb_.end(), 0.0f);
    for (int f = 0; f < w.freq; ++f) {
      const float re = spec_[2 * f], im = spec_[2 * f + 1];
      feat_erb_[w.band[f]] += (re * re + im * im) * w.band_scale[w.band[f]];
    }
    for (int b = 0; b < w.nb_erb; ++b) {
      const float db = 10.0f * std::log10(feat_erb_[b] + 1e-10f);
      s.erb_norm[b] = db * one_a + a * s.erb_norm[b];
      feat_erb_[b] = (db - s.erb_norm[b]) / 40.0f;
    }
    for (int f = 0; f < w.nb_df; ++f) {
      const float re = spec_[2 * f], im = spec_[2 * f + 1];
      s.df_norm[f] = std::hypot(re, im) * one_a + a * s.df_norm[f];
      const float r = 1.0f / std::sqrt(s.df_norm[f]);
      feat_df_[2 * f] = re * r, feat_df_[2 * f + 1] = im * r;
    }
  }

  // The network on the analysed frame (or on zeros: flush), then mask, deep filter and synthesis.
  bool frame(State& s, bool zeros, float* out) {
    const auto& w = *w_;
    const long t = s.t++;
    float* sp = slot(s.spec, t);
    float* fe = slot(s.erb_in, t);
    float* fd = slot(s.df_in, t);
    if (zeros) {
      std::fill(sp, sp + 2 * w.freq, 0.0f);
      std::fill(fe, fe + w.nb_erb, 0.0f), std::fill(fd, fd + 2 * w.nb_df, 0.0f);
    } else {
      std::copy(spec_.begin(), spec_.end(), sp);
      std::copy(feat_erb_.begin(), feat_erb_.end(), fe);
      std::copy(feat_df_.begin(), feat_df_.end(), fd);
    }
    // Encoder
    const float* p;
    w.erb_conv0(last(s.erb_in, t, w.erb_conv0.kt).data(), w.nb_erb, e0_.data(), tmp_.data());
    p = e0_.data();
    const int f1 = w.erb_conv1(&p, w.nb_erb, e1_.data(), tmp_.data());
    p = e1_.data();
    const int f2 = w.erb_conv2(&p, f1, e2_.data(), tmp_.data());
    p = e2_.data();
    const int f3 = w.erb_conv3(&p, f2, e3_.data(), tmp_.data());
    float* c0 = slot(s.c0, t);
    w.df_conv0(last(s.df_in, t, w.df_conv0.kt).data(), w.nb_df, c0, tmp_.data());
    p = c0;
    w.df_conv1(&p, w.nb_df, c1_.data(), tmp_.data());
    w.df_fc_emb(c1_.data(), emb_.data(), kRelu);
    const int E = w.df_fc_emb.out;
    for (int i = 0; i < E; ++i) emb_[i] += e3_[i];
    w.enc_gru(emb_.data(), emb_.data(), s.enc_core, t, hid_.data(), work_);
    // ERB decoder
    w.erb_gru(emb_.data(), cerb_.data(), s.erb_core, t, hid_.data(), work_);
    const int ch = w.conv3p.cout;
    auto skip_add = [&](const Conv& c, const float* x, int f, const float* y) {  // a_ = c(x) + y
      p = x;
      c(&p, f, a_.data(), tmp_.data());
      for (int i = 0; i < f * ch; ++i) a_[i] += y[i];
    };
    skip_add(w.conv3p, e3_.data(), f3, cerb_.data());
    p = a_.data();
    int f = w.convt3(&p, f3, d_.data(), tmp_.data());
    skip_add(w.conv2p, e2_.data(), f2, d_.data());
    p = a_.data();
    f = w.convt2(&p, f, d_.data(), tmp_.data());
    skip_add(w.conv1p, e1_.data(), f1, d_.data());
    p = a_.data();
    f = w.convt1(&p, f, d_.data(), tmp_.data());
    skip_add(w.conv0p, e0_.data(), w.nb_erb, d_.data());
    p = a_.data();
    w.conv0_out(&p, w.nb_erb, d_.data(), tmp_.data());  // the ERB mask (nb_erb,)
    // DF decoder
    w.df_gru(emb_.data(), cdf_.data(), s.df_core, t, hid_.data(), work_);
    w.df_skip(emb_.data(), skip_.data(), kNone);
    for (int i = 0; i < w.df_skip.out; ++i) cdf_[i] += skip_[i];
    w.df_out(cdf_.data(), coefs_.data(), kTanh);
    w.df_convp(last(s.c0, t, w.df_convp.kt).data(), w.nb_df, p_.data(), tmp_.data());
    for (int i = 0; i < w.df_out.out; ++i) coefs_[i] += p_[i];
    if (t < w.la) return false;

    // Output frame t - la: ERB mask above nb_df, deep filter over the order frames below.
    const auto frames = last(s.spec, t, w.df_history + w.la + 1);
    const float* noisy = frames[w.df_history];
    for (int k = w.nb_df; k < w.freq; ++k) {
      const float g = d_[w.band[k]];
      out_[2 * k] = noisy[2 * k] * g, out_[2 * k + 1] = noisy[2 * k + 1] * g;
    }
    for (int k = 0; k < w.nb_df; ++k) {
      float re = 0.0f, im = 0.0f;
      const float* c = coefs_.data() + size_t(k) * 2 * w.order;
      for (int n = 0; n < w.order; ++n) {
        const float sr = frames[n][2 * k], si = frames[n][2 * k + 1], cr = c[2 * n], ci = c[2 * n + 1];
        re += sr * cr - si * ci, im += sr * ci + si * cr;
      }
      out_[2 * k] = re, out_[2 * k + 1] = im;
    }
    if (w.lim >= 0.0f)
      for (int k = 0; k < 2 * w.freq; ++k) out_[k] = noisy[k] * w.lim + out_[k] * (1.0f - w.lim);
    synthesis(s, out);
    return true;
  }

  // Unnormalised inverse FFT (libDF's), the window, overlap-add.
  void synthesis(State& s, float* y) {
    const auto& w = *w_;
    buf_[0] = out_[0];
    for (int k = 1; k < w.freq - 1; ++k) buf_[2 * k - 1] = out_[2 * k], buf_[2 * k] = out_[2 * k + 1];
    buf_[w.fft - 1] = out_[2 * (w.freq - 1)];
    plan_.exec(buf_.data(), 1.0f, false);
    const int mem = w.fft - w.hop;
    for (int n = 0; n < w.fft; ++n) buf_[n] *= w.window[n];
    for (int n = 0; n < w.hop; ++n) y[n] = buf_[n] + (n < mem ? s.syn[n] : 0.0f);
    for (int n = 0; n < mem; ++n) s.syn[n] = (n + w.hop < mem ? s.syn[n + w.hop] : 0.0f) + buf_[w.hop + n];
  }

  std::shared_ptr<const Weights> w_;
  pocketfft::detail::pocketfft_r<float> plan_;
  std::vector<State> states_;
  Vec e0_, e1_, e2_, e3_, c1_, a_, d_, tmp_, coefs_, p_, hid_, work_, emb_, cerb_, cdf_, skip_;
  Vec feat_erb_, feat_df_, spec_, out_, buf_;
};

}  // namespace

void register_stream(nb::module_& m) {
  nb::class_<Dfn3Stream>(m, "Dfn3Stream",
                         "DeepFilterNet3's streaming hop for `channels` streams (dfn4lab.stream.native_net).")
      .def(nb::init<nb::dict, nb::dict, int>(), nb::arg("cfg"), nb::arg("net"), nb::arg("channels"))
      .def("reset", &Dfn3Stream::reset)
      // out is written in place: no conversion to a temporary copy (float64, strided) allowed
      .def("process", &Dfn3Stream::process, nb::arg("x"), nb::arg("out").noconvert())
      .def("flush", &Dfn3Stream::flush, nb::arg("out").noconvert())
      .def_prop_ro("channels", &Dfn3Stream::channels)
      .def_prop_ro("lookahead", &Dfn3Stream::lookahead);
}

}  // namespace dfn4lab_kernels
