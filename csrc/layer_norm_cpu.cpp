// LayerNorm and RMSNorm on CPU: forward and backward, with an optional fused residual add.
//
// Forward, per row of N values (h = x + residual rounded to x's dtype, or x):
//   mean = Σh / N,  var = Σ(h - mean)² / N  (biased, as torch),  rstd = 1 / sqrt(var + eps)
//   y    = (h - mean)·rstd·w + b
// RMSNorm drops the centring: rstd = 1 / sqrt(Σh² / N + eps), y = h·rstd·w + b.
// The statistics are float32 and computed in two passes over the row (sum, then squared
// deviations from the mean), which stays accurate when |mean| >> std where the one-pass
// Σh² - (Σh)²/N would cancel. A row of up to a few thousand floats stays in L1/L2 between
// passes, so the extra pass costs no memory traffic. bf16/fp16 rows (and rows with a
// residual) are widened to float once, into a per-thread row buffer.
//
// Backward. With x̂ = (h - mean)·rstd and g = dy·w, y = x̂·w + b, and
//   ∂x̂_j/∂h_i = rstd·(δ_ij - 1/N - x̂_i·x̂_j/N),
// so the vector-Jacobian product is
//   dx = rstd·(g - mean(g) - x̂·mean(g·x̂))
// (RMSNorm: x̂ = h·rstd and ∂x̂_j/∂h_i = rstd·(δ_ij - x̂_i·x̂_j/N), so the mean(g) term is
// absent). The residual branch adds its incoming gradient: dx += dresidual_out.
// Parameter gradients are column sums over rows: dw = Σ dy·x̂, db = Σ dy. To make them
// deterministic (independent of the thread count), rows are cut into blocks whose size
// depends only on M; each block sums its rows into its own float32 buffer, and the
// buffers are added in a fixed order (sum_blocks_into).
//
// Limits: x is (M, N) contiguous, float32/float16/bfloat16, N >= 1.
#include "fastattn_ext.h"

#include "cpu_vec.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <memory>

namespace fastattn_ext {
namespace cpu {
namespace {

// Rows per parallel chunk: enough elements that a chunk outweighs the scheduling cost.
constexpr int64_t kGrainElems = 1 << 15;

template <class T>
struct LnFwdArgs {
  const T* x;            // (M, N)
  const T* residual;     // (M, N) or null
  T* residual_out;       // (M, N), written when residual is given
  const float* weight;   // (N,)
  const float* bias;     // (N,)
  T* y;                  // (M, N)
  float* mean;           // (M,), unused for RMSNorm
  float* rstd;           // (M,)
  int64_t n;
  float eps;
  bool rms;
  bool streaming;        // write y and residual_out with streaming stores
};

template <class Isa, class T>
void layer_norm_fwd_rows(Isa isa, const LnFwdArgs<T>& a, int64_t begin, int64_t end,
                         float* row_buf /* (N,) */) {
  using V = vfloat<Isa>;
  const int64_t n = a.n;
  // h as float: x itself when it already is, else widened (residual added) into row_buf.
  const bool widen = !std::is_same<T, float>::value || a.residual != nullptr;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = a.x + r * n;
    const T* res = a.residual ? a.residual + r * n : nullptr;
    T* res_out = a.residual ? a.residual_out + r * n : nullptr;
    const bool stream_res = a.streaming && res_out && stream_aligned(isa, res_out);
    const float* h = widen ? row_buf : reinterpret_cast<const float*>(x);

    // Pass 1: h, and Σh (RMSNorm: Σh²).
    const V s1 = sum_vectors(isa, n, [&](int64_t i, int len) {
      V v = load_n(isa, x + i, len);
      if (res) {
        // h is rounded to T: the value stored in residual_out, which the backward reads.
        v = round_to<Isa, T>(isa, v + load_n(isa, res + i, len));
        store_n(isa, res_out + i, v, len, stream_res);
      }
      if (widen) store_n(isa, row_buf + i, v, len);
      return a.rms ? v * v : v;
    });
    // Pass 2 (LayerNorm): Σ(h - mean)², from the cached row.
    float mean = 0.f, sum_sq = hsum(s1);
    if (!a.rms) {
      mean = hsum(s1) / static_cast<float>(n);
      sum_sq = hsum(sum_vectors(isa, n, [&](int64_t i, int len) {
        const V d = first_n(load_n(isa, h + i, len) - mean, len);
        return d * d;
      }));
      a.mean[r] = mean;
    }
    const float rstd = 1.f / std::sqrt(sum_sq / static_cast<float>(n) + a.eps);
    a.rstd[r] = rstd;

    // Pass 3: y, while the next row's inputs are fetched.
    T* y = a.y + r * n;
    const bool stream_y = a.streaming && stream_aligned(isa, y);
    const bool next = r + 1 < end;
    for_each_vector(isa, n, [&](int64_t i, int len) {
      if (next) {
        prefetch(x + n + i);
        if (res) prefetch(res + n + i);
      }
      const V xhat = (load_n(isa, h + i, len) - mean) * rstd;
      const V yv = xhat * load_n(isa, a.weight + i, len) + load_n(isa, a.bias + i, len);
      store_n(isa, y + i, yv, len, stream_y);
    });
  }
  if (a.streaming) stream_fence(isa);
}

template <class T>
struct LnBwdArgs {
  const T* dy;             // (M, N)
  const T* h;              // (M, N)
  const float* weight;     // (N,)
  const float* mean;       // (M,), unused for RMSNorm
  const float* rstd;       // (M,)
  const T* dresidual_out;  // (M, N) or null
  T* dx;                   // (M, N)
  int64_t n;
  bool rms;
  bool streaming;          // write dx with streaming stores
};

// Rows [begin, end); adds Σ dy·x̂ to dw_sum and Σ dy to db_sum (each (N,), or null).
template <class Isa, class T>
void layer_norm_bwd_rows(Isa isa, const LnBwdArgs<T>& a, int64_t begin, int64_t end,
                         float* dw_sum, float* db_sum) {
  using V = vfloat<Isa>;
  const int64_t n = a.n;
  for (int64_t r = begin; r < end; ++r) {
    const T* dy = a.dy + r * n;
    const T* h = a.h + r * n;
    const float mean = a.rms ? 0.f : a.mean[r];
    const float rstd = a.rstd[r];
    // Pass 1: Σg and Σg·x̂, and the parameter-gradient column sums. Missing lanes of a
    // partial vector have dy = 0, hence g = 0: no masking needed.
    const Pair<V> s = sum_vectors(isa, n, [&](int64_t i, int len) {
      const V dyv = load_n(isa, dy + i, len);
      const V xhat = (load_n(isa, h + i, len) - mean) * rstd;
      const V g = dyv * load_n(isa, a.weight + i, len);
      if (dw_sum) store_n(isa, dw_sum + i, load_n(isa, dw_sum + i, len) + dyv * xhat, len);
      if (db_sum) store_n(isa, db_sum + i, load_n(isa, db_sum + i, len) + dyv, len);
      return Pair<V>{g, g * xhat};
    });
    const float mean_g = a.rms ? 0.f : hsum(s.a) / static_cast<float>(n);
    const float mean_gx = hsum(s.b) / static_cast<float>(n);

    // Pass 2: dx from the cached row, while the next row's inputs are fetched.
    T* dx = a.dx + r * n;
    const T* dres = a.dresidual_out ? a.dresidual_out + r * n : nullptr;
    const bool stream_dx = a.streaming && stream_aligned(isa, dx);
    const bool next = r + 1 < end;
    for_each_vector(isa, n, [&](int64_t i, int len) {
      if (next) {
        prefetch(dy + n + i);
        prefetch(h + n + i);
      }
      const V xhat = (load_n(isa, h + i, len) - mean) * rstd;
      const V g = load_n(isa, dy + i, len) * load_n(isa, a.weight + i, len);
      V d = (g - mean_g - xhat * mean_gx) * rstd;
      if (dres) d += load_n(isa, dres + i, len);
      store_n(isa, dx + i, d, len, stream_dx);
    });
  }
  if (a.streaming) stream_fence(isa);
}

// A (N,) float32 copy of an optional parameter, or `fill` everywhere when it is absent.
Tensor float_param(const OptTensor& p, int64_t n, float fill, const Tensor& like) {
  if (p) return p->to(at::kFloat).contiguous();
  return fill == 0.f ? at::zeros({n}, like.options().dtype(at::kFloat))
                     : at::ones({n}, like.options().dtype(at::kFloat));
}

}  // namespace

// Column sums of `blocks` float32 rows of length n spaced `stride` apart, written to
// out (n,) in its dtype. Blocks are added in order in groups of 16, then the group sums
// in order: a fixed order (deterministic) whose rounding error grows with
// blocks/16 + 16 rather than with the block count. Shared with gelu_cpu.cpp.
void sum_blocks_into(const float* part, int64_t blocks, int64_t stride, int64_t n, Tensor& out) {
  constexpr int64_t kGroup = 16;
  dispatch_float_types(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* o = out.data_ptr<T>();
    at::parallel_for(0, n, std::max<int64_t>(64, kGrainElems / blocks),
                     [&](int64_t c0, int64_t c1) {
      dispatch_isa([&](auto isa) {
        using V = vfloat<decltype(isa)>;
        for_each_vector(isa, c1 - c0, [&](int64_t i, int len) {
          V total = {};
          for (int64_t g = 0; g < blocks; g += kGroup) {
            V group = {};
            for (int64_t b = g; b < std::min(blocks, g + kGroup); ++b)
              group += load_n(isa, part + b * stride + c0 + i, len);
            total += group;
          }
          store_n(isa, o + c0 + i, total, len);
        });
      });
    });
  });
}

// Rows per block of a deterministic column sum: M/64 rounded up, at most 256, so that
// each block's running sum is short. Depends only on M, never on the thread count.
int64_t rows_per_block(int64_t m) {
  return std::min<int64_t>(256, std::max<int64_t>(1, (m + 63) / 64));
}

}  // namespace cpu
}  // namespace fastattn_ext

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fastattn_ext::layer_norm_fwd_cpu(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms_norm) {
  using namespace fastattn_ext::cpu;
  check_layer_norm_fwd(x, weight, bias, residual, eps);
  const int64_t m = x.size(0), n = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor residual_out = residual ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms_norm ? 0 : m}, f32);
  Tensor rstd = at::empty({m}, f32);
  const Tensor w = float_param(weight, n, 1.f, x);
  const Tensor b = float_param(bias, n, 0.f, x);

  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const LnFwdArgs<T> args{x.data_ptr<T>(),
                            residual ? residual->data_ptr<T>() : nullptr,
                            residual ? residual_out.data_ptr<T>() : nullptr,
                            w.data_ptr<float>(),
                            b.data_ptr<float>(),
                            y.data_ptr<T>(),
                            rms_norm ? nullptr : mean.data_ptr<float>(),
                            rstd.data_ptr<float>(),
                            n,
                            static_cast<float>(eps),
                            rms_norm,
                            y.nbytes() >= kStreamBytes};
    at::parallel_for(0, m, std::max<int64_t>(1, kGrainElems / n), [&](int64_t r0, int64_t r1) {
      std::unique_ptr<float[]> row_buf(new float[n]);
      dispatch_isa([&](auto isa) { layer_norm_fwd_rows(isa, args, r0, r1, row_buf.get()); });
    });
  });
  return {y, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fastattn_ext::layer_norm_bwd_cpu(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
    const Tensor& rstd, const OptTensor& dresidual_out, bool has_bias, bool rms_norm) {
  using namespace fastattn_ext::cpu;
  check_layer_norm_bwd(dy, h, weight, mean, rstd, dresidual_out, rms_norm);
  const int64_t m = h.size(0), n = h.size(1);
  Tensor dx = at::empty_like(h);
  Tensor dweight = weight ? at::empty({n}, weight->options()) : at::empty({0}, h.options());
  Tensor dbias =
      at::empty({has_bias ? n : 0}, h.options().dtype(layer_norm_dbias_dtype(h, weight)));
  const Tensor w = float_param(weight, n, 1.f, h);

  // Per-block partial sums: [block][dweight, dbias][N].
  const bool sums = weight.has_value() || has_bias;
  const int64_t block_rows = rows_per_block(m);
  const int64_t blocks = (m + block_rows - 1) / block_rows;
  Tensor part = at::empty({sums ? blocks : 0, 2, n}, h.options().dtype(at::kFloat));
  float* part_ptr = part.data_ptr<float>();

  dispatch_float_types(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const LnBwdArgs<T> args{dy.data_ptr<T>(),
                            h.data_ptr<T>(),
                            w.data_ptr<float>(),
                            rms_norm ? nullptr : mean.data_ptr<float>(),
                            rstd.data_ptr<float>(),
                            dresidual_out ? dresidual_out->data_ptr<T>() : nullptr,
                            dx.data_ptr<T>(),
                            n,
                            rms_norm,
                            dx.nbytes() >= kStreamBytes};
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        float* dw_sum = weight ? part_ptr + (2 * blk) * n : nullptr;
        float* db_sum = has_bias ? part_ptr + (2 * blk + 1) * n : nullptr;
        if (dw_sum) std::fill_n(dw_sum, n, 0.f);
        if (db_sum) std::fill_n(db_sum, n, 0.f);
        const int64_t r0 = blk * block_rows, r1 = std::min(m, r0 + block_rows);
        dispatch_isa([&](auto isa) { layer_norm_bwd_rows(isa, args, r0, r1, dw_sum, db_sum); });
      }
    });
  });

  if (m == 0) {
    dweight.zero_();
    dbias.zero_();
  } else {
    if (weight) sum_blocks_into(part_ptr, blocks, 2 * n, n, dweight);
    if (has_bias) sum_blocks_into(part_ptr + n, blocks, 2 * n, n, dbias);
  }
  return {dx, dweight, dbias};
}
