// Fused bias + GELU on CUDA: y = gelu(x + bias), and its backward. The same math as
// gelu_cpu.cpp:
//
//   exact ("none"): gelu(u) = u·Φ(u),  gelu'(u) = Φ(u) + u·φ(u),  φ(u) = exp(-u²/2)/√(2π)
//                   (Φ is CUDA's normcdff, accurate in both tails)
//   tanh:           gelu(u) = u·s,  s = (1 + tanh z)/2 = 1/(1 + exp(-2z)),
//                   z = √(2/π)(u + 0.044715u³),
//                   gelu'(u) = s + 2u·s(1 - s)·√(2/π)(1 + 3·0.044715u²), s(1 - s) = e·s²
//                   with e = exp(-2z)
//
// The forward (and the backward without a bias) is elementwise over the flattened (M, N)
// input, each thread moving 16-byte packs when N is a multiple of the pack and the
// pointers are aligned. The backward with a bias also sums dx over rows for dbias, so it
// runs on tiles of 32 columns × a chunk of rows (each thread one column, every 8th row of
// the chunk); the tile's 8 partial sums are added in order in shared memory, and a second
// kernel adds the chunks in order: deterministic, no atomics.
#include "fastattn_ext.h"

#include "common.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace fastattn_ext::cuda {
namespace {

constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // √(2/π)
constexpr float kTanhCubic = 0.044715f;

// The tanh form's gate s = (1 + tanh z)/2 = 1/(1 + e), e = exp(-2z), and e (for
// 1 - s = e·s, free of cancellation). The exponent is capped so that 1 + e stays finite.
__device__ __forceinline__ float tanh_gate(float u, float& e) {
  e = expf(fminf(-2.f * kSqrt2OverPi * (u + kTanhCubic * u * u * u), 80.f));
  return 1.f / (1.f + e);
}

__device__ __forceinline__ float gelu(float u, bool tanh) {
  float e;
  return tanh ? u * tanh_gate(u, e) : u * normcdff(u);
}

__device__ __forceinline__ float gelu_grad(float u, bool tanh) {
  if (tanh) {
    float e;
    const float s = tanh_gate(u, e);
    return s + 2.f * kSqrt2OverPi * u * (e * s * s) * (1.f + 3.f * kTanhCubic * u * u);
  }
  return normcdff(u) + u * expf(-0.5f * u * u) * kInvSqrt2Pi;
}

// Elementwise over total = M·N elements: y = gelu(x + bias), or with dy given
// y = dy·gelu'(x + bias). With VEC > 1, N is a multiple of VEC, so a pack never straddles
// two rows.
template <class T, class B, int VEC>
__global__ void __launch_bounds__(256) gelu_elementwise_kernel(
    const T* __restrict__ x, const B* __restrict__ bias, const T* __restrict__ dy,
    T* __restrict__ out, int64_t total, int64_t n, bool tanh) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
       i < total; i += stride) {
    const int64_t col = i % n;
    float u[VEC], o[VEC];
    load_float<VEC>(x + i, u);
    if (dy) {
      float d[VEC];
      load_float<VEC>(dy + i, d);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        o[k] = d[k] * gelu_grad(u[k] + param_at(bias, col + k, 0.f), tanh);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = gelu(u[k] + param_at(bias, col + k, 0.f), tanh);
    }
    store_float<VEC>(out + i, o);
  }
}

template <class T, class B>
void launch_elementwise(const T* x, const B* bias, const T* dy, T* out, int64_t m, int64_t n,
                        bool tanh, cudaStream_t stream) {
  constexpr int kV = kVec16<T>;
  const int64_t total = m * n;
  const bool vec = n % kV == 0 && aligned16({x, dy, out});
  const int64_t packs = vec ? total / kV : total;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((packs + 255) / 256, 65536));
  if (vec)
    gelu_elementwise_kernel<T, B, kV><<<blocks, 256, 0, stream>>>(x, bias, dy, out, total,
                                                                      n, tanh);
  else
    gelu_elementwise_kernel<T, B, 1><<<blocks, 256, 0, stream>>>(x, bias, dy, out, total,
                                                                     n, tanh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward with a bias, per (32-column tile, row chunk): dx, and part[chunk][col] = Σ dx
// over the chunk's rows.
template <class T, class B>
__global__ void __launch_bounds__(kColTile * kRowLanes) gelu_bwd_tile_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const B* __restrict__ bias,
    T* __restrict__ dx, int64_t m, int64_t n, int64_t rows_per_chunk, bool tanh,
    float* __restrict__ part) {
  __shared__ float tile[kRowLanes][kColTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < m ? r0 + rows_per_chunk : m;
  float sum = 0.f;
  if (col < n) {
    const float b = to_float(bias[col]);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) {
      const int64_t i = r * n + col;
      const float d = to_float(dy[i]) * gelu_grad(to_float(x[i]) + b, tanh);
      dx[i] = from_float<T>(d);
      sum += d;
    }
  }
  tile[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kRowLanes; ++k) s += tile[k][threadIdx.x];
    part[blockIdx.y * n + col] = s;
  }
}

// Calls f(TypeTag<B>{}) with B = float for a float32 bias, else T (the input's type).
template <class T, class F>
void dispatch_bias_type(const OptTensor& bias, F&& f) {
  if (bias && bias->scalar_type() == at::kFloat) return f(TypeTag<float>{});
  f(TypeTag<T>{});
}

}  // namespace
}  // namespace fastattn_ext::cuda

at::Tensor fastattn_ext::gelu_fwd_cuda(const Tensor& x, const OptTensor& bias,
                                            c10::string_view approximate) {
  using namespace fastattn_ext::cuda;
  const bool tanh = check_gelu("gelu_fwd", nullptr, x, bias, approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_types(x.scalar_type(), [&](auto x_tag) {
    using T = typename decltype(x_tag)::type;
    dispatch_bias_type<T>(bias, [&](auto b_tag) {
      using B = typename decltype(b_tag)::type;
      launch_elementwise<T, B>(data_as<T>(x), bias ? data_as<B>(*bias) : nullptr, nullptr,
                               data_as<T>(y), x.size(0), x.size(1), tanh, stream);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> fastattn_ext::gelu_bwd_cuda(
    const Tensor& dy, const Tensor& x, const OptTensor& bias, c10::string_view approximate) {
  using namespace fastattn_ext::cuda;
  const bool tanh = check_gelu("gelu_bwd", &dy, x, bias, approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = x.size(1);
  Tensor dx = at::empty_like(x);
  Tensor dbias = bias ? at::empty({n}, bias->options()) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dbias.zero_()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_cuda_types(x.scalar_type(), [&](auto x_tag) {
    using T = typename decltype(x_tag)::type;
    dispatch_bias_type<T>(bias, [&](auto b_tag) {
      using B = typename decltype(b_tag)::type;
      if (!bias) {
        launch_elementwise<T, B>(data_as<T>(x), nullptr, data_as<T>(dy), data_as<T>(dx), m, n,
                                 tanh, stream);
        return;
      }
      const RowChunks rc = row_chunks(m);
      Tensor part = at::empty({rc.chunks, n}, x.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>((n + kColTile - 1) / kColTile),
                      static_cast<unsigned>(rc.chunks));
      gelu_bwd_tile_kernel<T, B><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
          data_as<T>(dy), data_as<T>(x), data_as<B>(*bias), data_as<T>(dx), m, n,
          rc.rows_per_chunk, tanh, part.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_chunks_kernel<B><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
          part.data_ptr<float>(), rc.chunks, n, data_as<B>(dbias));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dbias};
}
