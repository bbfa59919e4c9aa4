// Registers torch.ops.nbdiff.small_m_linear(x, w, b, isa): the product split over output columns
// on torch's own intra-op threads (at::parallel_for), each chunk done by the kernel for `isa`
// (1 = AVX2, 2 = AVX-512, 3 = AVX-512 with BF16; the Python side picks it from the CPU's flags).
// fp32 tensors take the fp32 kernels, fp32 x with a bf16 weight the widening ones (the fp32 kernels'
// bits on the widened weight); bf16 tensors (isa 3 only) sum in fp32 and are rounded to bf16 once,
// bias included.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fp32_rows.h"
#include "small_m.h"

namespace nbdiff_kernel {

void fp32_rows(const float* xp, int64_t M, int64_t K, const at::Tensor& w, const float* bp, int64_t n0, int64_t n1,
               int64_t N, float* yp, int64_t isa) {
  if (w.scalar_type() == at::kBFloat16) {
    auto kernel = isa >= 2 ? rows_avx512_w16 : rows_avx2_w16;
    kernel(xp, M, K, reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>()), bp, n0, n1, N, yp);
  } else {
    auto kernel = isa >= 2 ? rows_avx512 : rows_avx2;
    kernel(xp, M, K, w.const_data_ptr<float>(), bp, n0, n1, N, yp);
  }
}

}  // namespace nbdiff_kernel

namespace {

using nbdiff_kernel::fp32_rows;

at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_m_linear: CPU tensors only");
  const auto dtype = x.scalar_type();
  const bool widened = dtype == at::kFloat && w.scalar_type() == at::kBFloat16;  // bf16 weights, fp32 arithmetic
  TORCH_CHECK((w.scalar_type() == dtype || widened) && (dtype == at::kFloat || dtype == at::kBFloat16),
              "small_m_linear: fp32 x with an fp32 or bf16 weight, or bf16 x and weight (isa 3)");
  TORCH_CHECK(isa >= 1 && isa <= 3, "small_m_linear: isa must be 1 (AVX2), 2 (AVX-512) or 3 (AVX-512 + BF16)");
  TORCH_CHECK(dtype == at::kFloat || isa == 3, "small_m_linear: bf16 needs isa 3 (AVX512-BF16)");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "small_m_linear: weight must be a contiguous N x K matrix");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K, "small_m_linear: x has ", x.size(-1), " features, the weight ", K);
  at::Tensor bias;
  if (b.has_value()) {
    TORCH_CHECK(b->numel() == N && (b->scalar_type() == dtype || b->scalar_type() == w.scalar_type()),
                "small_m_linear: the bias must have N elements of x's or the weight's dtype");
    bias = b->to(at::kFloat).contiguous();
  }
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (dtype == at::kFloat) {
    const float* xp = x2.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { fp32_rows(xp, M, K, w, bp, n0, n1, N, yp, isa); });
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

// Several products of the same x in one call: y_i = x W_i^T + b_i, each output its own contiguous
// tensor exactly as small_m_linear(x, W_i, b_i) gives it (every output element is summed alone, so
// sharing a call changes no bit). One parallel_for over all the weights' output columns: a layer's
// q/k/v (or gate/up) products cost one dispatch and one fork/join of the threads instead of three
// (two), and the threads split the columns of all of them evenly. fp32 x; each weight fp32 or bf16.
std::vector<at::Tensor> small_m_linear_multi(const at::Tensor& x, at::TensorList ws,
                                             const c10::List<std::optional<at::Tensor>>& bs, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "small_m_linear_multi: fp32 CPU tensors only");
  TORCH_CHECK(isa == 1 || isa == 2 || isa == 3, "small_m_linear_multi: isa must be 1, 2 or 3");
  TORCH_CHECK(bs.size() == ws.size(), "small_m_linear_multi: one bias (or None) per weight");
  const int64_t K = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  const size_t S = ws.size();
  std::vector<at::Tensor> ys, biases(S);
  std::vector<const float*> bp(S);
  std::vector<float*> yp(S);
  std::vector<int64_t> start(S + 1, 0);  // output columns of weight s: [start[s], start[s + 1]) of all of them
  auto shape = x.sizes().vec();
  for (size_t s = 0; s < S; ++s) {
    const at::Tensor& w = ws[s];
    TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && w.dim() == 2 &&
                    w.is_contiguous() && w.size(1) == K,
                "small_m_linear_multi: every weight must be a contiguous fp32 or bf16 N x K matrix with x's K");
    const int64_t N = w.size(0);
    const std::optional<at::Tensor> b = bs.get(s);
    if (b.has_value()) {
      TORCH_CHECK(b->numel() == N && b->scalar_type() == at::kFloat, "small_m_linear_multi: the bias must have N fp32 elements");
      biases[s] = b->contiguous();
      bp[s] = biases[s].data_ptr<float>();
    } else {
      bp[s] = nullptr;
    }
    shape.back() = N;
    ys.push_back(at::empty(shape, x.options()));
    yp[s] = ys.back().data_ptr<float>();
    start[s + 1] = start[s] + N;
  }
  const float* xp = x2.data_ptr<float>();
  at::parallel_for(0, start[S], 64, [&](int64_t a, int64_t b) {
    for (size_t s = 0; s < S; ++s) {
      const int64_t n0 = std::max(a, start[s]), n1 = std::min(b, start[s + 1]);
      if (n0 < n1) fp32_rows(xp, M, K, ws[s], bp[s], n0 - start[s], n1 - start[s], start[s + 1] - start[s], yp[s], isa);
    }
  });
  return ys;
}

}  // namespace

TORCH_LIBRARY(nbdiff, m) {
  m.def("small_m_linear(Tensor x, Tensor w, Tensor? b, int isa) -> Tensor");
  m.def("small_m_linear_multi(Tensor x, Tensor[] ws, Tensor?[] bs, int isa) -> Tensor[]");
  m.impl("small_m_linear", c10::DispatchKey::CPU, TORCH_FN(small_m_linear));
  m.impl("small_m_linear_multi", c10::DispatchKey::CPU, TORCH_FN(small_m_linear_multi));
}
