// Fused bias + GELU on CPU: y = gelu(x + bias), and its backward.
//
// Exact GELU ("none"): gelu(u) = u·Φ(u), with Φ the standard normal CDF, and
//   gelu'(u) = Φ(u) + u·φ(u),   φ(u) = exp(-u²/2) / √(2π).
// Φ comes from the upper tail Q(a) = 1 - Φ(a) = erfc(a/√2)/2 for a = |u|, evaluated with
// Abramowitz & Stegun 7.1.26 (erfc(s) ≈ t·(a1 + t·(a2 + … + t·a5))·exp(-s²),
// t = 1/(1 + p·s), |error| <= 1.5e-7): Φ(u) = Q(|u|) for u < 0, 1 - Q(|u|) otherwise.
// Taking the tail directly keeps the relative error small for negative u (< 5e-4 down to
// u = -4), where 1 - Φ would cancel; and exp(-s²) = exp(-u²/2) is the same exponential φ
// needs, so the backward costs one exp too. For bf16 outputs exp and 1/x are computed
// to ~1e-5 instead of ~1e-7 (cpu_vec.h), which bf16's 8 bits do not see: 30% faster.
//
// Tanh GELU ("tanh"): gelu(u) = u/2·(1 + tanh z), z = √(2/π)·(u + 0.044715·u³).
// Since (1 + tanh z)/2 = σ(2z) (the logistic function), gelu(u) = u·s with
// s = 1/(1 + exp(-2z)): one exp and one reciprocal, no tanh. With 1 - tanh²z = 4s(1 - s),
//   gelu'(u) = s + 2u·s(1 - s)·√(2/π)·(1 + 3·0.044715·u²),
// where s(1 - s) = e·s² with e = exp(-2z), free of the cancellation in 1 - s.
//
// Backward: dx = dy·gelu'(x + bias), dbias = Σ_rows dx (float32 partial sums per row block,
// added in a fixed order: deterministic, see layer_norm_cpu.cpp).
//
// Limits: x is (M, N) contiguous, float32/float16/bfloat16; bias (N,) of x's dtype or float32.
#include "fastattn_ext.h"

#include "cpu_vec.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

namespace fastattn_ext {
namespace cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 15;

constexpr float kSqrtHalf = 0.70710678118654752f;      // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;    // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f;   // √(2/π)
constexpr float kTanhCubic = 0.044715f;

// Φ(u) into cdf and φ(u) into pdf. The A&S coefficients are halved (p is not), so that
// the polynomial times exp(-s²) is Q = erfc/2 directly. kPrecise is false for bf16
// outputs (8 significant bits), where exp and the reciprocal may be 6e-5 off (cpu_vec.h).
template <bool kPrecise, class Isa, class V = vfloat<Isa>>
inline void normal_cdf_pdf(Isa isa, const V& u, V& cdf, V& pdf) {
  const float p = 0.3275911f, a1 = 0.5f * 0.254829592f, a2 = 0.5f * -0.284496736f,
              a3 = 0.5f * 1.421413741f, a4 = 0.5f * -1.453152027f, a5 = 0.5f * 1.061405429f;
  const V s = vabs(u) * kSqrtHalf;
  const V t = reciprocal<kPrecise>(isa, 1.f + p * s);
  const V poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))));
  const V e = vexp</*kNonPositive=*/true, kPrecise>(isa, -(s * s));  // exp(-u²/2)
  const V q = poly * e;                                                  // Q(|u|)
  cdf = u < 0.f ? q : 1.f - q;
  pdf = e * kInvSqrt2Pi;
}

// The tanh form's gate s = σ(2z) = (1 + tanh z)/2 = 1/(1 + e), e = exp(-2z); and e, for
// 1 - s = e·s (computing 1 - s by subtraction would lose it where s ≈ 1, and the
// derivative multiplies it by ~u³).
template <bool kPrecise, class Isa, class V = vfloat<Isa>>
inline V tanh_gate(Isa isa, const V& u, V& e) {
  e = vexp</*kNonPositive=*/false, kPrecise>(
      isa, -(2.f * kSqrt2OverPi) * (u + kTanhCubic * u * u * u));
  return reciprocal<kPrecise>(isa, 1.f + e);
}

template <bool kTanh, bool kPrecise, class Isa, class V = vfloat<Isa>>
inline V gelu(Isa isa, const V& u) {
  if (kTanh) {
    V e;
    return u * tanh_gate<kPrecise>(isa, u, e);
  }
  V cdf, pdf;
  normal_cdf_pdf<kPrecise>(isa, u, cdf, pdf);
  return u * cdf;
}

template <bool kTanh, bool kPrecise, class Isa, class V = vfloat<Isa>>
inline V gelu_grad(Isa isa, const V& u) {
  if (kTanh) {
    V e;
    const V s = tanh_gate<kPrecise>(isa, u, e);
    const V s_1ms = e * s * s;  // s·(1 - s)
    return s + (2.f * kSqrt2OverPi) * u * s_1ms * (1.f + (3.f * kTanhCubic) * u * u);
  }
  V cdf, pdf;
  normal_cdf_pdf<kPrecise>(isa, u, cdf, pdf);
  return cdf + u * pdf;
}

template <class T>
struct GeluArgs {
  const T* x;          // (M, N)
  const float* bias;   // (N,)
  const T* dy;         // (M, N), backward only
  T* out;              // (M, N): y, or dx
  int64_t n;
  bool streaming;      // write out with streaming stores
};

template <bool kTanh, class Isa, class T>
void gelu_fwd_rows(Isa isa, const GeluArgs<T>& a, int64_t begin, int64_t end) {
  using V = vfloat<Isa>;
  constexpr bool kPrecise = !std::is_same<T, c10::BFloat16>::value;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = a.x + r * a.n;
    T* y = a.out + r * a.n;
    const bool stream_y = a.streaming && stream_aligned(isa, y);
    for_each_vector(isa, a.n, [&](int64_t i, int len) {
      const V u = load_n(isa, x + i, len) + load_n(isa, a.bias + i, len);
      store_n(isa, y + i, gelu<kTanh, kPrecise>(isa, u), len, stream_y);
    });
  }
  if (a.streaming) stream_fence(isa);
}

// Rows [begin, end); adds Σ dx to db_sum (N,) unless it is null.
template <bool kTanh, class Isa, class T>
void gelu_bwd_rows(Isa isa, const GeluArgs<T>& a, int64_t begin, int64_t end,
                        float* db_sum) {
  using V = vfloat<Isa>;
  constexpr bool kPrecise = !std::is_same<T, c10::BFloat16>::value;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = a.x + r * a.n;
    const T* dy = a.dy + r * a.n;
    T* dx = a.out + r * a.n;
    const bool stream_dx = a.streaming && stream_aligned(isa, dx);
    for_each_vector(isa, a.n, [&](int64_t i, int len) {
      const V u = load_n(isa, x + i, len) + load_n(isa, a.bias + i, len);
      const V d = load_n(isa, dy + i, len) * gelu_grad<kTanh, kPrecise>(isa, u);
      store_n(isa, dx + i, d, len, stream_dx);
      if (db_sum) store_n(isa, db_sum + i, load_n(isa, db_sum + i, len) + d, len);
    });
  }
  if (a.streaming) stream_fence(isa);
}

// Calls f(std::bool_constant<tanh>{}).
template <class F>
void dispatch_tanh(bool tanh, F&& f) {
  if (tanh) return f(std::true_type{});
  f(std::false_type{});
}

Tensor float_bias(const OptTensor& bias, const Tensor& x) {
  if (bias) return bias->to(at::kFloat).contiguous();
  return at::zeros({x.size(1)}, x.options().dtype(at::kFloat));
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn_ext

at::Tensor fastattn_ext::gelu_fwd_cpu(const Tensor& x, const OptTensor& bias,
                                           c10::string_view approximate) {
  using namespace fastattn_ext::cpu;
  const bool tanh = check_gelu("gelu_fwd", nullptr, x, bias, approximate);
  const int64_t m = x.size(0), n = x.size(1);
  Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  const Tensor b = float_bias(bias, x);
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const GeluArgs<T> args{x.data_ptr<T>(), b.data_ptr<float>(), nullptr, y.data_ptr<T>(), n,
                           y.nbytes() >= kStreamBytes};
    dispatch_tanh(tanh, [&](auto kind) {
      at::parallel_for(0, m, std::max<int64_t>(1, kGrainElems / n), [&](int64_t r0, int64_t r1) {
        dispatch_isa([&](auto isa) {
          gelu_fwd_rows<decltype(kind)::value>(isa, args, r0, r1);
        });
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> fastattn_ext::gelu_bwd_cpu(
    const Tensor& dy, const Tensor& x, const OptTensor& bias, c10::string_view approximate) {
  using namespace fastattn_ext::cpu;
  const bool tanh = check_gelu("gelu_bwd", &dy, x, bias, approximate);
  const int64_t m = x.size(0), n = x.size(1);
  Tensor dx = at::empty_like(x);
  Tensor dbias = bias ? at::empty({n}, bias->options()) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dbias.zero_()};
  const Tensor b = float_bias(bias, x);
  const int64_t block_rows = rows_per_block(m);
  const int64_t blocks = (m + block_rows - 1) / block_rows;
  Tensor part = at::empty({bias ? blocks : 0, n}, x.options().dtype(at::kFloat));
  float* part_ptr = part.data_ptr<float>();

  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const GeluArgs<T> args{x.data_ptr<T>(), b.data_ptr<float>(), dy.data_ptr<T>(),
                           dx.data_ptr<T>(), n, dx.nbytes() >= kStreamBytes};
    dispatch_tanh(tanh, [&](auto kind) {
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          float* db_sum = bias ? part_ptr + blk * n : nullptr;
          if (db_sum) std::fill_n(db_sum, n, 0.f);
          const int64_t r0 = blk * block_rows, r1 = std::min(m, r0 + block_rows);
          dispatch_isa([&](auto isa) {
            gelu_bwd_rows<decltype(kind)::value>(isa, args, r0, r1, db_sum);
          });
        }
      });
    });
  });
  if (bias) sum_blocks_into(part_ptr, blocks, n, n, dbias);
  return {dx, dbias};
}
