// The small-row kernel for AVX-512 (compiled with -mavx512f -mfma; called only where the CPU has it).
#include "small_m.h"
#include "kernel_body.h"

namespace nbdiff_kernel {
namespace {
struct Avx512 {
  using T = float;
  using V = __m512;
  using In = V;
  static constexpr int L = 16;
  // 32 vector registers: up to 24 accumulators plus the weights and one input vector; up to 16
  // input rows share each read of a weight row. Columns per pass measured on SmolLM2's shapes (8
  // rows: 3 columns 4% faster than 2; 10-12 rows: 2 columns 8% faster than 1).
  static constexpr int kRows = 16;
  static constexpr int kTileRows = 0, kTileCols = 0, kPanelRows = 0;  // no panel path: measured on AVX2 only
  template <int R> static constexpr int cols() { return R == 1 ? 8 : R <= 4 ? 4 : R <= 8 ? 3 : R <= 12 ? 2 : 1; }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return lanes_sum(v); }
};
}  // namespace

void rows_avx512(const float* x, int64_t M, int64_t K, const float* w, const float* b, int64_t n0,
                 int64_t n1, int64_t N, float* y) {
  rows<Avx512>(x, M, K, w, b, n0, n1, N, y);
}
}  // namespace nbdiff_kernel
