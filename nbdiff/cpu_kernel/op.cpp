// Registers torch.ops.nbdiff.small_m_linear(x, w, b, isa): the product split over output columns
// on torch's own intra-op threads (at::parallel_for), each chunk done by the kernel for `isa`
// (2 = AVX-512, 1 = AVX2; the Python side picks it from the CPU's flags).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "small_m.h"

namespace {

at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_m_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "small_m_linear: fp32 only");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "small_m_linear: weight must be a contiguous N x K matrix");
  TORCH_CHECK(isa == 1 || isa == 2, "small_m_linear: isa must be 1 (AVX2) or 2 (AVX-512)");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K, "small_m_linear: x has ", x.size(-1), " features, the weight ", K);
  const float* bias = nullptr;
  if (b.has_value()) {
    TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == N, "small_m_linear: bad bias");
    bias = b->data_ptr<float>();
  }
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto kernel = isa == 2 ? nbdiff_kernel::rows_avx512 : nbdiff_kernel::rows_avx2;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { kernel(xp, M, K, wp, bias, n0, n1, N, yp); });
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY(nbdiff, m) {
  m.def("small_m_linear(Tensor x, Tensor w, Tensor? b, int isa) -> Tensor");
  m.impl("small_m_linear", c10::DispatchKey::CPU, TORCH_FN(small_m_linear));
}
