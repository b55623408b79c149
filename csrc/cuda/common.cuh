// Device helpers shared by the CUDA kernels: float conversions of the element types,
// 16-byte vector loads/stores, row and column reductions, and the host-side type dispatch.
//
// Element types are float, __half and __nv_bfloat16 (the same bits as c10::Half and
// c10::BFloat16). Arithmetic is float throughout; conversions are explicit because
// torch compiles with __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace fastattn_ext::cuda {

// ---------------------------------------------------------------- conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// An optional (N,) parameter at j as float, `fill` when absent.
template <class W>
__device__ __forceinline__ float param_at(const W* p, int64_t j, float fill) {
  return p ? to_float(p[j]) : fill;
}

// ---------------------------------------------------------------- vector loads and stores
// VEC consecutive elements moved as one 16-byte (or smaller) transaction.
template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Elements per 16-byte load.
template <class T>
constexpr int kVec16 = 16 / sizeof(T);

// p[0..VEC) as float; p must be aligned to VEC·sizeof(T).
template <int VEC, class T>
__device__ __forceinline__ void load_float(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(pk.v[k]);
}
template <int VEC, class T>
__device__ __forceinline__ void store_float(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Whether every non-null pointer is aligned for 16-byte accesses.
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// ---------------------------------------------------------------- reductions
// Butterfly sum over the 32 lanes. Every lane ends with the same value (each step adds
// a + b on one lane and b + a on its partner, which are equal), so the result is exact
// to reproduce and uniform across the warp.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the threads that share a row (threadIdx.x; blockDim.x is 32, or a multiple of
// 32 up to 1024 with blockDim.y == 1). Every thread gets the result. `smem` holds 32
// floats; all threads of the block must call this together when blockDim.x > 32.
__device__ __forceinline__ float row_sum(float v, float* smem) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_sum(lane < blockDim.x / 32 ? smem[lane] : 0.f);
}

// Column sums, deterministically: `chunks` partial rows part[c][0..n) → out[0..n), one
// thread per column, adding chunks in order in groups of 16 and then the group sums in
// order (rounding error grows with chunks/16 + 16, not with the chunk count).
template <class O>
__global__ void sum_chunks_kernel(const float* __restrict__ part,  // (chunks, n)
                                  int64_t chunks, int64_t n, O* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float total = 0.f;
  for (int64_t g = 0; g < chunks; g += 16) {
    float group = 0.f;
    for (int64_t c = g; c < g + 16 && c < chunks; ++c) group += part[c * n + col];
    total += group;
  }
  out[col] = from_float<O>(total);
}

// Tiles of the column-partial kernels: 32 columns (threadIdx.x) × 8 row lanes (threadIdx.y).
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;

// How rows are cut into chunks for a deterministic column sum: depends only on m.
struct RowChunks {
  int64_t chunks, rows_per_chunk;
};
inline RowChunks row_chunks(int64_t m) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(512, (m + 63) / 64));
  return {chunks, (m + chunks - 1) / chunks};
}

// ---------------------------------------------------------------- host-side dispatch
template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the CUDA element type of `t` (float32/float16/bfloat16).
template <class F>
void dispatch_cuda_types(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(TypeTag<float>{});
    case at::kHalf: return f(TypeTag<__half>{});
    case at::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default:
      TORCH_CHECK(false, "fastattn_ext: dtype must be float32, float16 or bfloat16, got ", t);
  }
}

// A tensor's data as the CUDA element type T (null for an undefined/absent tensor).
template <class T>
T* data_as(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

}  // namespace fastattn_ext::cuda
