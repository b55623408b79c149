// Declarations shared by the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*) implementations of the
// fastattn_ext ops. The schemas, and what each op computes, are in fastattn_ext.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fastattn_ext {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// ---- argument checks (fastattn_ext.cpp): each failure is a RuntimeError whose message
// names the op, the argument, its value and what is allowed.
void check_layer_norm_fwd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& residual, double eps);
void check_layer_norm_bwd(const Tensor& dy, const Tensor& h, const OptTensor& weight,
                          const Tensor& mean, const Tensor& rstd,
                          const OptTensor& dresidual_out, bool rms_norm);
// `dy` is null for the forward. Returns true for approximate="tanh", false for "none".
bool check_gelu(const char* op, const Tensor* dy, const Tensor& x, const OptTensor& bias,
                     c10::string_view approximate);

// ---- output allocation shared by both devices
// dbias of layer_norm_bwd has the weight's dtype when there is a weight, else h's.
at::ScalarType layer_norm_dbias_dtype(const Tensor& h, const OptTensor& weight);

// Calls f(T{}) with T = float, c10::Half or c10::BFloat16 for the dtype `t` (checked before).
template <class F>
void dispatch_float_types(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "fastattn_ext: dtype must be float32, float16 or bfloat16, got ", t);
  }
}

// ---- CPU implementations (layer_norm_cpu.cpp, gelu_cpu.cpp)
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cpu(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms_norm);
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
    const Tensor& rstd, const OptTensor& dresidual_out, bool has_bias, bool rms_norm);
Tensor gelu_fwd_cpu(const Tensor& x, const OptTensor& bias, c10::string_view approximate);
std::tuple<Tensor, Tensor> gelu_bwd_cpu(const Tensor& dy, const Tensor& x,
                                             const OptTensor& bias, c10::string_view approximate);

// Helpers of the CPU column sums (layer_norm_cpu.cpp), shared by both CPU kernel families.
namespace cpu {
// Rows per block of a deterministic column sum over m rows (depends only on m, never on
// the thread count).
int64_t rows_per_block(int64_t m);
// out[j] = Σ_b part[b·stride + j] for j < n, summed in a fixed order, rounded to out's dtype.
void sum_blocks_into(const float* part, int64_t blocks, int64_t stride, int64_t n, Tensor& out);
}  // namespace cpu

// ---- CUDA implementations (cuda/*.cu), compiled when FASTATTN_WITH_CUDA is defined
#if defined(FASTATTN_WITH_CUDA)
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cuda(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms_norm);
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
    const Tensor& rstd, const OptTensor& dresidual_out, bool has_bias, bool rms_norm);
Tensor gelu_fwd_cuda(const Tensor& x, const OptTensor& bias, c10::string_view approximate);
std::tuple<Tensor, Tensor> gelu_bwd_cuda(const Tensor& dy, const Tensor& x,
                                              const OptTensor& bias, c10::string_view approximate);
#endif

}  // namespace fastattn_ext
