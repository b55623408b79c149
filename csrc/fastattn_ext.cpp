// The fastattn_ext op library: schemas, argument checks, and the per-device registrations.
//
// Ops (all inputs contiguous; x is (M, N): M rows normalised / activated along N):
//
//   layer_norm_fwd(x, weight?, bias?, residual?, eps, rms_norm) -> (y, residual_out, mean, rstd)
//     h = x + residual rounded to x's dtype (or x), statistics per row in float32:
//       LayerNorm: mean = Σh/N, rstd = 1/sqrt(Σ(h - mean)²/N + eps)  (biased variance, two passes)
//                  y = (h - mean)·rstd·weight + bias
//       RMSNorm:   rstd = 1/sqrt(Σh²/N + eps),  y = h·rstd·weight + bias
//     weight/bias are optional (N,) vectors of x's dtype or float32; a bias is added in both
//     modes. y has x's dtype; residual_out = h in x's dtype when a residual is given, else an
//     empty (0,) tensor; mean (M,) float32 (empty for RMSNorm); rstd (M,) float32.
//
//   layer_norm_bwd(dy, h, weight?, mean, rstd, dresidual_out?, has_bias, rms_norm)
//       -> (dx, dweight, dbias)
//     With x̂ = (h - mean)·rstd (RMSNorm: x̂ = h·rstd) and g = dy·weight:
//       dx = rstd·(g - mean(g) - x̂·mean(g·x̂)) + dresidual_out   (RMSNorm: no mean(g) term)
//       dweight = Σ_rows dy·x̂   (weight's dtype; empty if no weight)
//       dbias   = Σ_rows dy     (weight's dtype if there is a weight, else h's; empty if
//                                !has_bias)
//     The column sums are deterministic: fixed blocks of rows, reduced in a fixed order.
//
//   gelu_fwd(x, bias?, approximate) -> y = gelu(x + bias)
//   gelu_bwd(dy, x, bias?, approximate) -> (dx, dbias)
//     approximate "none": gelu(u) = u·Φ(u),  gelu'(u) = Φ(u) + u·φ(u)
//     approximate "tanh": gelu(u) = u/2·(1 + tanh(z)), z = √(2/π)(u + 0.044715u³),
//       gelu'(u) = (1 + tanh z)/2 + u/2·(1 - tanh²z)·√(2/π)(1 + 3·0.044715u²)
//     dx = dy·gelu'(x + bias) in x's dtype; dbias = Σ_rows dx in bias's dtype (deterministic).
//
//   cpu_isa() -> str: which instruction set the CPU kernels use on this machine.
//   cpu_threads() -> int: how many threads at::parallel_for runs on when called from this
//     library (1 if it was compiled without the threading runtime torch uses).
//
// The math of each kernel family sits next to its code: layer_norm_cpu.cpp, gelu_cpu.cpp
// (CPU), cuda/layer_norm.cu, cuda/gelu.cu (CUDA).
#include "fastattn_ext.h"

#include "cpu_vec.h"

#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

// `import fastattn._C` (setup.py build) only has to run this; the ops register themselves
// when the library is loaded. A JIT build (fastattn.ext.load) is loaded with
// torch.ops.load_library and never imports it.
#define FASTATTN_STR2(x) #x
#define FASTATTN_STR(x) FASTATTN_STR2(x)
#define FASTATTN_CAT2(a, b) a##b
#define FASTATTN_CAT(a, b) FASTATTN_CAT2(a, b)
#if !defined(TORCH_EXTENSION_NAME)
#define TORCH_EXTENSION_NAME _C
#endif
extern "C" PyMODINIT_FUNC FASTATTN_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, FASTATTN_STR(TORCH_EXTENSION_NAME),
      "fastattn's C++/CUDA ops, registered as torch.ops.fastattn_ext.*", -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fastattn_ext {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// x: a 2-D contiguous float32/float16/bfloat16 tensor (M, N).
void check_matrix(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (M, N), got shape ", t.sizes());
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes());
}

// Another (M, N) tensor that goes with x: same shape, dtype, device; contiguous.
void check_like(const char* op, const char* name, const Tensor& t, const char* xname,
                const Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of ", xname, " ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of ",
              xname, " (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of ", xname,
              " (", x.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes());
}

// A (N,) parameter vector for x: x's dtype or float32, contiguous, on x's device.
void check_vector(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  const int64_t n = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n,
              ",) (the last dim of x), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ",
              name, " must have the dtype of x (", x.scalar_type(), ") or float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (",
              x.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides());
}

// A (M,) float32 per-row statistic.
void check_stat(const char* op, const char* name, const Tensor& t, const Tensor& h) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == h.size(0), op, ": ", name, " must have shape (",
              h.size(0), ",) (one per row of h), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == h.device(), op, ": ", name, " must be on the device of h (",
              h.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides());
}

}  // namespace

void check_layer_norm_fwd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& residual, double eps) {
  const char* op = "layer_norm_fwd";
  check_matrix(op, "x", x);
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one column to normalise, got shape ",
              x.sizes());
  if (weight) check_vector(op, "weight", *weight, x);
  if (bias) check_vector(op, "bias", *bias, x);
  if (residual) check_like(op, "residual", *residual, "x", x);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ",
              eps);
}

void check_layer_norm_bwd(const Tensor& dy, const Tensor& h, const OptTensor& weight,
                          const Tensor& mean, const Tensor& rstd,
                          const OptTensor& dresidual_out, bool rms_norm) {
  const char* op = "layer_norm_bwd";
  check_matrix(op, "h", h);
  TORCH_CHECK(h.size(1) > 0, op, ": h must have at least one column, got shape ", h.sizes());
  check_like(op, "dy", dy, "h", h);
  if (weight) check_vector(op, "weight", *weight, h);
  if (!rms_norm) check_stat(op, "mean", mean, h);
  check_stat(op, "rstd", rstd, h);
  if (dresidual_out) check_like(op, "dresidual_out", *dresidual_out, "h", h);
}

bool check_gelu(const char* op, const Tensor* dy, const Tensor& x, const OptTensor& bias,
                     c10::string_view approximate) {
  check_matrix(op, "x", x);
  if (dy) check_like(op, "dy", *dy, "x", x);
  if (bias) check_vector(op, "bias", *bias, x);
  TORCH_CHECK(approximate == "none" || approximate == "tanh", op,
              ": approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
  return approximate == "tanh";
}

at::ScalarType layer_norm_dbias_dtype(const Tensor& h, const OptTensor& weight) {
  return weight ? weight->scalar_type() : h.scalar_type();
}

namespace cpu {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16: return "avx512bf16";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kGeneric: break;
  }
  return "generic";
}

namespace {
CpuIsa detect_isa() {
  CpuIsa best = CpuIsa::kGeneric;
#if defined(FASTATTN_X86_ISAS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    best = CpuIsa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      best = CpuIsa::kAvx512;
      if (__builtin_cpu_supports("avx512bf16")) best = CpuIsa::kAvx512Bf16;
    }
  }
#endif
  // FASTATTN_EXT_CPU_ISA can only lower the choice: the kernels must run on this CPU.
  if (const char* env = std::getenv("FASTATTN_EXT_CPU_ISA")) {
    for (CpuIsa isa : {CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
      if (std::strcmp(env, cpu_isa_name(isa)) == 0 && isa < best) best = isa;
  }
  return best;
}
}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_isa();
  return isa;
}

}  // namespace cpu

namespace {
std::string cpu_isa_op() { return cpu::cpu_isa_name(cpu::cpu_isa()); }

// at::parallel_for is inlined here: with OpenMP it is a pragma that needs -fopenmp when
// this library is compiled, so ask it rather than at::get_num_threads().
int64_t cpu_threads_op() {
  const int64_t n = at::get_num_threads();
  std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < n) seen[static_cast<size_t>(t)].store(1);
  });
  int64_t used = 0;
  for (auto& s : seen) used += s.load();
  return used;
}
}  // namespace

TORCH_LIBRARY(fastattn_ext, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
        "bool rms_norm) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, "
        "Tensor? dresidual_out, bool has_bias, bool rms_norm) -> (Tensor, Tensor, Tensor)");
  m.def("gelu_fwd(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def("gelu_bwd(Tensor dy, Tensor x, Tensor? bias, str approximate) -> (Tensor, Tensor)");
  m.def("cpu_isa() -> str", &cpu_isa_op);
  m.def("cpu_threads() -> int", &cpu_threads_op);
}

TORCH_LIBRARY_IMPL(fastattn_ext, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("gelu_fwd", &gelu_fwd_cpu);
  m.impl("gelu_bwd", &gelu_bwd_cpu);
}

#if defined(FASTATTN_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastattn_ext, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
  m.impl("gelu_fwd", &gelu_fwd_cuda);
  m.impl("gelu_bwd", &gelu_bwd_cuda);
}
#endif

}  // namespace fastattn_ext
