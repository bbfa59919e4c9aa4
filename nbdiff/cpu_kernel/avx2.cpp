// The small-row kernels for AVX2 + FMA (compiled with -mavx2 -mfma): fp32 x and w, and fp32 x with
// bf16 w widened exactly to fp32 as it is loaded (as in avx512.cpp).
#include <cstring>

#include "small_m.h"
#include "kernel_body.h"

namespace nbdiff_kernel {
namespace {
struct Avx2 {
  using T = float;
  using V = __m256;
  using In = V;
  static constexpr int L = 8;
  // 16 vector registers: at most 8 accumulators, so 8 input rows read each weight row once.
  static constexpr int kRows = 8, kSplit = 8;
  // Above kPanelRows rows (a prompt): 4 x 3 tiles, 12 accumulators, 3 weight vectors and one input
  // vector in the 16 registers (7 loads per 12 multiply-adds, against 9 per 8 for 8 rows).
  static constexpr int kTileRows = 4, kTileCols = 3, kPanelRows = 4;
  template <int R> static constexpr int cols() { return R == 1 ? 4 : R == 2 ? 4 : R <= 4 ? 2 : 1; }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_tail(const float* p, int n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes));
  }
  using W = T;
  static In load_w(const W* p) { return load(p); }
  static In load_w_tail(const W* p, int n) { return load_tail(p, n); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) { return lanes_sum(v); }
};

struct Avx2W16 : Avx2 {
  using W = uint16_t;  // bf16 bits
  static In load_w(const W* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static In load_w_tail(const W* p, int n) {
    alignas(16) uint16_t part[L] = {};
    std::memcpy(part, p, static_cast<size_t>(n) * sizeof(W));
    return load_w(part);
  }
};
}  // namespace

void rows_avx2(const float* x, int64_t M, int64_t K, const float* w, const float* b, int64_t n0,
               int64_t n1, int64_t N, float* y) {
  rows<Avx2>(x, M, K, w, b, n0, n1, N, y);
}

void rows_avx2_w16(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* b, int64_t n0,
                   int64_t n1, int64_t N, float* y) {
  rows<Avx2W16>(x, M, K, w, b, n0, n1, N, y);
}
}  // namespace nbdiff_kernel
