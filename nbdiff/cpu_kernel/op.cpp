// Registers torch.ops.nbdiff.small_m_linear(x, w, b, isa): the product split over output columns
// on torch's own intra-op threads (at::parallel_for), each chunk done by the kernel for `isa`
// (1 = AVX2, 2 = AVX-512, 3 = AVX-512 with BF16; the Python side picks it from the CPU's flags).
// fp32 tensors take the fp32 kernels; bf16 tensors (isa 3 only) sum in fp32 and are rounded to bf16
// once, bias included.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "small_m.h"

namespace {

at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_m_linear: CPU tensors only");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(w.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
              "small_m_linear: fp32 only (or bf16 with isa 3), x and weight alike");
  TORCH_CHECK(isa >= 1 && isa <= 3, "small_m_linear: isa must be 1 (AVX2), 2 (AVX-512) or 3 (AVX-512 + BF16)");
  TORCH_CHECK(dtype == at::kFloat || isa == 3, "small_m_linear: bf16 needs isa 3 (AVX512-BF16)");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "small_m_linear: weight must be a contiguous N x K matrix");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K, "small_m_linear: x has ", x.size(-1), " features, the weight ", K);
  at::Tensor bias;
  if (b.has_value()) {
    TORCH_CHECK(b->numel() == N && b->scalar_type() == dtype, "small_m_linear: the bias must have N elements of x's dtype");
    bias = b->to(at::kFloat).contiguous();
  }
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (dtype == at::kFloat) {
    const float* xp = x2.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    auto kernel = isa >= 2 ? nbdiff_kernel::rows_avx512 : nbdiff_kernel::rows_avx2;
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { kernel(xp, M, K, wp, bp, n0, n1, N, yp); });
  } else {
    const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
    const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { nbdiff_kernel::rows_avx512_bf16(xp, M, K, wp, bp, n0, n1, N, yp); });
    y = y.to(at::kBFloat16);
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY(nbdiff, m) {
  m.def("small_m_linear(Tensor x, Tensor w, Tensor? b, int isa) -> Tensor");
  m.impl("small_m_linear", c10::DispatchKey::CPU, TORCH_FN(small_m_linear));
}
