// Standalone (no torch): the few-row kernel's pass over every weight of one forward of a model's shapes
// (SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-1.5B; random weights), in variants of the pass shape and the
// software prefetch, beside a plain two-thread read of the same bytes: how close the one-row product
// comes to the memory's streaming speed, and whether another prefetch pays (docs/benchmarks/cpu-speed.md).
// The variants keep the kernel's summation order (one accumulator per output, k in order).
//
//   g++ -O3 -mavx512f -mfma -fopenmp -ffp-contract=off benchmarks/cpu_kernel_stream.cpp -o /tmp/stream
//   /tmp/stream smollm2 9; /tmp/stream qwen05 7   # argument 2: rounds, every variant once per round (median printed)
//   ONLY="8 rows" /tmp/stream qwen05 7           # only the variants whose name contains this
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <string>
#include <algorithm>

static inline float lanes_sum(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
static inline float lanes_sum(__m512 v) {
  return lanes_sum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

int PF_MODE = 0;   // 0 current (rows +4..), 1 none, 2 linear at distance DIST bytes
long DIST = 8192;
int HINT = 0;      // 0 T0, 1 T1, 2 T2, 3 NTA

template <int HINTV>
static inline void pf(const char* p) {
  if constexpr (HINTV == 0) _mm_prefetch(p, _MM_HINT_T0);
  else if constexpr (HINTV == 1) _mm_prefetch(p, _MM_HINT_T1);
  else if constexpr (HINTV == 2) _mm_prefetch(p, _MM_HINT_T2);
  else _mm_prefetch(p, _MM_HINT_NTA);
}

template <int R, int NB, int MODE, int HINTV, int OFF = 4>
static int64_t columns(const float* x, int64_t K, const float* w, int64_t n, int64_t n1, int64_t N, float* y, long dist) {
  const int64_t body = K - K % 16;
  for (; n + NB <= n1; n += NB) {
    const float* wn = w + n * K;
    const char* lin = reinterpret_cast<const char*>(wn) + dist;
    __m512 acc[NB][R];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
    int64_t it = 0;
    for (int64_t k = 0; k < body; k += 16, ++it) {
      __m512 wv[NB];
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        if constexpr (MODE == 0) pf<HINTV>(reinterpret_cast<const char*>(wn + (OFF + j) * K + k));
        if constexpr (MODE == 2) pf<HINTV>(lin + (it * NB + j) * 64);
        wv[j] = _mm512_loadu_ps(wn + j * K + k);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_loadu_ps(x + r * K + k);
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(wv[j], xv, acc[j][r]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) y[r * N + n + j] = lanes_sum(acc[j][r]);
  }
  return n;
}

template <int R, int NB, int MODE, int HINTV, int OFF = 4>
static void block(const float* x, int64_t K, const float* w, int64_t n0, int64_t n1, int64_t N, float* y, long dist) {
  int64_t n = columns<R, NB, MODE, HINTV, OFF>(x, K, w, n0, n1, N, y, dist);
  columns<R, 1, MODE, HINTV, OFF>(x, K, w, n, n1, N, y, dist);
}

typedef void (*Fn)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, long);

struct Mat { int64_t N, K; float* w; };

int main(int argc, char** argv) {
  std::string model = argc > 1 ? argv[1] : "smollm2";
  int reps = argc > 2 ? atoi(argv[2]) : 10;
  int64_t H, I, L, V, Hkv;
  if (model == "smollm2") { H = 576; I = 1536; L = 30; V = 49152; Hkv = 192; }
  else if (model == "qwen05") { H = 896; I = 4864; L = 24; V = 151936; Hkv = 128; }
  else { H = 1536; I = 8960; L = 28; V = 151936; Hkv = 256; }
  std::vector<Mat> mats;
  auto add = [&](int64_t N, int64_t K) {
    float* w = (float*)aligned_alloc(64, ((N * K * 4 + 63) / 64) * 64 + 4096);
    for (int64_t i = 0; i < N * K; ++i) w[i] = (float)((i * 2654435761u) % 1000) * 1e-4f;
    mats.push_back({N, K, w});
  };
  for (int l = 0; l < L; ++l) { add(H, H); add(Hkv, H); add(Hkv, H); add(H, H); add(I, H); add(I, H); add(H, I); }
  add(V, H);
  double bytes = 0; for (auto& m : mats) bytes += (double)m.N * m.K * 4;
  std::vector<float> x(16 * 9000), y(16 * 160000);
  for (auto& v : x) v = 0.01f;
  // streaming read reference: sum of all weights (2 threads)
  {
    double best = 1e9;
    for (int rep = 0; rep < reps; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      float total = 0;
      for (auto& m : mats) {
        int64_t n = m.N * m.K;
        float part[2] = {0, 0};
#pragma omp parallel num_threads(2)
        {
          int t = omp_get_thread_num();
          int64_t a = n / 2 * t / 16 * 16, b = t ? n / 16 * 16 : n / 2 / 16 * 16;
          __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
          for (int64_t i = a; i + 64 <= b; i += 64) {
            s0 = _mm512_add_ps(s0, _mm512_load_ps(m.w + i)); s1 = _mm512_add_ps(s1, _mm512_load_ps(m.w + i + 16));
            s2 = _mm512_add_ps(s2, _mm512_load_ps(m.w + i + 32)); s3 = _mm512_add_ps(s3, _mm512_load_ps(m.w + i + 48));
          }
          part[t] = lanes_sum(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
        }
        total += part[0] + part[1];
      }
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, s);
      if (total == 12345) printf("x");
    }
    printf("%s: %.0f MB of weights; plain 2-thread read: %.2f ms = %.1f GB/s\n", model.c_str(), bytes / 1e6, best * 1e3, bytes / best / 1e9);
  }
  struct Var { const char* name; Fn fn; long dist; };
  std::vector<Var> vs = {
    {"current (rows+4, T0), NB8", block<1, 8, 0, 0, 4>, 0},
    {"rows+8 T0, NB8", block<1, 8, 0, 0, 8>, 0},
    {"rows+16 T0, NB8", block<1, 8, 0, 0, 16>, 0},
    {"rows+8 T1, NB8", block<1, 8, 0, 1, 8>, 0},
    {"rows+16 T1, NB8", block<1, 8, 0, 1, 16>, 0},
    {"rows+4 T0, NB12", block<1, 12, 0, 0, 4>, 0},
    {"rows+12 T0, NB12", block<1, 12, 0, 0, 12>, 0},
    {"none, NB12", block<1, 12, 1, 0, 4>, 0},
    {"rows+4 T0, NB16", block<1, 16, 0, 0, 4>, 0},
    {"rows+16 T0, NB16", block<1, 16, 0, 0, 16>, 0},
    {"none, NB16", block<1, 16, 1, 0, 4>, 0},
    {"rows+6 T0, NB6", block<1, 6, 0, 0, 6>, 0},
    {"no prefetch, NB8", block<1, 8, 1, 0, 4>, 0},
    {"linear 4KB T0, NB8", block<1, 8, 2, 0, 4>, 4096},
    {"linear 16KB T0, NB8", block<1, 8, 2, 0, 4>, 16384},
    {"linear 32KB T0, NB8", block<1, 8, 2, 0, 4>, 32768},
    {"linear 16KB T1, NB8", block<1, 8, 2, 1, 4>, 16384},
    {"linear 32KB T2, NB8", block<1, 8, 2, 2, 4>, 32768},
    {"linear 16KB NTA, NB8", block<1, 8, 2, 3, 4>, 16384},
    {"rows+6 T1 8 rows NB3", block<8, 3, 0, 1, 6>, 0},
    {"current, NB4", block<1, 4, 0, 0, 4>, 0},
    {"rows+8 T0, NB4", block<1, 4, 0, 0, 8>, 0},
    {"current 2 rows NB4", block<2, 4, 0, 0, 4>, 0},
    {"current 8 rows NB3", block<8, 3, 0, 0, 4>, 0},
    {"rows+3 T0 8 rows NB3", block<8, 3, 0, 0, 3>, 0},
    {"rows+6 T0 8 rows NB3", block<8, 3, 0, 0, 6>, 0},
    {"none 8 rows NB3", block<8, 3, 1, 0, 4>, 0},
    {"rows+4 T0 8 rows NB2", block<8, 2, 0, 0, 4>, 0},
    {"current 16 rows NB1", block<16, 1, 0, 0, 4>, 0},
    {"rows+2 T0 16 rows NB1", block<16, 1, 0, 0, 2>, 0},
  };
  const char* only = getenv("ONLY");
  std::vector<std::vector<double>> all(vs.size());
  for (int round = 0; round < reps; ++round)
  for (size_t vi = 0; vi < vs.size(); ++vi) {
    auto& v = vs[vi];
    if (only && !strstr(v.name, only)) continue;
    int R = strstr(v.name, "16 rows") ? 16 : strstr(v.name, "8 rows") ? 8 : strstr(v.name, "2 rows") ? 2 : 1;
    double best = 1e9;
    for (int rep = 0; rep < 1; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      for (auto& m : mats) {
#pragma omp parallel num_threads(2)
        {
          int t = omp_get_thread_num();
          int64_t half = (m.N + 1) / 2;
          int64_t a = t ? half : 0, b = t ? m.N : half;
          v.fn(x.data(), m.K, m.w, a, b, m.N, y.data(), v.dist);
        }
      }
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, s);
    }
    all[vi].push_back(best);
    if (round == reps - 1) {
      auto t = all[vi]; std::sort(t.begin(), t.end()); double med = t[t.size() / 2];
      printf("  %-32s rows %d: median of %d interleaved rounds %.2f ms = %.1f GB/s (best %.2f)\n", v.name, R, reps, med * 1e3, bytes / med / 1e9, t[0] * 1e3);
    }
  }
}
