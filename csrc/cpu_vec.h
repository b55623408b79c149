// Float vectors for the CPU kernels, and how one kernel is built for several ISAs.
//
// Vectors. `vfloat<Isa>` is a GCC/Clang vector of float as wide as one register of the
// ISA: 16 lanes for AVX-512, 8 for AVX2, 4 for the baseline (SSE2 / NEON). The kernels
// are templates over the ISA, written once as plain arithmetic on these vectors. (A
// vector wider than the hardware's would be correct too, but GCC turns comparisons and
// selects on it into one scalar instruction per lane.) Every kernel loads its inputs as
// float (widening bf16/fp16), computes and accumulates in float, and rounds once when it
// stores. A row whose length is not a multiple of the lane count ends in a partial vector:
// `load_n` fills the missing lanes with zeros, `store_n` writes only the first n, and
// reductions that would see a nonzero value in a missing lane mask it (`first_n`).
//
// ISAs. The extension is compiled with the compiler's baseline flags (setup.py passes
// only -O3), so wider instructions are enabled per function: `dispatch_isa(f)` calls the
// generic lambda `f(isa)` through a trampoline compiled with the target attribute of the
// best ISA this CPU has (AVX-512 with or without AVX512-BF16, AVX2+FMA+F16C, or the
// baseline), and `flatten` inlines the whole kernel into that trampoline so it is
// compiled for that ISA. A few helpers have ISA-specific overloads (bf16/fp16
// conversions, streaming stores, exp, a reciprocal); they take the ISA tag as their first
// argument. The environment variable FASTATTN_EXT_CPU_ISA=avx512bf16|avx512|avx2|generic,
// read once, lowers the choice (to test and benchmark the other paths; never raises it).
//
// Results are deterministic: a kernel's reductions add the same lanes in the same order on
// every run and for every thread count. They differ in the last bits between ISAs (other
// lane counts, fused multiply-adds).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_X86_ISAS 1
#include <immintrin.h>
#endif

// Vectors are passed between inlined helpers; no ABI boundary is crossed.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastattn_ext::cpu {

// ---------------------------------------------------------------- ISA tags and dispatch
struct Generic {
  static constexpr int kLanes = 4;
};
struct Avx2 {
  static constexpr int kLanes = 8;
};
// AVX-512 (F, BW, VL, DQ); kBf16 adds AVX512-BF16's float → bf16 conversion instruction.
template <bool kBf16>
struct Avx512T {
  static constexpr int kLanes = 16;
};
using Avx512 = Avx512T<false>;
using Avx512Bf16 = Avx512T<true>;

template <int L>
struct VecTypes {
  typedef float f32 __attribute__((vector_size(4 * L)));
  typedef int32_t i32 __attribute__((vector_size(4 * L)));
  typedef uint32_t u32 __attribute__((vector_size(4 * L)));
  typedef uint16_t u16 __attribute__((vector_size(2 * L)));
};
template <class Isa>
using vfloat = typename VecTypes<Isa::kLanes>::f32;

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The ISA the kernels run with on this CPU (detected once; see FASTATTN_EXT_CPU_ISA).
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

#if defined(FASTATTN_X86_ISAS)
#define FASTATTN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#if defined(__clang__)
#define FASTATTN_AVX512_FEATURES "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#else
#define FASTATTN_AVX512_FEATURES \
  "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512"
#endif
#define FASTATTN_TARGET_AVX512 __attribute__((target(FASTATTN_AVX512_FEATURES)))
#define FASTATTN_TARGET_AVX512BF16 \
  __attribute__((target(FASTATTN_AVX512_FEATURES ",avx512bf16")))

template <class F>
FASTATTN_TARGET_AVX512BF16 __attribute__((noinline, flatten)) void run_avx512bf16(F& f) {
  f(Avx512Bf16{});
}
template <class F>
FASTATTN_TARGET_AVX512 __attribute__((noinline, flatten)) void run_avx512(F& f) { f(Avx512{}); }
template <class F>
FASTATTN_TARGET_AVX2 __attribute__((noinline, flatten)) void run_avx2(F& f) { f(Avx2{}); }
#endif
template <class F>
__attribute__((noinline, flatten)) void run_generic(F& f) { f(Generic{}); }

// Runs `f(isa_tag)` compiled for the best available ISA. Call it inside at::parallel_for
// chunks, with `f` doing only arithmetic on raw pointers (no allocation, no torch calls):
// everything it calls is inlined into the ISA-specific trampoline.
template <class F>
void dispatch_isa(F&& f) {
#if defined(FASTATTN_X86_ISAS)
  switch (cpu_isa()) {
    case CpuIsa::kAvx512Bf16: return run_avx512bf16(f);
    case CpuIsa::kAvx512: return run_avx512(f);
    case CpuIsa::kAvx2: return run_avx2(f);
    case CpuIsa::kGeneric: break;
  }
#endif
  run_generic(f);
}

// ---------------------------------------------------------------- loads and stores
#if defined(FASTATTN_X86_ISAS)
// AVX-512 intrinsics are used in their zero-masking forms with a full mask: the same
// instructions, but GCC's unmasked forms start from an "undefined" register that -Wall
// reports as maybe-uninitialized.
constexpr __mmask16 kAll16 = 0xffff;
#endif

template <class Isa>
inline vfloat<Isa> load(Isa, const float* p) {
  vfloat<Isa> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class Isa>
inline void store(Isa, float* p, const vfloat<Isa>& v) {
  std::memcpy(p, &v, sizeof v);
}

// bf16 is the top half of a float: widening is a shift; narrowing rounds to nearest even
// and keeps NaNs NaN (quieted), as c10::BFloat16 does.
template <class Isa>
inline typename VecTypes<Isa::kLanes>::u16 bf16_bits(Isa, const vfloat<Isa>& v) {
  using u32 = typename VecTypes<Isa::kLanes>::u32;
  using i32 = typename VecTypes<Isa::kLanes>::i32;
  const u32 u = (u32)v;
  u32 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const i32 is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  r = is_nan ? ((u >> 16) | 0x40u) : r;
  return __builtin_convertvector(r, typename VecTypes<Isa::kLanes>::u16);
}
template <class Isa>
inline vfloat<Isa> load(Isa, const c10::BFloat16* p) {
  typename VecTypes<Isa::kLanes>::u16 h;
  std::memcpy(&h, p, sizeof h);
  return (vfloat<Isa>)(__builtin_convertvector(h, typename VecTypes<Isa::kLanes>::u32) << 16);
}
template <class Isa>
inline void store(Isa isa, c10::BFloat16* p, const vfloat<Isa>& v) {
  const auto h = bf16_bits(isa, v);
  std::memcpy(p, &h, sizeof h);
}

#if defined(FASTATTN_X86_ISAS)
// The same conversions with explicit AVX-512 instructions (GCC widens u16 → u32 in two
// halves otherwise). With AVX512-BF16, one instruction rounds (to nearest even, NaN kept);
// unlike c10 it flushes float denormals (below 1.2e-38) to zero.
template <bool B>
FASTATTN_TARGET_AVX512 inline vfloat<Avx512> load(Avx512T<B>, const c10::BFloat16* p) {
  const __m256i narrow = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i wide = _mm512_maskz_cvtepu16_epi32(kAll16, narrow);
  return (vfloat<Avx512>)_mm512_maskz_slli_epi32(kAll16, wide, 16);
}
FASTATTN_TARGET_AVX512BF16 inline __m256i bf16_bits_instruction(const vfloat<Avx512>& v) {
  return (__m256i)_mm512_cvtneps_pbh((__m512)v);
}
template <bool B>
FASTATTN_TARGET_AVX512 inline __m256i bf16_bits(Avx512T<B>, const vfloat<Avx512>& v) {
  if constexpr (B) {
    return bf16_bits_instruction(v);
  } else {
    const __m512i u = (__m512i)v;
    const __m512i lsb =
        _mm512_and_si512(_mm512_maskz_srli_epi32(kAll16, u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_maskz_cvtepi32_epi16(kAll16, _mm512_maskz_srli_epi32(kAll16, r, 16));
  }
}
template <bool B>
FASTATTN_TARGET_AVX512 inline void store(Avx512T<B> isa, c10::BFloat16* p,
                                         const vfloat<Avx512>& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(isa, v));
}
#endif

// fp16: F16C instructions where the CPU has them, c10's scalar conversion otherwise.
inline vfloat<Generic> load(Generic, const c10::Half* p) {
  vfloat<Generic> v;
  for (int i = 0; i < Generic::kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
inline void store(Generic, c10::Half* p, const vfloat<Generic>& v) {
  for (int i = 0; i < Generic::kLanes; ++i) p[i] = c10::Half(v[i]);
}
#if defined(FASTATTN_X86_ISAS)
FASTATTN_TARGET_AVX2 inline __m128i half_bits(Avx2, const vfloat<Avx2>& v) {
  return _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
}
FASTATTN_TARGET_AVX2 inline vfloat<Avx2> load(Avx2, const c10::Half* p) {
  return (vfloat<Avx2>)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FASTATTN_TARGET_AVX2 inline void store(Avx2 isa, c10::Half* p, const vfloat<Avx2>& v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), half_bits(isa, v));
}
template <bool B>
FASTATTN_TARGET_AVX512 inline __m256i half_bits(Avx512T<B>, const vfloat<Avx512>& v) {
  return _mm512_maskz_cvtps_ph(kAll16, (__m512)v, _MM_FROUND_TO_NEAREST_INT);
}
template <bool B>
FASTATTN_TARGET_AVX512 inline vfloat<Avx512> load(Avx512T<B>, const c10::Half* p) {
  return (vfloat<Avx512>)_mm512_maskz_cvtph_ps(
      kAll16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <bool B>
FASTATTN_TARGET_AVX512 inline void store(Avx512T<B> isa, c10::Half* p, const vfloat<Avx512>& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half_bits(isa, v));
}
#endif

// The first n (1..kLanes) elements at p, zeros in the other lanes.
template <class Isa, class T>
inline vfloat<Isa> load_n(Isa isa, const T* p, int n) {
  if (n == Isa::kLanes) return load(isa, p);
  T buf[Isa::kLanes] = {};
  std::memcpy(static_cast<void*>(buf), p, n * sizeof(T));
  return load(isa, buf);
}
// Writes the first n (1..kLanes) lanes of v to p.
template <class Isa, class T>
inline void store_n(Isa isa, T* p, const vfloat<Isa>& v, int n) {
  if (n == Isa::kLanes) return store(isa, p, v);
  T buf[Isa::kLanes];
  store(isa, buf, v);
  std::memcpy(static_cast<void*>(p), buf, n * sizeof(T));
}

// v rounded to T's precision (and back to float): what storing it as T keeps.
template <class Isa, class T>
inline vfloat<Isa> round_to(Isa isa, const vfloat<Isa>& v) {
  if (std::is_same<T, float>::value) return v;
  T buf[Isa::kLanes];
  store(isa, buf, v);
  return load(isa, buf);
}

// ---------------------------------------------------------------- streaming stores
// Outputs of at least this many bytes are written with non-temporal ("streaming") stores:
// they skip the read-for-ownership of each destination line and do not evict the inputs
// from the cache. On the 2-core development VM this is 1.3-2x faster from ~8 MB up; it
// would slow down small outputs that the next op could have read from cache.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// Stores a full vector to an address aligned to its size (see stream_aligned). The
// baseline ISA has no wide streaming store and stores normally.
template <class Isa, class T>
inline void stream(Isa isa, T* p, const vfloat<Isa>& v) {
  store(isa, p, v);
}
// After the last streaming store of a kernel: orders them before what follows, so the
// thread that waits for this one sees the data.
template <class Isa>
inline void stream_fence(Isa) {}
#if defined(FASTATTN_X86_ISAS)
FASTATTN_TARGET_AVX2 inline void stream(Avx2, float* p, const vfloat<Avx2>& v) {
  _mm256_stream_ps(p, (__m256)v);
}
FASTATTN_TARGET_AVX2 inline void stream(Avx2 isa, c10::BFloat16* p, const vfloat<Avx2>& v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)bf16_bits(isa, v));
}
FASTATTN_TARGET_AVX2 inline void stream(Avx2 isa, c10::Half* p, const vfloat<Avx2>& v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), half_bits(isa, v));
}
FASTATTN_TARGET_AVX2 inline void stream_fence(Avx2) { _mm_sfence(); }
template <bool B>
FASTATTN_TARGET_AVX512 inline void stream(Avx512T<B>, float* p, const vfloat<Avx512>& v) {
  _mm512_stream_ps(p, (__m512)v);
}
template <bool B>
FASTATTN_TARGET_AVX512 inline void stream(Avx512T<B> isa, c10::BFloat16* p,
                                          const vfloat<Avx512>& v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_bits(isa, v));
}
template <bool B>
FASTATTN_TARGET_AVX512 inline void stream(Avx512T<B> isa, c10::Half* p,
                                          const vfloat<Avx512>& v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), half_bits(isa, v));
}
template <bool B>
FASTATTN_TARGET_AVX512 inline void stream_fence(Avx512T<B>) { _mm_sfence(); }
#endif

// Whether full vectors stored at p, p + kLanes, ... can be streamed (they must be aligned).
template <class Isa, class T>
inline bool stream_aligned(Isa, const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (Isa::kLanes * sizeof(T)) == 0;
}

// store_n that streams full vectors when `streaming` (then p must be stream_aligned).
template <class Isa, class T>
inline void store_n(Isa isa, T* p, const vfloat<Isa>& v, int n, bool streaming) {
  if (streaming && n == Isa::kLanes) return stream(isa, p, v);
  store_n(isa, p, v, n);
}

// Asks for the cache line at p ahead of use (the next row, while this one is computed).
inline void prefetch(const void* p) { __builtin_prefetch(p); }

// ---------------------------------------------------------------- loops
// Calls f(i, n) for consecutive chunks [i, i + n) of [0, len): full vectors of the ISA's
// lane count, then one partial vector.
template <class Isa, class F>
inline void for_each_vector(Isa, int64_t len, F&& f) {
  constexpr int L = Isa::kLanes;
  int64_t i = 0;
  for (; i + L <= len; i += L) f(i, L);
  if (i < len) f(i, static_cast<int>(len - i));
}

// Two vectors summed together (for loops that reduce two quantities at once).
template <class V>
struct Pair {
  V a, b;
};
template <class V>
inline Pair<V> operator+(const Pair<V>& x, const Pair<V>& y) {
  return {x.a + y.a, x.b + y.b};
}

// Σ f(i, n) over the chunks of for_each_vector (f returns a vector or a Pair), into four
// independent accumulators, so that the adds do not wait on each other, combined in a
// fixed order.
template <class Isa, class F>
inline auto sum_vectors(Isa, int64_t len, F&& f) {
  constexpr int L = Isa::kLanes;
  using Acc = decltype(f(int64_t{0}, L));
  Acc acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t i = 0;
  for (; i + 4 * L <= len; i += 4 * L) {
    acc0 = acc0 + f(i, L);
    acc1 = acc1 + f(i + L, L);
    acc2 = acc2 + f(i + 2 * L, L);
    acc3 = acc3 + f(i + 3 * L, L);
  }
  for (; i + L <= len; i += L) acc0 = acc0 + f(i, L);
  if (i < len) acc1 = acc1 + f(i, static_cast<int>(len - i));
  return (acc0 + acc1) + (acc2 + acc3);
}

// ---------------------------------------------------------------- arithmetic
template <class V>
inline V splat(float x) {
  return V{} + x;
}

// v with the lanes from n on set to zero (for reductions over a partial vector).
template <class V>
inline V first_n(const V& v, int n) {
  constexpr int L = sizeof(V) / sizeof(float);
  if (n == L) return v;
  V out = {};
  for (int i = 0; i < n; ++i) out[i] = v[i];
  return out;
}

// Sum of the lanes as a fixed pairwise tree.
template <class V>
inline float hsum(const V& v) {
  constexpr int L = sizeof(V) / sizeof(float);
  float s[L];
  std::memcpy(s, &v, sizeof s);
  for (int width = L / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  return s[0];
}

template <class V>
inline V vabs(const V& x) {
  using U = typename VecTypes<sizeof(V) / sizeof(float)>::u32;
  return (V)((U)x & 0x7fffffffu);
}

// e^r for |r| <= ln2/2, r = x - n·ln2. e^r = 1 + r + r²·P(r) with P fitted (weighted
// least squares, our own fit) for relative error on that interval.
// kPrecise: ln2 split in two (Cody–Waite) so that r is exact to float precision, and P a
// cubic: error <= 2e-7 evaluated in float (about 2 ulp). Otherwise (for bf16 outputs,
// which keep 8 bits): one ln2 constant and P a quadratic, error <= 6e-6.
template <bool kPrecise, class V>
inline V exp_reduced(const V& x, const V& n) {
  if (!kPrecise) {
    const V r = x - n * 0.693147180559945309f;
    V p = splat<V>(0.04130583629f) * r + 0.1675350517f;
    p = p * r + 0.5000482202f;
    p = p * r + 1.f;
    return p * r + 1.f;
  }
  const float kLn2Hi = 0.693145751953125f;  // ln 2 to 16 bits: n·kLn2Hi is exact
  const float kLn2Lo = 1.42860682030941723e-6f;
  const V r = (x - n * kLn2Hi) - n * kLn2Lo;
  V p = splat<V>(0.008312584832f) * r + 0.04188998044f;
  p = p * r + 0.1666711420f;
  p = p * r + 0.4999923408f;
  p = p * r + 1.f;
  return p * r + 1.f;
}
constexpr float kLog2e = 1.44269504088896341f;

// exp(x) = 2^n · e^r with n = round(x·log2 e) and |r| <= ln2/2. Baseline/AVX2 build 2^n
// from its bits, which needs x clamped to [-87, 88] (2^n stays a normal float): exp
// saturates at 1.6e38 and 1.6e-38 instead of inf and 0, which is harmless where it is
// used (ratios and products that vanish there anyway). AVX-512 scales by 2^n with one
// instruction, which flushes to 0 below the float range (so only the top is clamped).
// NaN stays NaN. kNonPositive: the caller guarantees x <= 0 (one clamp less).
template <bool kNonPositive = false, bool kPrecise = true, class Isa>
inline vfloat<Isa> vexp(Isa, const vfloat<Isa>& arg) {
  using V = vfloat<Isa>;
  using I = typename VecTypes<Isa::kLanes>::i32;
  const float kRound = 12582912.f;  // 1.5·2^23: adding it rounds to an integer
  V x = arg < -87.f ? splat<V>(-87.f) : arg;
  if (!kNonPositive) x = x > 88.f ? splat<V>(88.f) : x;
  const V t = x * kLog2e + kRound;
  const V n = t - kRound;
  const I ni = (I)t - (I)splat<V>(kRound);  // n as an integer, from the float bits
  return exp_reduced<kPrecise>(x, n) * (V)((ni + 127) << 23);
}
#if defined(FASTATTN_X86_ISAS)
template <bool kNonPositive = false, bool kPrecise = true, bool B>
FASTATTN_TARGET_AVX512 inline vfloat<Avx512> vexp(Avx512T<B>, const vfloat<Avx512>& arg) {
  using V = vfloat<Avx512>;
  // Below -104, exp is 0 in float; the clamp keeps r finite (for -inf too). Above 88 it
  // saturates at 1.6e38, as on the other ISAs (callers take 1/(1 + exp)).
  V x = (V)_mm512_maskz_max_ps(kAll16, (__m512)arg, (__m512)splat<V>(-104.f));
  if (!kNonPositive) x = (V)_mm512_maskz_min_ps(kAll16, (__m512)x, (__m512)splat<V>(88.f));
  const V n = (V)_mm512_maskz_roundscale_ps(kAll16, (__m512)(x * kLog2e),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (V)_mm512_maskz_scalef_ps(kAll16, (__m512)exp_reduced<kPrecise>(x, n),
                                   (__m512)n);
}
#endif

// 1/x for finite x > 0. AVX2 refines the hardware estimate (12 bits) with one Newton step,
// r·(2 - x·r) (error <= 2 ulp), cheaper than a division; so does AVX-512 (14 bits) when
// kPrecise, and otherwise keeps the estimate (relative error <= 2^-14, for bf16).
template <bool kPrecise = true, class Isa>
inline vfloat<Isa> reciprocal(Isa, const vfloat<Isa>& x) {
  return 1.f / x;
}
#if defined(FASTATTN_X86_ISAS)
template <bool kPrecise = true>
FASTATTN_TARGET_AVX2 inline vfloat<Avx2> reciprocal(Avx2, const vfloat<Avx2>& x) {
  const vfloat<Avx2> r = (vfloat<Avx2>)_mm256_rcp_ps((__m256)x);
  return r * (2.f - x * r);
}
template <bool kPrecise = true, bool B>
FASTATTN_TARGET_AVX512 inline vfloat<Avx512> reciprocal(Avx512T<B>, const vfloat<Avx512>& x) {
  const vfloat<Avx512> r = (vfloat<Avx512>)_mm512_maskz_rcp14_ps(kAll16, (__m512)x);
  return kPrecise ? r * (2.f - x * r) : r;
}
#endif

}  // namespace fastattn_ext::cpu
