// The small-row kernels for AVX-512 (compiled with -mavx512f -mfma; called only where the CPU has it):
// fp32 x and w, and fp32 x with bf16 w (each weight vector widened to fp32 as it is loaded: a bf16
// number is the top half of the fp32 number it stands for, so the widening is exact and every sum is
// the one the fp32 kernel makes on the widened weights, with half the bytes read).
#include <cstring>

#include "small_m.h"
#include "kernel_body.h"

namespace nbdiff_kernel {
namespace {
struct Avx512 {
  using T = float;
  using V = __m512;
  using In = V;
  static constexpr int L = 16;
  // 32 vector registers: up to 24 accumulators plus the weights and one input vector; up to 12
  // input rows share each read of a weight row. Columns per pass measured on SmolLM2's shapes (8
  // rows: 3 columns 4% faster than 2; 10-12 rows: 2 columns 8% faster than 1). 13-16 rows take two
  // passes of at most 8 (3 columns each): one pass of 16 rows with 1 column loads 16 input vectors per
  // 16 multiply-adds, and above 12 rows of 896 features the inputs no longer stay in L1 (Ice Lake Xeon,
  // Qwen2.5-Coder-0.5B's shapes: 16 rows 0.6-0.75x the time of one pass, fp32 and bf16 weights alike).
  static constexpr int kRows = 12, kSplit = 8;
  static constexpr int kTileRows = 0, kTileCols = 0, kPanelRows = 0;  // no panel path: measured on AVX2 only
  template <int R> static constexpr int cols() { return R == 1 ? 8 : R <= 4 ? 4 : R <= 8 ? 3 : R <= 12 ? 2 : 1; }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p); }
  using W = T;
  static In load_w(const W* p) { return load(p); }
  static In load_w_tail(const W* p, int n) { return load_tail(p, n); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return lanes_sum(v); }
};

struct Avx512W16 : Avx512 {
  using W = uint16_t;  // bf16 bits
  // Above 12 rows (a prompt): 4 x 6 tiles (24 accumulators, 6 weight vectors, one input vector) over panels of
  // weights that stay in L2 while every row passes over them, as AVX2's many-row path. Measured on the 0.5B's
  // shapes (Ice Lake Xeon, 2 threads): 43 rows of 4864 x 896 3.2 ms against MKL's 3.2 on the fp32 weight plus
  // 0.7 to widen it (which a prompt through torch's product pays); 16 rows 0.9-1.2 ms against 1.0-1.6 in two
  // few-row passes. fp32 weights keep MKL above 16 rows: its panels were no faster than MKL there.
  static constexpr int kTileRows = 4, kTileCols = 6, kPanelRows = 12;
  template <int R> static constexpr int cols() { return R == 1 ? 4 : R <= 4 ? 4 : R <= 8 ? 3 : R <= 12 ? 2 : 1; }
  static In load_w(const W* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static In load_w_tail(const W* p, int n) {  // the last K % 16 weights of a row (no such tail in the usual shapes)
    alignas(32) uint16_t part[L] = {};
    std::memcpy(part, p, static_cast<size_t>(n) * sizeof(W));
    return load_w(part);
  }
};
}  // namespace

void rows_avx512(const float* x, int64_t M, int64_t K, const float* w, const float* b, int64_t n0,
                 int64_t n1, int64_t N, float* y) {
  rows<Avx512>(x, M, K, w, b, n0, n1, N, y);
}

void rows_avx512_w16(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* b, int64_t n0,
                     int64_t n1, int64_t N, float* y) {
  rows<Avx512W16>(x, M, K, w, b, n0, n1, N, y);
}
}  // namespace nbdiff_kernel
