// Products y = x W^T + b (fp32; fp32 x with bf16 W; or bf16 with fp32 sums) for a handful of rows (decoding steps, verify passes, packed serving).
//
// Why: for 2-16 rows MKL's sgemm costs nearly as much per row as its one-row gemv, because it does
// not overlap streaming the weights from memory with the arithmetic on them. These kernels read
// each weight row once for up to 16 input rows (8 on AVX2), prefetch the rows a few columns ahead,
// and keep one accumulator per (input row, output column).
//
// Every output element is summed in one fixed order whatever the number of rows: lane l of its
// accumulator takes k = l, l + L, l + 2L, ... (one fused multiply-add each), the lanes are then
// added in the order the reduction below fixes, then the bias. So a row gets the same bits alone
// or beside others: a greedy reply does not depend on what else shares its forward.
#pragma once
#include <cstdint>

namespace nbdiff_kernel {

// Columns [n0, n1) of y (M x N, row-major) from x (M x K) and w (N x K); b may be null.
void rows_avx512(const float* x, int64_t M, int64_t K, const float* w, const float* b,
                 int64_t n0, int64_t n1, int64_t N, float* y);
void rows_avx2(const float* x, int64_t M, int64_t K, const float* w, const float* b,
               int64_t n0, int64_t n1, int64_t N, float* y);
// fp32 x, bf16 w (raw bits, widened exactly to fp32): the bits rows_avx512 / rows_avx2 give on the
// widened weights, from half the bytes.
void rows_avx512_w16(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* b,
                     int64_t n0, int64_t n1, int64_t N, float* y);
void rows_avx2_w16(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* b,
                   int64_t n0, int64_t n1, int64_t N, float* y);
// bf16 x and w (raw bits), fp32 sums in y; AVX512-BF16 only.
void rows_avx512_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, const float* b,
                      int64_t n0, int64_t n1, int64_t N, float* y);

}  // namespace nbdiff_kernel
