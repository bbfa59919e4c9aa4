// The few-row product for fp32 x and a weight tensor in either storage nbdiff keeps on CPUs without
// native bf16 arithmetic (fp32, or bf16 widened exactly to fp32 as it is read), for the sources built
// against torch (op.cpp defines it, layers.cpp calls it too).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace nbdiff_kernel {

// Columns [n0, n1) of y (M x N fp32, row-major) from x (M x K fp32) and w (N x K, fp32 or bf16,
// contiguous) plus b (N fp32 or null), through the kernel for `isa` (1 = AVX2, 2 or 3 = AVX-512).
void fp32_rows(const float* x, int64_t M, int64_t K, const at::Tensor& w, const float* b, int64_t n0, int64_t n1,
               int64_t N, float* y, int64_t isa);

}  // namespace nbdiff_kernel
