#include "dense.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <vector>

#include "threadpool.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EDGEMOE_DENSE_AVX2 1
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
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

void rms_norm(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* y) {
  assert(n > 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(xr[i]) * double(xr[i]);
    const float denom = std::sqrt(float(ss / double(n)) + eps);
    for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] / denom) * w[i];
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
      for (int64_t i = 0; i < half; ++i) {
        const float c = cs[size_t(i)], s = cs[size_t(half + i)], x1 = v[i], x2 = v[half + i];
        v[i] = x1 * c - x2 * s;
        v[half + i] = x2 * c + x1 * s;
      }
    }
  }
}

void attention(const float* q, int64_t T, int64_t heads, int64_t hd, const float* k, const float* v, int64_t S,
               int64_t kv_heads, int64_t start, int64_t window, float* out) {
  // q [T, heads, hd]; k, v [S, kv_heads, hd]; out [T, heads, hd]
  assert(heads % kv_heads == 0 && S == start + T);
  const int64_t rep = heads / kv_heads, kstride = kv_heads * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  auto one = [&](int64_t i, std::vector<float>& p) {  // i = t * heads + h
    const int64_t t = i / heads, h = i % heads, kh = h / rep, pos = start + t;
    const int64_t j0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, j1 = pos + 1;
    const float* qi = q + i * hd;
    p.resize(size_t(j1 - j0));
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = j0; j < j1; ++j) {
      const float s = dot(qi, k + j * kstride + kh * hd, hd) * scale;
      p[size_t(j - j0)] = s;
      mx = std::max(mx, s);
    }
    float sum = 0;
    for (float& e : p) sum += (e = std::exp(e - mx));
    float* o = out + i * hd;
    std::fill(o, o + hd, 0.0f);
    for (int64_t j = j0; j < j1; ++j) axpy(p[size_t(j - j0)] / sum, v + j * kstride + kh * hd, o, hd);
  };
  const int64_t n = T * heads;
  // Worth waking the pool only for long contexts or prefill.
  if (n * S * hd < (int64_t(1) << 18)) {
    std::vector<float> p;
    for (int64_t i = 0; i < n; ++i) one(i, p);
    return;
  }
  ThreadPool::instance().parallel_for(n, [&](int64_t i) {
    std::vector<float> p;
    one(i, p);
  });
}

void softmax_topk(const float* logits, int64_t T, int64_t E, int64_t K, bool normalize, int32_t* ids,
                  float* weights) {
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

}  // namespace edgemoe
