#include "dense.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "threadpool.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EDGEMOE_DENSE_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define EDGEMOE_DENSE_NEON 1  // baseline on aarch64: no run-time choice needed
#endif

namespace edgemoe {

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0;
#if defined(EDGEMOE_DENSE_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(_mm256_add_ps(a0, a1)), _mm256_extractf128_ps(_mm256_add_ps(a0, a1), 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  s = _mm_cvtss_f32(h);
#elif defined(EDGEMOE_DENSE_NEON)
  float32x4_t a0 = vdupq_n_f32(0), a1 = a0;
  for (; i + 8 <= n; i += 8) {
    a0 = vfmaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
    a1 = vfmaq_f32(a1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
  }
  s = vaddvq_f32(vaddq_f32(a0, a1));
#else
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x over n values.
inline void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(EDGEMOE_DENSE_AVX2)
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#elif defined(EDGEMOE_DENSE_NEON)
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

#if defined(EDGEMOE_DENSE_AVX2)
// e^x for 8 floats with x <= 0 (a softmax after subtracting the row max): x = k ln2 + r
// with |r| <= ln2/2, e^r by its Taylor polynomial to r^6 (relative error < 3e-7 there),
// 2^k through the exponent bits. Below -87 (e^x < 1.7e-38) it gives 0, as float exp
// nearly does (denormals).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#elif defined(EDGEMOE_DENSE_NEON)
// exp_nonpositive of the AVX2 path for 4 floats, the same operations in the same
// order (round to nearest even, fused multiply-adds): the same bits.
inline float32x4_t exp_nonpositive(float32x4_t x) {
  const float32x4_t lo = vdupq_n_f32(-87.0f);
  const uint32x4_t under = vcltq_f32(x, lo);
  x = vmaxq_f32(x, lo);
  const float32x4_t k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(x, k, vdupq_n_f32(0.693145751953125f));  // ln2 in two parts
  r = vfmsq_f32(r, k, vdupq_n_f32(1.428606765330187045e-06f));
  float32x4_t p = vdupq_n_f32(1.0f / 720);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
  p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)), 23);
  return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(vmulq_f32(p, vreinterpretq_f32_s32(e))), under));
}
#endif

// x[i] = e^(x[i] - mx) over n values (all x[i] <= mx); returns their sum.
inline float exp_shifted_sum(float* x, int64_t n, float mx) {
  int64_t i = 0;
  float sum = 0;
#if defined(EDGEMOE_DENSE_AVX2)
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  sum = _mm_cvtss_f32(h);
#elif defined(EDGEMOE_DENSE_NEON)
  const float32x4_t vm = vdupq_n_f32(mx);
  float32x4_t acc = vdupq_n_f32(0);
  for (; i + 4 <= n; i += 4) {
    const float32x4_t e = exp_nonpositive(vsubq_f32(vld1q_f32(x + i), vm));
    vst1q_f32(x + i, e);
    acc = vaddq_f32(acc, e);
  }
  sum = vaddvq_f32(acc);
#endif
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - mx));
  return sum;
}

}  // namespace

void rms_norm(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* y) {
  assert(n > 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double ss = 0;
    int64_t i = 0;
#if defined(EDGEMOE_DENSE_NEON)
    float64x2_t s0 = vdupq_n_f64(0), s1 = s0;  // the sum of squares in double, as below
    for (; i + 4 <= n; i += 4) {
      const float32x4_t v = vld1q_f32(xr + i);
      const float64x2_t lo = vcvt_f64_f32(vget_low_f32(v)), hi = vcvt_high_f64_f32(v);
      s0 = vfmaq_f64(s0, lo, lo);
      s1 = vfmaq_f64(s1, hi, hi);
    }
    ss = vaddvq_f64(vaddq_f64(s0, s1));
#endif
    for (; i < n; ++i) ss += double(xr[i]) * double(xr[i]);
    const float denom = std::sqrt(float(ss / double(n)) + eps);
    i = 0;
#if defined(EDGEMOE_DENSE_NEON)
    const float32x4_t vd = vdupq_n_f32(denom);
    for (; i + 4 <= n; i += 4) vst1q_f32(yr + i, vmulq_f32(vdivq_f32(vld1q_f32(xr + i), vd), vld1q_f32(w + i)));
#endif
    for (; i < n; ++i) yr[i] = (xr[i] / denom) * w[i];
  }
}

void rope(float* x, int64_t T, int64_t heads, int64_t hd, int64_t start, const float* inv_freq) {
  const int64_t half = hd / 2;
  std::vector<float> cs(size_t(2 * half));
  for (int64_t t = 0; t < T; ++t) {
    const float pos = float(start + t);
    for (int64_t i = 0; i < half; ++i) {
      const float f = pos * inv_freq[i];
      cs[size_t(i)] = std::cos(f);
      cs[size_t(half + i)] = std::sin(f);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * hd;
      int64_t i = 0;
#if defined(EDGEMOE_DENSE_NEON)
      for (; i + 4 <= half; i += 4) {
        const float32x4_t c = vld1q_f32(&cs[size_t(i)]), s = vld1q_f32(&cs[size_t(half + i)]);
        const float32x4_t x1 = vld1q_f32(v + i), x2 = vld1q_f32(v + half + i);
        vst1q_f32(v + i, vsubq_f32(vmulq_f32(x1, c), vmulq_f32(x2, s)));
        vst1q_f32(v + half + i, vaddq_f32(vmulq_f32(x2, c), vmulq_f32(x1, s)));
      }
#endif
      for (; i < half; ++i) {
        const float c = cs[size_t(i)], s = cs[size_t(half + i)], x1 = v[i], x2 = v[half + i];
        v[i] = x1 * c - x2 * s;
        v[half + i] = x2 * c + x1 * s;
      }
    }
  }
}

#if defined(EDGEMOE_DENSE_AVX2)
namespace {

// p[0..8) = scale * q . k_u for the eight keys k_u = k + u * kstride (hd floats, hd % 8 == 0):
// their eight partial-sum vectors reduced together into one vector of scores.
inline void scores8_avx2(const float* q, const float* k, int64_t kstride, int64_t hd, __m256 scale, float* p) {
  __m256 acc[8];
  for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < hd; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + u * kstride + c), acc[u]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(p, _mm256_mul_ps(sum, scale));
}

// p[j] = scale * q . k_j for n keys k_j = k + j * kstride (hd floats, hd % 8 == 0), eight at a time.
void scores_avx2(const float* q, const float* k, int64_t kstride, int64_t n, int64_t hd, float scale, float* p) {
  int64_t j = 0;
  const __m256 vs = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) scores8_avx2(q, k + j * kstride, kstride, hd, vs, p + j);
  for (; j < n; ++j) p[j] = dot(q, k + j * kstride, hd) * scale;
}

// o = sum_j p[j] * v_j over n value rows v_j = v + j * vstride (hd floats, hd % 8 == 0), in
// blocks of 64 columns held in registers across all j.
void weighted_sum_avx2(const float* p, const float* v, int64_t vstride, int64_t n, int64_t hd, float* o) {
  for (int64_t c = 0; c < hd; c += 64) {
    const int w = int(std::min<int64_t>(8, (hd - c) / 8));
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    if (w == 8) {
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const float* vj = v + j * vstride + c;
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * u), acc[u]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const float* vj = v + j * vstride + c;
        for (int u = 0; u < w; ++u) acc[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * u), acc[u]);
      }
    }
    for (int u = 0; u < w; ++u) _mm256_storeu_ps(o + c + 8 * u, acc[u]);
  }
}

// ---- attention over the prompt, blocked: kQueryBlock tokens times the heads sharing a kv
// head form the query rows of one task; each key and value row is loaded once for all of them.

constexpr int64_t kQueryBlock = 4;  // prompt tokens per task
constexpr int kScoreRows = 8;       // query rows per pass over a tile of 8 keys
constexpr int kPvRows = 3;          // query rows per pass over the values: 3 x 4 accumulators

// r[i] = 8 floats of row i -> r[c] = element c of rows 0..7.
inline void transpose8_ps(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x31);
  }
}

// s[i * sstride + l] = scale * qrow[i] . key l of the tile kt [hd][8] (key l in lane l), R rows.
template <int R>
inline void scores_tile(const float* const* qrow, const float* kt, int64_t hd, float scale, float* s, int64_t sstride) {
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < hd; ++c) {
    const __m256 kc = _mm256_loadu_ps(kt + c * 8);
    for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(qrow[i] + c), kc, acc[i]);
  }
  const __m256 vs = _mm256_set1_ps(scale);
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(s + i * sstride, _mm256_mul_ps(acc[i], vs));
}

// o[i][c0 .. c0 + 8W) = sum_j p[i][j] v_j over j in [ja, jb), R rows (p zero outside each row's range).
template <int R, int W>
inline void pv_tile(const float* const* p, const float* v, int64_t vstride, int64_t ja, int64_t jb, int64_t c0,
                    float* const* o) {
  __m256 acc[R][W];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < W; ++u) acc[i][u] = _mm256_setzero_ps();
  for (int64_t j = ja; j < jb; ++j) {
    __m256 vj[W];
    for (int u = 0; u < W; ++u) vj[u] = _mm256_loadu_ps(v + j * vstride + c0 + 8 * u);
    for (int i = 0; i < R; ++i) {
      const __m256 pj = _mm256_broadcast_ss(p[i] + j);
      for (int u = 0; u < W; ++u) acc[i][u] = _mm256_fmadd_ps(pj, vj[u], acc[i][u]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < W; ++u) _mm256_storeu_ps(o[i] + c0 + 8 * u, acc[i][u]);
}

template <int R>
void pv_rows(const float* const* p, const float* v, int64_t vstride, int64_t ja, int64_t jb, int64_t hd,
             float* const* o) {
  int64_t c = 0;
  for (; c + 32 <= hd; c += 32) pv_tile<R, 4>(p, v, vstride, ja, jb, c, o);
  for (; c < hd; c += 8) pv_tile<R, 1>(p, v, vstride, ja, jb, c, o);
}

// ---- one token's attention over a long cache, in parts read row by row. A row of the cache
// holds every kv head (k, v [S, kv_heads, hd]); a kv head's keys alone are hd floats of every
// kv_heads * hd, a strided stream, and once a kv head's keys and values outgrow L2 each of
// the heads that share it reads them from memory again. A part takes kDecodePartKeys whole
// rows and every head over them, so each thread reads the cache front to back; the parts'
// softmax pieces are merged in order, so the result does not depend on the threads that took
// them. From kDecodePartsFrom positions on (tools/bench_attention.py on a Zen 4: level at
// 768, 1.2x at 1024, 1.6x at 1536); below, a task per kv head is as fast or faster.

constexpr int64_t kDecodePartKeys = 64;
constexpr int64_t kDecodePartsFrom = 1024;

// Keys [a, b) for every head of one token (q [heads, hd]): m[h] the part's largest score, s[h]
// the sum of e^(score - m[h]) over the part, acc[h] [hd] the sum of e^(score - m[h]) v_j.
struct DecodePart {
  std::vector<float> m, s, acc, p;
};

void decode_part_avx2(const float* q, int64_t heads, int64_t kv_heads, int64_t hd, const float* k, const float* v,
                      int64_t a, int64_t b, float scale, DecodePart& out) {
  const int64_t rep = heads / kv_heads, kstride = kv_heads * hd, n = b - a;
  out.p.resize(size_t(heads * n));
  out.m.resize(size_t(heads));
  out.s.resize(size_t(heads));
  out.acc.assign(size_t(heads * hd), 0.0f);
  float* p = out.p.data();
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {  // eight rows, every head's scores over them while they are in L1
    const float* kr = k + (a + j) * kstride;
    for (int64_t h = 0; h < heads; ++h) scores8_avx2(q + h * hd, kr + (h / rep) * hd, kstride, hd, vs, p + h * n + j);
  }
  for (; j < n; ++j)
    for (int64_t h = 0; h < heads; ++h)
      p[h * n + j] = dot(q + h * hd, k + (a + j) * kstride + (h / rep) * hd, hd) * scale;
  for (int64_t h = 0; h < heads; ++h) {
    float* ph = p + h * n;
    out.m[size_t(h)] = *std::max_element(ph, ph + n);
    out.s[size_t(h)] = exp_shifted_sum(ph, n, out.m[size_t(h)]);
  }
  for (j = 0; j < n; ++j) {  // the values row by row, every head's weight of the row
    const float* vr = v + (a + j) * kstride;
    for (int64_t h = 0; h < heads; ++h) {
      const __m256 pj = _mm256_set1_ps(p[h * n + j]);
      const float* vg = vr + (h / rep) * hd;
      float* o = &out.acc[size_t(h * hd)];
      for (int64_t c = 0; c < hd; c += 8)
        _mm256_storeu_ps(o + c, _mm256_fmadd_ps(pj, _mm256_loadu_ps(vg + c), _mm256_loadu_ps(o + c)));
    }
  }
}

// attention() for T == 1 (hd % 8 == 0): the token at position `start` over keys j0..start.
void decode_attention_avx2(const float* q, int64_t heads, int64_t hd, const float* k, const float* v,
                           int64_t kv_heads, int64_t start, int64_t window, const float* sinks, float* out) {
  const int64_t j0 = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0, n = start + 1 - j0;
  const int64_t parts = (n + kDecodePartKeys - 1) / kDecodePartKeys;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<DecodePart> part(static_cast<size_t>(parts));
  ThreadPool::instance().parallel_for(parts, [&](int64_t i) {
    const int64_t a = j0 + i * kDecodePartKeys;
    decode_part_avx2(q, heads, kv_heads, hd, k, v, a, std::min(j0 + n, a + kDecodePartKeys), scale, part[size_t(i)]);
  });
  for (int64_t h = 0; h < heads; ++h) {  // merge the parts in order: with sinks, head h's sink logit
    float mx = sinks ? sinks[h] : -std::numeric_limits<float>::infinity();  // joins the max and the sum
    for (const DecodePart& d : part) mx = std::max(mx, d.m[size_t(h)]);
    float sum = sinks ? std::exp(sinks[h] - mx) : 0.0f;
    float* o = out + h * hd;
    std::fill(o, o + hd, 0.0f);
    for (const DecodePart& d : part) {
      const float f = std::exp(d.m[size_t(h)] - mx);
      sum += f * d.s[size_t(h)];
      axpy(f, &d.acc[size_t(h * hd)], o, hd);
    }
    const float inv = 1.0f / sum;
    for (int64_t c = 0; c < hd; ++c) o[c] *= inv;
  }
}

// Tokens [t0, t1) of the prompt, kv head g (hd % 8 == 0): q [T, heads, hd], k and v [S,
// kv_heads, hd] -> out rows of those tokens and of the heads that share g; sinks [heads] or
// nullptr (a logit per head in each softmax's max and sum, with no value). buf: scratch.
void attention_block_avx2(const float* q, int64_t t0, int64_t t1, int64_t g, int64_t heads, int64_t hd,
                          const float* k, const float* v, int64_t kv_heads, int64_t start, int64_t window,
                          const float* sinks, float* out, std::vector<float>& buf) {
  const int64_t rep = heads / kv_heads, kstride = kv_heads * hd, nq = (t1 - t0) * rep;
  const int64_t last = start + t1 - 1;
  const int64_t j0 = window > 0 ? std::max<int64_t>(0, start + t0 - window + 1) : 0, n = last + 1 - j0;
  const int64_t n8 = (n + 7) / 8 * 8;
  const float scale = 1.0f / std::sqrt(float(hd));
  buf.resize(size_t(nq * n8 + hd * 8));
  float* s = buf.data();  // [nq][n8] scores, then probabilities
  float* kt = s + nq * n8;
  const float* kg = k + j0 * kstride + g * hd;
  const float* vg = v + j0 * kstride + g * hd;
  std::vector<const float*> qrow(static_cast<size_t>(nq));
  std::vector<float*> orow(static_cast<size_t>(nq));
  std::vector<int64_t> lo(static_cast<size_t>(nq)), hi(static_cast<size_t>(nq));  // each row's keys [lo, hi), relative to j0
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = t0 + i / rep, h = g * rep + i % rep, pos = start + t;
    qrow[size_t(i)] = q + (t * heads + h) * hd;
    orow[size_t(i)] = out + (t * heads + h) * hd;
    lo[size_t(i)] = (window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0) - j0;
    hi[size_t(i)] = pos + 1 - j0;
  }
  // scores: 8 keys transposed into kt once, then every query row over them
  for (int64_t jb = 0; jb < n; jb += 8) {
    const int64_t m = std::min<int64_t>(8, n - jb);
    for (int64_t c = 0; c < hd; c += 8) {
      __m256 r[8];
      for (int l = 0; l < 8; ++l) r[l] = l < m ? _mm256_loadu_ps(kg + (jb + l) * kstride + c) : _mm256_setzero_ps();
      transpose8_ps(r);
      for (int l = 0; l < 8; ++l) _mm256_storeu_ps(kt + (c + l) * 8, r[l]);
    }
    int64_t i = 0;
    for (; i + kScoreRows <= nq; i += kScoreRows)
      scores_tile<kScoreRows>(&qrow[size_t(i)], kt, hd, scale, s + i * n8 + jb, n8);
    for (; i < nq; ++i) scores_tile<1>(&qrow[size_t(i)], kt, hd, scale, s + i * n8 + jb, n8);
  }
  // softmax over each row's own keys; zero elsewhere, so a pass over the union adds nothing
  std::vector<const float*> prow(static_cast<size_t>(nq));
  for (int64_t i = 0; i < nq; ++i) {
    float* si = s + i * n8;
    const int64_t a = lo[size_t(i)], b = hi[size_t(i)];
    const float mx = *std::max_element(si + a, si + b);
    float sum;
    if (sinks) {
      const float sink = sinks[g * rep + i % rep], m = std::max(mx, sink);
      sum = exp_shifted_sum(si + a, b - a, m) + std::exp(sink - m);
    } else {
      sum = exp_shifted_sum(si + a, b - a, mx);
    }
    const float inv = 1.0f / sum;
    for (int64_t j = a; j < b; ++j) si[j] *= inv;
    std::fill(si, si + a, 0.0f);
    std::fill(si + b, si + n8, 0.0f);
    prow[size_t(i)] = si;
  }
  int64_t i = 0;
  for (; i + kPvRows <= nq; i += kPvRows) {
    const int64_t a = *std::min_element(&lo[size_t(i)], &lo[size_t(i)] + kPvRows);
    const int64_t b = *std::max_element(&hi[size_t(i)], &hi[size_t(i)] + kPvRows);
    pv_rows<kPvRows>(&prow[size_t(i)], vg, kstride, a, b, hd, &orow[size_t(i)]);
  }
  for (; i < nq; ++i) pv_rows<1>(&prow[size_t(i)], vg, kstride, lo[size_t(i)], hi[size_t(i)], hd, &orow[size_t(i)]);
}

}  // namespace
#endif

#if defined(EDGEMOE_DENSE_NEON)
namespace {

// p[j] = scale * q . k_j for n keys k_j = k + j * kstride (hd floats, hd % 4 == 0): eight keys
// at a time, their partial-sum vectors reduced pairwise into two vectors of scores.
void scores_neon(const float* q, const float* k, int64_t kstride, int64_t n, int64_t hd, float scale, float* p) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    float32x4_t acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = vdupq_n_f32(0);
    for (int64_t c = 0; c < hd; c += 4) {
      const float32x4_t qc = vld1q_f32(q + c);
      for (int u = 0; u < 8; ++u) acc[u] = vfmaq_f32(acc[u], qc, vld1q_f32(k + (j + u) * kstride + c));
    }
    const float32x4_t s0 = vpaddq_f32(vpaddq_f32(acc[0], acc[1]), vpaddq_f32(acc[2], acc[3]));
    const float32x4_t s1 = vpaddq_f32(vpaddq_f32(acc[4], acc[5]), vpaddq_f32(acc[6], acc[7]));
    vst1q_f32(p + j, vmulq_n_f32(s0, scale));
    vst1q_f32(p + j + 4, vmulq_n_f32(s1, scale));
  }
  for (; j < n; ++j) p[j] = dot(q, k + j * kstride, hd) * scale;
}

// o = sum_j p[j] * v_j over n value rows v_j = v + j * vstride (hd floats, hd % 4 == 0), in
// blocks of 64 columns held in 16 registers across all j.
void weighted_sum_neon(const float* p, const float* v, int64_t vstride, int64_t n, int64_t hd, float* o) {
  for (int64_t c = 0; c < hd; c += 64) {
    const int w = int(std::min<int64_t>(16, (hd - c) / 4));
    float32x4_t acc[16];
    for (int u = 0; u < 16; ++u) acc[u] = vdupq_n_f32(0);
    if (w == 16) {
      for (int64_t j = 0; j < n; ++j) {
        const float* vj = v + j * vstride + c;
        for (int u = 0; u < 16; ++u) acc[u] = vfmaq_n_f32(acc[u], vld1q_f32(vj + 4 * u), p[j]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float* vj = v + j * vstride + c;
        for (int u = 0; u < w; ++u) acc[u] = vfmaq_n_f32(acc[u], vld1q_f32(vj + 4 * u), p[j]);
      }
    }
    for (int u = 0; u < w; ++u) vst1q_f32(o + c + 4 * u, acc[u]);
  }
}

}  // namespace
#endif

void attention(const float* q, int64_t T, int64_t heads, int64_t hd, const float* k, const float* v, int64_t S,
               int64_t kv_heads, int64_t start, int64_t window, float* out, const float* sinks) {
  // q [T, heads, hd]; k, v [S, kv_heads, hd]; sinks [heads] or nullptr; out [T, heads, hd]
  assert(heads % kv_heads == 0 && S == start + T);
  const int64_t rep = heads / kv_heads, kstride = kv_heads * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  // One task per (token, kv head): the `rep` query heads that share a kv head, one after
  // another while that head's keys and values are in cache.
  // p [n] scores of head h -> exp(p - m) in place, returning their sum; with sinks, head h's sink
  // logit takes part in the max m and the sum (its probability is dropped: no value of its own)
  auto softmax_sum = [&](std::vector<float>& p, int64_t n, int64_t h) {
    const float mx = *std::max_element(p.begin(), p.begin() + n);
    if (!sinks) return exp_shifted_sum(p.data(), n, mx);
    const float m = std::max(mx, sinks[h]);
    return exp_shifted_sum(p.data(), n, m) + std::exp(sinks[h] - m);
  };
  auto group = [&](int64_t i, std::vector<float>& p) {  // i = t * kv_heads + g
    const int64_t t = i / kv_heads, g = i % kv_heads, pos = start + t;
    const int64_t j0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, n = pos + 1 - j0;
    const float* kg = k + j0 * kstride + g * hd;
    const float* vg = v + j0 * kstride + g * hd;
    p.resize(size_t(n));
    for (int64_t r = 0; r < rep; ++r) {
      const int64_t h = g * rep + r;
      const float* qi = q + (t * heads + h) * hd;
      float* o = out + (t * heads + h) * hd;
#if defined(EDGEMOE_DENSE_AVX2)
      if (hd % 8 == 0) {
        scores_avx2(qi, kg, kstride, n, hd, scale, p.data());
        const float inv = 1.0f / softmax_sum(p, n, h);
        for (float& e : p) e *= inv;
        weighted_sum_avx2(p.data(), vg, kstride, n, hd, o);
        continue;
      }
#elif defined(EDGEMOE_DENSE_NEON)
      if (hd % 4 == 0) {
        scores_neon(qi, kg, kstride, n, hd, scale, p.data());
        const float inv = 1.0f / softmax_sum(p, n, h);
        for (float& e : p) e *= inv;
        weighted_sum_neon(p.data(), vg, kstride, n, hd, o);
        continue;
      }
#endif
      for (int64_t j = 0; j < n; ++j) p[size_t(j)] = dot(qi, kg + j * kstride, hd) * scale;
      const float inv = 1.0f / softmax_sum(p, n, h);
      std::fill(o, o + hd, 0.0f);
      for (int64_t j = 0; j < n; ++j) axpy(p[size_t(j)] * inv, vg + j * kstride, o, hd);
    }
  };
#if defined(EDGEMOE_DENSE_AVX2)
  if (T > 1 && hd % 8 == 0) {  // the prompt: blocks of tokens per kv head
    const int64_t blocks = (T + kQueryBlock - 1) / kQueryBlock, n = blocks * kv_heads;
    auto block = [&](int64_t i, std::vector<float>& buf) {
      const int64_t b = i / kv_heads, t0 = b * kQueryBlock;
      attention_block_avx2(q, t0, std::min(T, t0 + kQueryBlock), i % kv_heads, heads, hd, k, v, kv_heads, start,
                           window, sinks, out, buf);
    };
    if (T * heads * S * hd < (int64_t(1) << 18) || n == 1) {
      std::vector<float> buf;
      for (int64_t i = 0; i < n; ++i) block(i, buf);
    } else {
      ThreadPool::instance().parallel_for(n, [&](int64_t i) {
        std::vector<float> buf;
        block(i, buf);
      });
    }
    return;
  }
  if (T == 1 && hd % 8 == 0 && std::min(S, window > 0 ? window : S) >= kDecodePartsFrom) {  // a long cache
    decode_attention_avx2(q, heads, hd, k, v, kv_heads, start, window, sinks, out);
    return;
  }
#endif
  const int64_t tasks = T * kv_heads;
  // Worth a hand-over to the pool from a few dozen positions on: the threads are spinning
  // between the decode step's matmuls, and serial attention leaves one of them idle.
  if (T * heads * S * hd < (int64_t(1) << 15) || tasks == 1) {
    std::vector<float> p;
    for (int64_t i = 0; i < tasks; ++i) group(i, p);
    return;
  }
  ThreadPool::instance().parallel_for(tasks, [&](int64_t i) {
    std::vector<float> p;
    group(i, p);
  });
}

void softmax_topk(const float* logits, int64_t T, int64_t E, int64_t K, bool normalize, int32_t* ids, float* weights) {
  assert(K >= 1 && K <= E);
  std::vector<float> p(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    const float mx = *std::max_element(l, l + E);
    float sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (p[size_t(e)] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < E; ++e) {
      p[size_t(e)] /= sum;
      order[size_t(e)] = int32_t(e);
    }
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) {
      return p[size_t(a)] > p[size_t(b)] || (p[size_t(a)] == p[size_t(b)] && a < b);
    });
    float wsum = 0;
    for (int64_t j = 0; j < K; ++j) wsum += p[size_t(order[size_t(j)])];
    for (int64_t j = 0; j < K; ++j) {
      const int32_t e = order[size_t(j)];
      ids[t * K + j] = e;
      weights[t * K + j] = normalize ? p[size_t(e)] / wsum : p[size_t(e)];
    }
  }
}

namespace {

// Keep (in token-id order) the m values of w over idx that are above `cut`, or equal to it
// while fewer than m are kept (ties at the cut go by the lower id).
void keep_from(std::vector<int32_t>& idx, std::vector<float>& w, size_t m, float cut) {
  size_t above = 0;
  for (float x : w) above += x > cut;
  size_t ties = m - std::min(m, above), out = 0;
  for (size_t i = 0; i < idx.size(); ++i) {
    const bool at = w[i] == cut && ties > 0;
    if (w[i] > cut || at) {
      ties -= at;
      idx[out] = idx[i];
      w[out] = w[i];
      ++out;
    }
  }
  idx.resize(out);
  w.resize(out);
}

// The m largest of w over idx, ties at the cut by the lower id, in token-id order.
void keep_largest(std::vector<int32_t>& idx, std::vector<float>& w, size_t m) {
  if (m >= idx.size()) return;
  std::vector<float> tmp(w);
  std::nth_element(tmp.begin(), tmp.begin() + ptrdiff_t(m - 1), tmp.end(), std::greater<float>());
  keep_from(idx, w, m, tmp[m - 1]);
}

// The nucleus of w (all >= 0): its size, the shortest prefix of w sorted descending whose
// share of the sum reaches top_p, and its smallest value (size w.size() when rounding keeps
// the whole share below top_p). For w >= 0 a float's bits order like its value, so bits >> 18
// (the exponent and the top 5 mantissa bits) buckets w by value within 1/32 of an octave.
// Summing the buckets from the top finds the one the cut falls in; only that bucket's
// values are sorted.
std::pair<size_t, float> nucleus(const std::vector<float>& w, double top_p) {
  constexpr unsigned kShift = 18;
  const size_t buckets = size_t(f32_to_bits(std::numeric_limits<float>::infinity()) >> kShift) + 1;
  std::vector<double> mass(buckets, 0.0);
  std::vector<uint32_t> count(buckets, 0);
  double total = 0;
  for (float x : w) {
    const size_t b = f32_to_bits(x) >> kShift;
    mass[b] += x;
    count[b] += 1;
    total += x;
  }
  const double need = top_p * total;
  double c = 0;
  size_t kept = 0;
  for (size_t b = buckets; b-- > 0;) {
    if (!count[b]) continue;
    if (c + mass[b] >= need || b == 0) {
      std::vector<float> in;
      in.reserve(count[b]);
      for (float x : w)
        if ((f32_to_bits(x) >> kShift) == b) in.push_back(x);
      std::sort(in.begin(), in.end(), std::greater<float>());
      for (size_t i = 0; i < in.size(); ++i)
        if ((c += in[i]) >= need) return {kept + i + 1, in[i]};
      return {w.size(), in.back()};  // rounding: the whole share stays below top_p
    }
    c += mass[b];
    kept += count[b];
  }
  return {w.size(), 0.0f};
}

}  // namespace

int64_t sample_logits(const float* logits, int64_t n, double temperature, int64_t top_k, double top_p, double u) {
  if (n <= 0) throw std::invalid_argument("sample: no logits");
  if (!(temperature > 0)) throw std::invalid_argument("sample: temperature must be > 0 (0 is greedy: argmax)");
  if (!(top_p > 0 && top_p <= 1)) throw std::invalid_argument("sample: top_p must be in (0, 1]");
  if (top_k < 0) throw std::invalid_argument("sample: top_k must be >= 0");
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::vector<float> w(static_cast<size_t>(n));
  const float inv_t = float(1.0 / temperature);
  int64_t i0 = 0;
#if defined(EDGEMOE_DENSE_NEON)
  // The vocabulary-long pass, four at a time; a block holding NaN or +inf goes to the
  // scalar loop below, which names the logit.
  const float32x4_t vt = vdupq_n_f32(inv_t), inf = vdupq_n_f32(std::numeric_limits<float>::infinity());
  int32x4_t id = {0, 1, 2, 3};
  for (; i0 + 4 <= n; i0 += 4, id = vaddq_s32(id, vdupq_n_s32(4))) {
    const float32x4_t z = vmulq_f32(vld1q_f32(logits + i0), vt);
    const uint32x4_t ok = vandq_u32(vceqq_f32(z, z), vmvnq_u32(vceqq_f32(z, inf)));
    if (vminvq_u32(ok) == 0) break;
    vst1q_f32(&w[size_t(i0)], z);
    vst1q_s32(&idx[size_t(i0)], id);
  }
#endif
  for (int64_t i = i0; i < n; ++i) {
    idx[size_t(i)] = int32_t(i);
    w[size_t(i)] = logits[i] * inv_t;  // z for now
    if (std::isnan(w[size_t(i)]) || w[size_t(i)] == std::numeric_limits<float>::infinity())
      throw std::invalid_argument("sample: logit " + std::to_string(i) + " is " + std::to_string(logits[i]) +
                                  " after dividing by the temperature: logits must be finite or -inf");
  }
  const float zmax = *std::max_element(w.begin(), w.end());
  if (zmax == -std::numeric_limits<float>::infinity())
    throw std::invalid_argument("sample: every logit is -inf: no token can be drawn");
  if (top_k > 0) keep_largest(idx, w, size_t(top_k));
  exp_shifted_sum(w.data(), int64_t(w.size()), zmax);  // -inf (a masked token) gives weight 0
  if (top_p < 1) {
    const auto [m, cut] = nucleus(w, top_p);
    if (m < w.size()) keep_from(idx, w, m, cut);
  }
  double c_last = 0;
  for (float x : w) c_last += x;
  const double target = u * c_last;
  double c = 0;
  for (size_t i = 0; i < w.size(); ++i)
    if ((c += w[i]) > target) return idx[i];
  return idx.back();  // not reached: for u < 1, u * c_last rounds below c_last
}

}  // namespace edgemoe
