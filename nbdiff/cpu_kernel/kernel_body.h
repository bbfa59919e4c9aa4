// The kernel, written once over a SIMD type `S` (see avx512.cpp, avx2.cpp, avx512_bf16.cpp, which
// compile it for their instruction set). S provides: T (the element type of x), W (the element type
// of w: T, or bf16 bits widened to fp32 as they are loaded), In (a vector of L elements as loaded),
// V (an accumulator of fp32 lanes), zero(), load(p), load_tail(p, n) (x), load_w(p), load_w_tail(p, n)
// (w), fma(w, x, acc), sum(acc) (the lanes in a fixed order), kRows, kSplit and cols<R>().
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace nbdiff_kernel {

// The lanes of an accumulator added in one fixed tree: halves, then quarters, then pairs. The
// AVX-512 sum folds its two 256-bit halves first, then goes on as the AVX2 one.
static inline float lanes_sum(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#ifdef __AVX512F__
static inline float lanes_sum(__m512 v) {
  return lanes_sum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
#endif

constexpr int kPrefetchColumns = 4;  // how many weight rows ahead to prefetch (measured: 2-8 alike)

// R input rows, NB output columns per pass (R * NB accumulators stay in registers).
template <class S, int R, int NB>
static inline int64_t columns(const typename S::T* __restrict x, int64_t K, const typename S::W* __restrict w,
                              const float* __restrict b, int64_t n, int64_t n1, int64_t N,
                              float* __restrict y) {
  const int64_t body = K - K % S::L;
  const int tail = static_cast<int>(K - body);
  for (; n + NB <= n1; n += NB) {
    const typename S::W* wn = w + n * K;
    typename S::V acc[NB][R];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[j][r] = S::zero();
    for (int64_t k = 0; k < body; k += S::L) {
      typename S::In wv[NB];
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(wn + (kPrefetchColumns + j) * K + k), _MM_HINT_T0);
        wv[j] = S::load_w(wn + j * K + k);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const typename S::In xv = S::load(x + r * K + k);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) acc[j][r] = S::fma(wv[j], xv, acc[j][r]);
      }
    }
    if (tail) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const typename S::In xv = S::load_tail(x + r * K + body, tail);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) acc[j][r] = S::fma(S::load_w_tail(wn + j * K + body, tail), xv, acc[j][r]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        float s = S::sum(acc[j][r]);
        if (b) s += b[n + j];
        y[r * N + n + j] = s;
      }
  }
  return n;
}

template <class S, int R, int NB>
static void block(const typename S::T* x, int64_t K, const typename S::W* w, const float* b, int64_t n0, int64_t n1,
                  int64_t N, float* y) {
  const int64_t n = columns<S, R, NB>(x, K, w, b, n0, n1, N, y);
  columns<S, R, 1>(x, K, w, b, n, n1, N, y);
}

// All M rows, S::kRows at a time (each weight row is read once per chunk); the pass shape for
// each count of rows is S::cols<R>().
template <class S, int R>
static void chunk(const typename S::T* x, int64_t rows, int64_t K, const typename S::W* w, const float* b, int64_t n0,
                  int64_t n1, int64_t N, float* y) {
  if constexpr (R > 1) {
    if (rows < R) return chunk<S, R - 1>(x, rows, K, w, b, n0, n1, N, y);
  }
  block<S, R, S::template cols<R>()>(x, K, w, b, n0, n1, N, y);
}

// Many rows (a prompt): S::kTileRows x S::kTileCols tiles over panels of output columns small
// enough to stay in the core's L2 cache while every row passes over them, so the weights come from
// memory once and each tile loads fewer vectors per multiply-add than the few-row passes. Every
// output element is summed exactly as above (one accumulator, the same k order), so a row's bits
// are still the ones it gets alone.
constexpr int64_t kPanelBytes = 128 * 1024;  // measured on AVX2 (Zen 3, 512 KiB L2): 64-256 KiB alike

template <class S>
static void panels(const typename S::T* x, int64_t M, int64_t K, const typename S::W* w, const float* b, int64_t n0,
                   int64_t n1, int64_t N, float* y) {
  constexpr int R = S::kTileRows, NB = S::kTileCols;
  int64_t width = kPanelBytes / (K * static_cast<int64_t>(sizeof(typename S::W))) / NB * NB;
  if (width < NB) width = NB;
  for (int64_t p0 = n0; p0 < n1; p0 += width) {
    const int64_t p1 = p0 + width < n1 ? p0 + width : n1;
    int64_t m = 0;
    for (; m + R <= M; m += R) block<S, R, NB>(x + m * K, K, w, b, p0, p1, N, y + m * N);
    if (m < M) chunk<S, R - 1>(x + m * K, M - m, K, w, b, p0, p1, N, y + m * N);
  }
}

// Up to S::kRows rows in one pass over the weights; more in passes of at most S::kSplit rows, as even as
// they come (16 rows: two of 8, each at its column count, rather than 12 + 4).
template <class S>
static void rows(const typename S::T* x, int64_t M, int64_t K, const typename S::W* w, const float* b, int64_t n0,
                 int64_t n1, int64_t N, float* y) {
  if constexpr (S::kTileRows > 1) {
    if (M > S::kPanelRows) return panels<S>(x, M, K, w, b, n0, n1, N, y);
  }
  if (M <= 0) return;
  if (M <= S::kRows) return chunk<S, S::kRows>(x, M, K, w, b, n0, n1, N, y);
  const int64_t passes = (M + S::kSplit - 1) / S::kSplit;
  for (int64_t p = 0, m = 0; p < passes; ++p) {
    const int64_t r = (M - m) / (passes - p);  // the rows left, shared evenly by the passes left
    chunk<S, S::kSplit>(x + m * K, r, K, w, b, n0, n1, N, y + m * N);
    m += r;
  }
}

}  // namespace nbdiff_kernel
