#include "dense.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "threadpool.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define EDGEMOE_DENSE_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define EDGEMOE_DENSE_NEON 1  // baseline on aarch64: no run-time choice needed
#endif

namespace edgemoe {

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // infinity, NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // rebias 15 -> 127
  } else {
    float f = float(man) * 0x1p-24f;  // zero, subnormal: man * 2^-24 exactly
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  bits &= 0x7fffffffu;
  if (bits > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN (quiet)
  if (bits >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // |x| >= 65520 rounds to infinity
  if (bits < 0x38800000u) {                                  // below 2^-14: a subnormal half (or zero)
    float a;
    std::memcpy(&a, &bits, 4);
    return uint16_t(sign | uint16_t(std::nearbyint(a * 0x1p24f)));  // units of 2^-24, ties to even
  }
  // a normal half: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest,
  // ties to the even mantissa (a carry into the exponent is the right result)
  const uint32_t odd = (bits >> 13) & 1u;
  return uint16_t(sign | ((bits - (112u << 23) + 0xfffu + odd) >> 13));
}

void floats_to_halves(const float* x, int64_t n, uint16_t* y) {
  int64_t i = 0;
#if defined(EDGEMOE_DENSE_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(EDGEMOE_DENSE_NEON)
  for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
#endif
  for (; i < n; ++i) y[i] = float_to_half(x[i]);
}

namespace {

// A float16 key or value of the KV cache (KVLayout::half), as a type to choose kernels by.
struct Half {
  uint16_t bits;
};

#if defined(EDGEMOE_DENSE_AVX2)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#elif defined(EDGEMOE_DENSE_NEON)
inline float32x4_t load4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load4(const Half* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(&p->bits))); }
#endif

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

// out[i] = x[i] as float over n values.
inline void widen(const Half* x, int64_t n, float* out) {
  int64_t i = 0;
#if defined(EDGEMOE_DENSE_AVX2)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(x + i));
#elif defined(EDGEMOE_DENSE_NEON)
  for (; i + 4 <= n; i += 4) vst1q_f32(out + i, load4(x + i));
#endif
  for (; i < n; ++i) out[i] = half_to_float(x[i].bits);
}

// A float16 row widened to floats: on the stack up to 512 values (a head_dim), else on the heap.
class WideRow {
 public:
  WideRow(const Half* x, int64_t n) : big_(n > 512 ? size_t(n) : 0) { widen(x, n, data()); }
  float* data() { return big_.empty() ? buf_ : big_.data(); }

 private:
  float buf_[512];
  std::vector<float> big_;
};

// dot() and axpy() over a float16 row: widened first, so the same bits as a float copy gives
// (a row's arithmetic is the float one's, whatever the compiler fuses).
inline float dot(const float* a, const Half* b, int64_t n) { return dot(a, WideRow(b, n).data(), n); }

inline void axpy(float a, const Half* x, float* y, int64_t n) { axpy(a, WideRow(x, n).data(), y, n); }

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
template <class E>
inline void scores8_avx2(const float* q, const E* k, int64_t kstride, int64_t hd, __m256 scale, float* p) {
  __m256 acc[8];
  for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < hd; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qc, load8(k + u * kstride + c), acc[u]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(p, _mm256_mul_ps(sum, scale));
}

// p[j] = scale * q . k_j for n keys k_j = k + j * kstride (hd floats, hd % 8 == 0), eight at a time.
template <class E>
void scores_avx2(const float* q, const E* k, int64_t kstride, int64_t n, int64_t hd, float scale, float* p) {
  int64_t j = 0;
  const __m256 vs = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) scores8_avx2(q, k + j * kstride, kstride, hd, vs, p + j);
  for (; j < n; ++j) p[j] = dot(q, k + j * kstride, hd) * scale;
}

// o = sum_j p[j] * v_j over n value rows v_j = v + j * vstride (hd floats, hd % 8 == 0), in
// blocks of 64 columns held in registers across all j.
template <class E>
void weighted_sum_avx2(const float* p, const E* v, int64_t vstride, int64_t n, int64_t hd, float* o) {
  for (int64_t c = 0; c < hd; c += 64) {
    const int w = int(std::min<int64_t>(8, (hd - c) / 8));
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    if (w == 8) {
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const E* vj = v + j * vstride + c;
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(pj, load8(vj + 8 * u), acc[u]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const E* vj = v + j * vstride + c;
        for (int u = 0; u < w; ++u) acc[u] = _mm256_fmadd_ps(pj, load8(vj + 8 * u), acc[u]);
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
template <int R, int W, class E>
inline void pv_tile(const float* const* p, const E* v, int64_t vstride, int64_t ja, int64_t jb, int64_t c0,
                    float* const* o) {
  __m256 acc[R][W];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < W; ++u) acc[i][u] = _mm256_setzero_ps();
  for (int64_t j = ja; j < jb; ++j) {
    __m256 vj[W];
    for (int u = 0; u < W; ++u) vj[u] = load8(v + j * vstride + c0 + 8 * u);
    for (int i = 0; i < R; ++i) {
      const __m256 pj = _mm256_broadcast_ss(p[i] + j);
      for (int u = 0; u < W; ++u) acc[i][u] = _mm256_fmadd_ps(pj, vj[u], acc[i][u]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < W; ++u) _mm256_storeu_ps(o[i] + c0 + 8 * u, acc[i][u]);
}

template <int R, class E>
void pv_rows(const float* const* p, const E* v, int64_t vstride, int64_t ja, int64_t jb, int64_t hd, float* const* o) {
  int64_t c = 0;
  for (; c + 32 <= hd; c += 32) pv_tile<R, 4, E>(p, v, vstride, ja, jb, c, o);
  for (; c < hd; c += 8) pv_tile<R, 1, E>(p, v, vstride, ja, jb, c, o);
}

// Tokens [t0, t1) of the prompt, kv head g (hd % 8 == 0): q [T, heads, hd], k and v [S,
// kv_heads, hd] as kv says -> out rows of those tokens and of the heads that share g; sinks
// [heads] or nullptr (a logit per head in each softmax's max and sum, with no value). buf: scratch.
template <class E>
void attention_block_avx2(const float* q, int64_t t0, int64_t t1, int64_t g, int64_t heads, int64_t hd, const E* k,
                          const E* v, KVLayout kv, int64_t kv_heads, int64_t start, int64_t window, const float* sinks,
                          float* out, std::vector<float>& buf) {
  const int64_t rep = heads / kv_heads, kstride = kv.pos, nq = (t1 - t0) * rep;
  const int64_t last = start + t1 - 1;
  const int64_t j0 = window > 0 ? std::max<int64_t>(0, start + t0 - window + 1) : 0, n = last + 1 - j0;
  const int64_t n8 = (n + 7) / 8 * 8;
  const float scale = 1.0f / std::sqrt(float(hd));
  buf.resize(size_t(nq * n8 + hd * 8));
  float* s = buf.data();  // [nq][n8] scores, then probabilities
  float* kt = s + nq * n8;
  const E* kg = k + j0 * kstride + g * kv.head;
  const E* vg = v + j0 * kstride + g * kv.head;
  std::vector<const float*> qrow(static_cast<size_t>(nq));
  std::vector<float*> orow(static_cast<size_t>(nq));
  // each row's keys [lo, hi), relative to j0
  std::vector<int64_t> lo(static_cast<size_t>(nq)), hi(static_cast<size_t>(nq));
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
      for (int l = 0; l < 8; ++l) r[l] = l < m ? load8(kg + (jb + l) * kstride + c) : _mm256_setzero_ps();
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
template <class E>
void scores_neon(const float* q, const E* k, int64_t kstride, int64_t n, int64_t hd, float scale, float* p) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    float32x4_t acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = vdupq_n_f32(0);
    for (int64_t c = 0; c < hd; c += 4) {
      const float32x4_t qc = vld1q_f32(q + c);
      for (int u = 0; u < 8; ++u) acc[u] = vfmaq_f32(acc[u], qc, load4(k + (j + u) * kstride + c));
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
template <class E>
void weighted_sum_neon(const float* p, const E* v, int64_t vstride, int64_t n, int64_t hd, float* o) {
  for (int64_t c = 0; c < hd; c += 64) {
    const int w = int(std::min<int64_t>(16, (hd - c) / 4));
    float32x4_t acc[16];
    for (int u = 0; u < 16; ++u) acc[u] = vdupq_n_f32(0);
    if (w == 16) {
      for (int64_t j = 0; j < n; ++j) {
        const E* vj = v + j * vstride + c;
        for (int u = 0; u < 16; ++u) acc[u] = vfmaq_n_f32(acc[u], load4(vj + 4 * u), p[j]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const E* vj = v + j * vstride + c;
        for (int u = 0; u < w; ++u) acc[u] = vfmaq_n_f32(acc[u], load4(vj + 4 * u), p[j]);
      }
    }
    for (int u = 0; u < w; ++u) vst1q_f32(o + c + 4 * u, acc[u]);
  }
}

}  // namespace
#endif

namespace {

// p[j] = scale * q . k_j for n keys k_j = k + j * kstride (hd floats).
template <class E>
inline void head_scores(const float* q, const E* k, int64_t kstride, int64_t n, int64_t hd, float scale, float* p) {
#if defined(EDGEMOE_DENSE_AVX2)
  if (hd % 8 == 0) return scores_avx2(q, k, kstride, n, hd, scale, p);
#elif defined(EDGEMOE_DENSE_NEON)
  if (hd % 4 == 0) return scores_neon(q, k, kstride, n, hd, scale, p);
#endif
  for (int64_t j = 0; j < n; ++j) p[j] = dot(q, k + j * kstride, hd) * scale;
}

// o = sum_j p[j] v_j over n value rows v_j = v + j * vstride (hd floats).
template <class E>
inline void head_values(const float* p, const E* v, int64_t vstride, int64_t n, int64_t hd, float* o) {
#if defined(EDGEMOE_DENSE_AVX2)
  if (hd % 8 == 0) return weighted_sum_avx2(p, v, vstride, n, hd, o);
#elif defined(EDGEMOE_DENSE_NEON)
  if (hd % 4 == 0) return weighted_sum_neon(p, v, vstride, n, hd, o);
#endif
  std::fill(o, o + hd, 0.0f);
  for (int64_t j = 0; j < n; ++j) axpy(p[j], v + j * vstride, o, hd);
}

// ---- one token's attention (T == 1): the token at position `start` over keys j0..start. Each
// kv head's keys are cut into parts of kDecodePartKeys; a task takes one part of one kv head
// and every query head that shares it, one after another while the part's keys and values are
// in L2 (kv head major, the decode cache's layout, makes the part one contiguous stream per
// array), and leaves per query head the part's largest score m, the sum s of e^(score - m)
// and the e^(score - m)-weighted sum of its values. The parts are merged in order, so the
// result does not depend on the threads that took them, and a few kv heads still make work
// for every thread once the cache is long.
constexpr int64_t kDecodePartKeys = 512;

template <class E>
void decode_attention(const float* q, int64_t heads, int64_t hd, const E* k, const E* v, KVLayout kv, int64_t kv_heads,
                      int64_t start, int64_t window, const float* sinks, float* out) {
  const int64_t rep = heads / kv_heads;
  const int64_t j0 = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0, n = start + 1 - j0;
  const int64_t parts = (n + kDecodePartKeys - 1) / kDecodePartKeys, tasks = parts * kv_heads;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<float> m(size_t(parts * heads)), s(m.size()), acc(m.size() * size_t(hd));
  auto task = [&](int64_t i) {  // i = part * kv_heads + g
    const int64_t part = i / kv_heads, g = i % kv_heads, a = j0 + part * kDecodePartKeys;
    const int64_t len = std::min(start + 1, a + kDecodePartKeys) - a;
    const E* kg = k + a * kv.pos + g * kv.head;
    const E* vg = v + a * kv.pos + g * kv.head;
    thread_local std::vector<float> p;
    p.resize(size_t(len));
    for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
      const size_t at = size_t(part * heads + h);
      head_scores(q + h * hd, kg, kv.pos, len, hd, scale, p.data());
      m[at] = *std::max_element(p.begin(), p.end());
      s[at] = exp_shifted_sum(p.data(), len, m[at]);
      head_values(p.data(), vg, kv.pos, len, hd, &acc[at * size_t(hd)]);
    }
  };
  // Worth a hand-over to the pool from a few dozen positions on: the threads are spinning
  // between the decode step's matmuls, and serial attention leaves one of them idle.
  if (heads * n * hd < (int64_t(1) << 15) || tasks == 1) {
    for (int64_t i = 0; i < tasks; ++i) task(i);
  } else {
    ThreadPool::instance().parallel_for(tasks, task);
  }
  for (int64_t h = 0; h < heads; ++h) {  // merge the parts in order: with sinks, head h's sink logit
    float mx = sinks ? sinks[h] : -std::numeric_limits<float>::infinity();  // joins the max and the sum
    for (int64_t part = 0; part < parts; ++part) mx = std::max(mx, m[size_t(part * heads + h)]);
    float sum = sinks ? std::exp(sinks[h] - mx) : 0.0f;
    float* o = out + h * hd;
    std::fill(o, o + hd, 0.0f);
    for (int64_t part = 0; part < parts; ++part) {
      const size_t at = size_t(part * heads + h);
      const float f = std::exp(m[at] - mx);
      sum += f * s[at];
      axpy(f, &acc[at * size_t(hd)], o, hd);
    }
    const float inv = 1.0f / sum;
    for (int64_t c = 0; c < hd; ++c) o[c] *= inv;
  }
}

// attention() with keys and values stored as E.
template <class E>
void attention_kv(const float* q, int64_t T, int64_t heads, int64_t hd, const E* k, const E* v, int64_t S,
                  int64_t kv_heads, int64_t start, int64_t window, float* out, const float* sinks, KVLayout kv) {
  if (T == 1) {
    decode_attention(q, heads, hd, k, v, kv, kv_heads, start, window, sinks, out);
    return;
  }
#if defined(EDGEMOE_DENSE_AVX2)
  if (hd % 8 == 0) {  // the prompt: blocks of tokens per kv head
    const int64_t blocks = (T + kQueryBlock - 1) / kQueryBlock, n = blocks * kv_heads;
    auto block = [&](int64_t i, std::vector<float>& buf) {
      const int64_t b = i / kv_heads, t0 = b * kQueryBlock;
      attention_block_avx2(q, t0, std::min(T, t0 + kQueryBlock), i % kv_heads, heads, hd, k, v, kv, kv_heads, start,
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
#endif
  // The prompt otherwise: one task per (token, kv head), the `rep` query heads that share the
  // kv head one after another while its keys and values are in cache. With sinks, head h's sink
  // logit takes part in the softmax's max and sum (its probability is dropped: no value of its own).
  const int64_t rep = heads / kv_heads, tasks = T * kv_heads;
  const float scale = 1.0f / std::sqrt(float(hd));
  auto group = [&](int64_t i, std::vector<float>& p) {  // i = t * kv_heads + g
    const int64_t t = i / kv_heads, g = i % kv_heads, pos = start + t;
    const int64_t j0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, n = pos + 1 - j0;
    const E* kg = k + j0 * kv.pos + g * kv.head;
    const E* vg = v + j0 * kv.pos + g * kv.head;
    p.resize(size_t(n));
    for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
      head_scores(q + (t * heads + h) * hd, kg, kv.pos, n, hd, scale, p.data());
      float mx = *std::max_element(p.begin(), p.end());
      if (sinks) mx = std::max(mx, sinks[h]);
      const float sum = exp_shifted_sum(p.data(), n, mx) + (sinks ? std::exp(sinks[h] - mx) : 0.0f);
      const float inv = 1.0f / sum;
      for (float& e : p) e *= inv;
      head_values(p.data(), vg, kv.pos, n, hd, out + (t * heads + h) * hd);
    }
  };
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

}  // namespace

void attention(const float* q, int64_t T, int64_t heads, int64_t hd, const void* k, const void* v, int64_t S,
               int64_t kv_heads, int64_t start, int64_t window, float* out, const float* sinks, KVLayout kv) {
  // q [T, heads, hd]; k, v [S, kv_heads, hd] as kv says; sinks [heads] or nullptr; out [T, heads, hd]
  assert(heads % kv_heads == 0 && S == start + T);
  if (kv.pos == 0) kv.pos = kv_heads * hd, kv.head = hd;
  if (kv.half)
    attention_kv(q, T, heads, hd, static_cast<const Half*>(k), static_cast<const Half*>(v), S, kv_heads, start, window,
                 out, sinks, kv);
  else
    attention_kv(q, T, heads, hd, static_cast<const float*>(k), static_cast<const float*>(v), S, kv_heads, start,
                 window, out, sinks, kv);
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
