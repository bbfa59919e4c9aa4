// The small-row kernel for bf16 weights and inputs on CPUs with AVX512-BF16 (compiled with
// -mavx512f -mavx512bw -mavx512bf16): each lane multiplies a pair of neighbouring bf16 elements
// and adds both products to its fp32 accumulator (vdpbf16ps), so one weight row is read as half the
// bytes of fp32. The sums are fp32; the caller rounds them (plus bias) to bf16 once, as torch does.
#include "small_m.h"
#include "kernel_body.h"

namespace nbdiff_kernel {
namespace {
struct Avx512Bf16 {
  using T = uint16_t;  // bf16 bits
  using V = __m512;    // 16 fp32 accumulator lanes
  using In = __m512bh; // 32 bf16 elements
  static constexpr int L = 32;
  static constexpr int kRows = 16, kSplit = 16;
  static constexpr int kTileRows = 0, kTileCols = 0, kPanelRows = 0;  // no panel path: measured on AVX2 only
  template <int R> static constexpr int cols() { return R == 1 ? 8 : R <= 4 ? 4 : R <= 8 ? 2 : 1; }
  static V zero() { return _mm512_setzero_ps(); }
  static In load(const T* p) { return (In)_mm512_loadu_si512(p); }
  static In load_tail(const T* p, int n) { return (In)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1ull), p); }
  using W = T;
  static In load_w(const W* p) { return load(p); }
  static In load_w_tail(const W* p, int n) { return load_tail(p, n); }
  static V fma(In a, In b, V c) { return _mm512_dpbf16_ps(c, a, b); }
  static float sum(V v) { return lanes_sum(v); }
};
}  // namespace

void rows_avx512_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, const float* b, int64_t n0,
                      int64_t n1, int64_t N, float* y) {
  rows<Avx512Bf16>(x, M, K, w, b, n0, n1, N, y);
}
}  // namespace nbdiff_kernel
