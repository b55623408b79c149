// LayerNorm and RMSNorm on CUDA: forward and backward, with an optional fused residual add.
// The same math as layer_norm_cpu.cpp (see there and fastattn_ext.cpp for the derivation):
//
//   forward   h = x + residual (rounded to x's dtype);  mean = Σh/N;
//             rstd = 1/sqrt(Σ(h - mean)²/N + eps)
//             (RMSNorm: mean = 0, rstd = 1/sqrt(Σh²/N + eps));  y = (h - mean)·rstd·w + b
//   backward  x̂ = (h - mean)·rstd,  g = dy·w
//             dx = rstd·(g - mean(g) - x̂·mean(g·x̂)) + dresidual_out   (RMSNorm: no mean(g))
//             dw = Σ_rows dy·x̂,  db = Σ_rows dy
//
// Parallelisation. One warp per row when N <= 1024 (4 rows per block), else one block of
// 128-512 threads per row. Threads stride over the row in 16-byte packs (8 bf16/fp16 or 4
// floats) when N is a multiple of the pack and the pointers are aligned, else element by
// element. Row sums are warp shuffles, then shared memory across warps. The statistics
// are float32 and two-pass (the row is read again from L1/L2 for the second and third
// passes, recomputing x + residual in float).
//
// dw/db are deterministic: a second kernel tiles the (M, N) matrix into 32-column × row-chunk
// blocks; each thread sums its column over every 8th row of the chunk, the 8 partial sums
// are added in order in shared memory, and a third kernel adds the chunks in order. The
// chunking depends only on M. No atomics.
#include "fastattn_ext.h"

#include "common.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace fastattn_ext::cuda {
namespace {

// ---------------------------------------------------------------- launch shape
struct RowLaunch {
  dim3 grid, block;
};

// A warp per row (4 rows per block) for short rows, else a block per row.
RowLaunch row_launch(int64_t m, int64_t n) {
  if (n <= 1024) return {dim3(static_cast<unsigned>((m + 3) / 4)), dim3(32, 4)};
  const unsigned threads = n <= 4096 ? 128 : n <= 16384 ? 256 : 512;
  return {dim3(static_cast<unsigned>(m)), dim3(threads)};
}

// ---------------------------------------------------------------- forward
template <class T, class W>
struct LnFwdParams {
  const T* x;          // (M, N)
  const T* residual;   // (M, N) or null
  T* residual_out;     // (M, N), written when residual is given
  const W* weight;     // (N,) or null (= 1)
  const W* bias;       // (N,) or null (= 0)
  T* y;                // (M, N)
  float* mean;         // (M,), unused for RMSNorm
  float* rstd;         // (M,)
  int64_t m, n;
  float eps;
  bool rms;
};

// h[0..VEC) = x + residual at column j of a row, rounded to T (the value residual_out
// keeps and the backward reads), in float.
template <int VEC, class T>
__device__ __forceinline__ void load_h(const T* x, const T* res, int64_t j, float (&h)[VEC]) {
  load_float<VEC>(x + j, h);
  if (res) {
    float r[VEC];
    load_float<VEC>(res + j, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[k] = to_float(from_float<T>(h[k] + r[k]));
  }
}

template <class T, class W, int VEC>
__global__ void __launch_bounds__(512) layer_norm_fwd_kernel(const LnFwdParams<T, W> p) {
  __shared__ float smem[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Only warp-per-row launches have rows past the end, and they never synchronise the block.
  if (row >= p.m) return;
  const int64_t n = p.n;
  const T* x = p.x + row * n;
  const T* res = p.residual ? p.residual + row * n : nullptr;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;

  // Pass 1: Σh (RMSNorm: Σh²); the residual sum is written here, once.
  float s = 0.f;
  for (int64_t j = first; j < n; j += step) {
    float h[VEC];
    load_h<VEC>(x, res, j, h);
    if (res) store_float<VEC>(p.residual_out + row * n + j, h);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += p.rms ? h[k] * h[k] : h[k];
  }
  const float total = row_sum(s, smem);

  // Pass 2 (LayerNorm): Σ(h - mean)².
  float mean = 0.f, var = total / static_cast<float>(n);
  if (!p.rms) {
    mean = var;
    float s2 = 0.f;
    for (int64_t j = first; j < n; j += step) {
      float h[VEC];
      load_h<VEC>(x, res, j, h);
#pragma unroll
      for (int k = 0; k < VEC; ++k) s2 += (h[k] - mean) * (h[k] - mean);
    }
    var = row_sum(s2, smem) / static_cast<float>(n);
  }
  const float rstd = rsqrtf(var + p.eps);
  if (threadIdx.x == 0) {
    if (!p.rms) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  // Pass 3: y.
  T* y = p.y + row * n;
  for (int64_t j = first; j < n; j += step) {
    float h[VEC], out[VEC];
    load_h<VEC>(x, res, j, h);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      out[k] = (h[k] - mean) * rstd * param_at(p.weight, j + k, 1.f) +
               param_at(p.bias, j + k, 0.f);
    store_float<VEC>(y + j, out);
  }
}

template <class T, class W>
void launch_layer_norm_fwd(const LnFwdParams<T, W>& p, cudaStream_t stream) {
  constexpr int kV = kVec16<T>;
  const RowLaunch l = row_launch(p.m, p.n);
  if (p.n % kV == 0 && aligned16({p.x, p.residual, p.residual_out, p.y}))
    layer_norm_fwd_kernel<T, W, kV><<<l.grid, l.block, 0, stream>>>(p);
  else
    layer_norm_fwd_kernel<T, W, 1><<<l.grid, l.block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- backward: dx
template <class T, class W>
struct LnBwdParams {
  const T* dy;      // (M, N)
  const T* h;       // (M, N)
  const W* weight;  // (N,) or null (= 1)
  const float* mean;  // (M,), unused for RMSNorm
  const float* rstd;  // (M,)
  const T* dres;    // (M, N) or null
  T* dx;            // (M, N)
  int64_t m, n;
  bool rms;
};

template <class T, class W, int VEC>
__global__ void __launch_bounds__(512) layer_norm_bwd_dx_kernel(const LnBwdParams<T, W> p) {
  __shared__ float smem[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.m) return;  // warp-per-row launches only, as in the forward
  const int64_t n = p.n;
  const T* dy = p.dy + row * n;
  const T* h = p.h + row * n;
  const float mean = p.rms ? 0.f : p.mean[row];
  const float rstd = p.rstd[row];
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;

  // Pass 1: Σg and Σg·x̂.
  float sg = 0.f, sgx = 0.f;
  for (int64_t j = first; j < n; j += step) {
    float d[VEC], hv[VEC];
    load_float<VEC>(dy + j, d);
    load_float<VEC>(h + j, hv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = d[k] * param_at(p.weight, j + k, 1.f);
      sg += g;
      sgx += g * (hv[k] - mean) * rstd;
    }
  }
  const float mean_g = p.rms ? 0.f : row_sum(sg, smem) / static_cast<float>(n);
  const float mean_gx = row_sum(sgx, smem) / static_cast<float>(n);

  // Pass 2: dx.
  T* dx = p.dx + row * n;
  const T* dres = p.dres ? p.dres + row * n : nullptr;
  for (int64_t j = first; j < n; j += step) {
    float d[VEC], hv[VEC], out[VEC];
    load_float<VEC>(dy + j, d);
    load_float<VEC>(h + j, hv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = d[k] * param_at(p.weight, j + k, 1.f);
      const float xhat = (hv[k] - mean) * rstd;
      out[k] = (g - mean_g - xhat * mean_gx) * rstd;
    }
    if (dres) {
      float r[VEC];
      load_float<VEC>(dres + j, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] += r[k];
    }
    store_float<VEC>(dx + j, out);
  }
}

// ---------------------------------------------------------------- backward: dw, db
// Per (32-column tile, row chunk): part_w[chunk][col] = Σ dy·x̂, part_b[chunk][col] = Σ dy
// over the chunk's rows (either output may be null).
template <class T>
__global__ void __launch_bounds__(kColTile * kRowLanes) layer_norm_param_partial_kernel(
    const T* __restrict__ dy, const T* __restrict__ h, const float* __restrict__ mean,
    const float* __restrict__ rstd, int64_t m, int64_t n, int64_t rows_per_chunk, bool rms,
    float* __restrict__ part_w, float* __restrict__ part_b) {
  __shared__ float tile_w[kRowLanes][kColTile + 1];
  __shared__ float tile_b[kRowLanes][kColTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < m ? r0 + rows_per_chunk : m;
  float sw = 0.f, sb = 0.f;
  if (col < n) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) {
      const float d = to_float(dy[r * n + col]);
      const float xhat = (to_float(h[r * n + col]) - (rms ? 0.f : mean[r])) * rstd[r];
      sw += d * xhat;
      sb += d;
    }
  }
  tile_w[threadIdx.y][threadIdx.x] = sw;
  tile_b[threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float tw = 0.f, tb = 0.f;
#pragma unroll
    for (int k = 0; k < kRowLanes; ++k) {
      tw += tile_w[k][threadIdx.x];
      tb += tile_b[k][threadIdx.x];
    }
    if (part_w) part_w[blockIdx.y * n + col] = tw;
    if (part_b) part_b[blockIdx.y * n + col] = tb;
  }
}

template <class O>
void launch_sum_chunks(const float* part, int64_t chunks, int64_t n, at::Tensor& out,
                       cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  sum_chunks_kernel<O><<<blocks, 256, 0, stream>>>(part, chunks, n, data_as<O>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(TypeTag<W>{}) with W = float for float32 parameters, else T (the input's type).
template <class T, class F>
void dispatch_param_type(at::ScalarType t, F&& f) {
  if (t == at::kFloat) return f(TypeTag<float>{});
  f(TypeTag<T>{});
}

}  // namespace
}  // namespace fastattn_ext::cuda

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fastattn_ext::layer_norm_fwd_cuda(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms_norm) {
  using namespace fastattn_ext::cuda;
  check_layer_norm_fwd(x, weight, bias, residual, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor residual_out = residual ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms_norm ? 0 : m}, f32);
  Tensor rstd = at::empty({m}, f32);
  if (m == 0) return {y, residual_out, mean, rstd};

  // weight and bias share one element type in the kernel: float copies if they differ.
  Tensor w = weight ? *weight : Tensor(), b = bias ? *bias : Tensor();
  if (w.defined() && b.defined() && w.scalar_type() != b.scalar_type()) {
    w = w.to(at::kFloat);
    b = b.to(at::kFloat);
  }
  const at::ScalarType param_type =
      w.defined() ? w.scalar_type() : b.defined() ? b.scalar_type() : x.scalar_type();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_types(x.scalar_type(), [&](auto x_tag) {
    using T = typename decltype(x_tag)::type;
    dispatch_param_type<T>(param_type, [&](auto w_tag) {
      using W = typename decltype(w_tag)::type;
      const LnFwdParams<T, W> p{data_as<T>(x),
                                residual ? data_as<T>(*residual) : nullptr,
                                residual ? data_as<T>(residual_out) : nullptr,
                                data_as<W>(w),
                                data_as<W>(b),
                                data_as<T>(y),
                                rms_norm ? nullptr : mean.data_ptr<float>(),
                                rstd.data_ptr<float>(),
                                m,
                                n,
                                static_cast<float>(eps),
                                rms_norm};
      launch_layer_norm_fwd(p, stream);
    });
  });
  return {y, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fastattn_ext::layer_norm_bwd_cuda(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
    const Tensor& rstd, const OptTensor& dresidual_out, bool has_bias, bool rms_norm) {
  using namespace fastattn_ext::cuda;
  check_layer_norm_bwd(dy, h, weight, mean, rstd, dresidual_out, rms_norm);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t m = h.size(0), n = h.size(1);
  Tensor dx = at::empty_like(h);
  Tensor dweight = weight ? at::empty({n}, weight->options()) : at::empty({0}, h.options());
  Tensor dbias =
      at::empty({has_bias ? n : 0}, h.options().dtype(layer_norm_dbias_dtype(h, weight)));
  if (m == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RowChunks rc = row_chunks(m);
  const bool sums = weight.has_value() || has_bias;
  Tensor part = at::empty({sums ? 2 * rc.chunks : 0, n}, h.options().dtype(at::kFloat));
  float* part_w = weight ? part.data_ptr<float>() : nullptr;
  float* part_b = has_bias ? part.data_ptr<float>() + rc.chunks * n : nullptr;

  dispatch_cuda_types(h.scalar_type(), [&](auto h_tag) {
    using T = typename decltype(h_tag)::type;
    const at::ScalarType param_type = weight ? weight->scalar_type() : h.scalar_type();
    dispatch_param_type<T>(param_type, [&](auto w_tag) {
      using W = typename decltype(w_tag)::type;
      const LnBwdParams<T, W> p{data_as<T>(dy),
                                data_as<T>(h),
                                weight ? data_as<W>(*weight) : nullptr,
                                rms_norm ? nullptr : mean.data_ptr<float>(),
                                rstd.data_ptr<float>(),
                                dresidual_out ? data_as<T>(*dresidual_out) : nullptr,
                                data_as<T>(dx),
                                m,
                                n,
                                rms_norm};
      constexpr int kV = kVec16<T>;
      const RowLaunch l = row_launch(m, n);
      if (n % kV == 0 && aligned16({p.dy, p.h, p.dres, p.dx}))
        layer_norm_bwd_dx_kernel<T, W, kV><<<l.grid, l.block, 0, stream>>>(p);
      else
        layer_norm_bwd_dx_kernel<T, W, 1><<<l.grid, l.block, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (!sums) return;
    const dim3 grid(static_cast<unsigned>((n + kColTile - 1) / kColTile),
                    static_cast<unsigned>(rc.chunks));
    layer_norm_param_partial_kernel<T><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
        data_as<T>(dy), data_as<T>(h), rms_norm ? nullptr : mean.data_ptr<float>(),
        rstd.data_ptr<float>(), m, n, rc.rows_per_chunk, rms_norm, part_w, part_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (weight) {
      dispatch_cuda_types(dweight.scalar_type(), [&](auto o_tag) {
        launch_sum_chunks<typename decltype(o_tag)::type>(part_w, rc.chunks, n, dweight, stream);
      });
    }
    if (has_bias) {
      dispatch_cuda_types(dbias.scalar_type(), [&](auto o_tag) {
        launch_sum_chunks<typename decltype(o_tag)::type>(part_b, rc.chunks, n, dbias, stream);
      });
    }
  });
  return {dx, dweight, dbias};
}
