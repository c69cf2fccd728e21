// Native tests, no framework: kernels vs a scalar reference written from
// docs/format.md, CRC-32C vectors, store/cache on a temp file, and a multithreaded
// cache test for ASan/UBSan and TSan builds (see native/run_sanitized_tests.sh).
#include <unistd.h>
#if defined(__linux__)
#include <fcntl.h>
#include <sys/socket.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cache.h"
#include "common.h"
#include "crc32c.h"
#include "dense.h"
#include "kernels.h"
#include "kernels_impl.h"
#include "layer.h"
#include "linkswitch.h"
#include "moe.h"
#include "policy.h"
#include "store.h"
#include "threadpool.h"

using namespace edgemoe;

static int g_failures = 0;
#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

template <class E, class F>
static bool throws(F&& f, const char* needle = nullptr) {
  try {
    f();
  } catch (const E& e) {
    if (needle && !std::strstr(e.what(), needle)) {
      std::fprintf(stderr, "message '%s' lacks '%s'\n", e.what(), needle);
      return false;
    }
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

static std::mt19937 rng(42);

// ---------------------------------------------------------------- building matrices

static void put_u32(std::vector<uint8_t>& b, size_t off, uint32_t v) { std::memcpy(&b[off], &v, 4); }
static size_t align64(size_t n) { return (n + 63) / 64 * 64; }

// Random f16 bits in a tame range (|v| in [2^-6, 2^2)).
static uint16_t rand_half() {
  const uint16_t sign = uint16_t((rng() & 1) << 15), exp = uint16_t(9 + rng() % 8), man = uint16_t(rng() % 1024);
  return uint16_t(sign | (exp << 10) | man);
}
static double half_ref(uint16_t h) {  // independent of common.h (normal numbers only)
  const double v = std::ldexp(1.0 + (h & 0x3FF) / 1024.0, ((h >> 10) & 0x1F) - 15);
  return (h & 0x8000) ? -v : v;
}

struct TestMatrix {
  std::vector<uint8_t> buf;
  std::vector<double> w;  // dequantized [rows, cols], reference
  uint32_t rows, cols;
  std::vector<double> mins;  // the min part of w (kinds 3, 4), for the int16-activation reference
};

// Group-quantized matrix with random codes/scales/mins, packed per docs/format.md: kind 3,
// or with sym kind 4 (no mins section, min = -2^(bits-1) * scale).
static TestMatrix make_quant(uint32_t rows, uint32_t cols, uint32_t bits, uint32_t gs, bool sym = false) {
  TestMatrix m{{}, std::vector<double>(size_t(rows) * cols), rows, cols, std::vector<double>(size_t(rows) * cols)};
  const uint32_t ng = cols / gs, cb = bits * 4;
  const size_t codes = 64, codes_bytes = size_t(rows) * (cols / 32) * cb;
  const size_t scales = align64(codes + codes_bytes), mins = sym ? 0 : align64(scales + 2 * size_t(rows) * ng);
  const size_t total = (sym ? scales : mins) + 2 * size_t(rows) * ng;
  m.buf.assign(total, 0);
  put_u32(m.buf, 0, rows);
  put_u32(m.buf, 4, cols);
  m.buf[8] = sym ? 4 : 3;
  m.buf[9] = uint8_t(bits);
  put_u32(m.buf, 12, gs);
  put_u32(m.buf, 16, uint32_t(codes));
  put_u32(m.buf, 20, uint32_t(scales));
  put_u32(m.buf, 24, uint32_t(mins));
  put_u32(m.buf, 28, uint32_t(total));
  for (uint32_t r = 0; r < rows; ++r) {
    std::vector<uint16_t> sc(ng), mn(ng);
    for (uint32_t g = 0; g < ng; ++g) {
      sc[g] = rand_half();
      mn[g] = rand_half();
      std::memcpy(&m.buf[scales + 2 * (size_t(r) * ng + g)], &sc[g], 2);
      if (!sym) std::memcpy(&m.buf[mins + 2 * (size_t(r) * ng + g)], &mn[g], 2);
    }
    for (uint32_t c0 = 0; c0 < cols; c0 += 32) {
      uint8_t v[32];
      for (auto& x : v) x = uint8_t(rng() % (1u << bits));
      uint8_t* p = &m.buf[codes + size_t(r) * (cols / 32) * cb + (c0 / 32) * cb];
      for (int j = 0; j < 32; ++j) {
        // bit-by-bit placement straight from the spec's wording
        if (bits == 8) p[j] = v[j];
        if (bits == 4) p[j % 16] = uint8_t(p[j % 16] | (v[j] << (4 * (j / 16))));
        if (bits == 2 || bits == 3) p[j % 8] = uint8_t(p[j % 8] | ((v[j] & 3) << (2 * (j / 8))));
        if (bits == 3) p[8 + j / 8] = uint8_t(p[8 + j / 8] | (((v[j] >> 2) & 1) << (j % 8)));
      }
      for (int j = 0; j < 32; ++j) {
        const uint32_t g = (c0 + uint32_t(j)) / gs;
        const double half = double(1u << (bits - 1)), mnv = sym ? -half * half_ref(sc[g]) : half_ref(mn[g]);
        m.w[size_t(r) * cols + c0 + uint32_t(j)] =
            sym ? half_ref(sc[g]) * (double(v[j]) - half) : half_ref(sc[g]) * v[j] + mnv;
        m.mins[size_t(r) * cols + c0 + uint32_t(j)] = mnv;
      }
    }
  }
  return m;
}

// MXFP4 (kind 5) matrix with random codes and E8M0 scales in [emin, emax], packed per
// docs/format.md: codes as 4-bit chunks, one scale byte per block of 32.
static TestMatrix make_mxfp4(uint32_t rows, uint32_t cols, uint32_t emin = 118, uint32_t emax = 133) {
  static const double kFp4[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};  // e2m1 magnitudes, from the OCP spec
  TestMatrix m{{}, std::vector<double>(size_t(rows) * cols), rows, cols, std::vector<double>(size_t(rows) * cols, 0.0)};
  const uint32_t nb = cols / 32;
  const size_t codes = 64, scales = align64(codes + size_t(rows) * nb * 16), total = scales + size_t(rows) * nb;
  m.buf.assign(total, 0);
  put_u32(m.buf, 0, rows);
  put_u32(m.buf, 4, cols);
  m.buf[8] = 5;
  m.buf[9] = 4;
  put_u32(m.buf, 12, 32);
  put_u32(m.buf, 16, uint32_t(codes));
  put_u32(m.buf, 20, uint32_t(scales));
  put_u32(m.buf, 28, uint32_t(total));
  for (uint32_t r = 0; r < rows; ++r)
    for (uint32_t b = 0; b < nb; ++b) {
      const uint32_t e = emin + rng() % (emax - emin + 1);
      m.buf[scales + size_t(r) * nb + b] = uint8_t(e);
      uint8_t* p = &m.buf[codes + (size_t(r) * nb + b) * 16];
      for (int j = 0; j < 32; ++j) {
        const uint32_t v = rng() % 16;
        p[j % 16] = uint8_t(p[j % 16] | (v << (4 * (j / 16))));
        m.w[size_t(r) * cols + b * 32 + uint32_t(j)] = (v & 8 ? -1.0 : 1.0) * kFp4[v & 7] * std::ldexp(1.0, int(e) - 127);
      }
    }
  return m;
}

static TestMatrix make_float(uint32_t rows, uint32_t cols, Kind kind) {
  const size_t es = kind == kF32 ? 4 : 2;
  TestMatrix m{
      std::vector<uint8_t>(64 + size_t(rows) * cols * es, 0), std::vector<double>(size_t(rows) * cols), rows, cols, {}};
  put_u32(m.buf, 0, rows);
  put_u32(m.buf, 4, cols);
  m.buf[8] = uint8_t(kind);
  m.buf[9] = kind == kF32 ? 32 : 16;
  put_u32(m.buf, 16, 64);
  put_u32(m.buf, 28, uint32_t(m.buf.size()));
  std::normal_distribution<float> nd;
  for (size_t i = 0; i < size_t(rows) * cols; ++i) {
    if (kind == kF32) {
      const float f = nd(rng);
      std::memcpy(&m.buf[64 + 4 * i], &f, 4);
      m.w[i] = f;
    } else if (kind == kF16) {
      const uint16_t h = rand_half();
      std::memcpy(&m.buf[64 + 2 * i], &h, 2);
      m.w[i] = half_ref(h);
    } else {
      const float f = nd(rng);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      const auto b = uint16_t(u >> 16);  // truncation is a valid bf16 value
      std::memcpy(&m.buf[64 + 2 * i], &b, 2);
      uint32_t back = uint32_t(b) << 16;
      float fb;
      std::memcpy(&fb, &back, 4);
      m.w[i] = fb;
    }
  }
  return m;
}

static std::vector<float> rand_vec(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = scale * nd(rng);
  return v;
}

// |y - x W^T| <= tol * (|x| |W|^T), elementwise
static bool close_matmul(const std::vector<float>& y, const std::vector<float>& x, const std::vector<double>& w,
                         int64_t T, uint32_t rows, uint32_t cols, double tol) {
  for (int64_t t = 0; t < T; ++t)
    for (uint32_t r = 0; r < rows; ++r) {
      double ref = 0, mag = 0;
      for (uint32_t c = 0; c < cols; ++c) {
        ref += double(x[size_t(t) * cols + c]) * w[size_t(r) * cols + c];
        mag += std::fabs(double(x[size_t(t) * cols + c]) * w[size_t(r) * cols + c]);
      }
      if (std::fabs(y[size_t(t) * rows + r] - ref) > tol * mag + 1e-30) {
        std::fprintf(stderr, "mismatch t=%lld r=%u: %g vs %g\n", (long long)t, r, double(y[size_t(t) * rows + r]), ref);
        return false;
      }
    }
  return true;
}

// What the SIMD decode (one token; AVX2, NEON) computes, x rounded per 32 values: for 4-bit
// codes to int8, w . x8*dx (quantize_x8: the min term's group sums come from the
// rounded x too); otherwise to int16, s*q . x16*dx + min . x (quantize_x16).
static bool close_matmul_x16(const std::vector<float>& y, const std::vector<float>& x, const TestMatrix& m,
                             uint32_t bits, double tol) {
  const float levels = bits == 4 ? 127.0f : 32767.0f;
  std::vector<double> xq(m.cols);
  for (uint32_t b = 0; b < m.cols / 32; ++b) {
    float amax = 0;
    for (uint32_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    const float dx = amax / levels, inv = amax > 0 ? levels / amax : 0.0f;
    for (uint32_t j = 0; j < 32; ++j) xq[b * 32 + j] = double(std::nearbyint(x[b * 32 + j] * inv)) * dx;
  }
  for (uint32_t r = 0; r < m.rows; ++r) {
    double ref = 0, mag = 0;
    for (uint32_t c = 0; c < m.cols; ++c) {
      const size_t i = size_t(r) * m.cols + c;
      ref += bits == 4 ? m.w[i] * xq[c] : (m.w[i] - m.mins[i]) * xq[c] + m.mins[i] * x[c];
      mag += std::fabs(m.w[i] * x[c]);
    }
    if (std::fabs(y[r] - ref) > tol * mag) {
      std::fprintf(stderr, "x16 mismatch r=%u: %g vs %g\n", r, double(y[r]), ref);
      return false;
    }
  }
  return true;
}

// x [n] rounded per 32 values to int8 (levels 127; int16: 32767) times the block's dx, as the
// SIMD decode inputs and the integer prefill (quantize_acts) do.
static std::vector<double> round_x8(const float* x, uint32_t n, float levels = 127.0f) {
  std::vector<double> xq(n);
  for (uint32_t b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (uint32_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    const float dx = amax / levels, inv = amax > 0 ? levels / amax : 0.0f;
    for (uint32_t j = 0; j < 32; ++j) xq[b * 32 + j] = double(std::nearbyint(x[b * 32 + j] * inv)) * dx;
  }
  return xq;
}

// What the integer prefill (matmul_int8) computes: every token's x rounded per 32 values to
// int8, or int16 for 8-bit codes (quantize_acts), the min terms from the rounded x too:
// y = W . xq, W exact.
static bool close_matmul_x8(const std::vector<float>& y, const std::vector<float>& x, const TestMatrix& m, int64_t T,
                            uint32_t r0, uint32_t r1, double tol) {
  const float levels = m.buf[9] == 8 ? 32767.0f : 127.0f;
  for (int64_t t = 0; t < T; ++t) {
    const auto xq = round_x8(&x[size_t(t) * m.cols], m.cols, levels);
    for (uint32_t r = r0; r < r1; ++r) {
      double ref = 0, mag = 0;
      for (uint32_t c = 0; c < m.cols; ++c) {
        ref += m.w[size_t(r) * m.cols + c] * xq[c];
        mag += std::fabs(m.w[size_t(r) * m.cols + c] * xq[c]);
      }
      const double got = y[size_t(t) * m.rows + r];
      if (std::fabs(got - ref) > tol * mag + 1e-30) {
        std::fprintf(stderr, "int8 prefill mismatch t=%lld r=%u: %g vs %g\n", (long long)t, r, got, ref);
        return false;
      }
    }
  }
  return true;
}

static void test_kernels() {
  const uint32_t shapes[][2] = {{1, 128}, {37, 256}, {130, 384}};
  for (bool sym : {false, true})
    for (uint32_t bits : {2u, 3u, 4u, 8u})
      for (uint32_t gs : {32u, 64u, 128u})
        for (auto& s : shapes) {
          if (s[1] % gs) continue;
          TestMatrix m = make_quant(s[0], s[1], bits, gs, sym);
          const QMatrix q = parse_qmatrix(m.buf.data(), m.buf.size());
          for (int64_t T : {1, 3, 4, 9, 14, 33}) {
            auto x = rand_vec(size_t(T) * s[1]);
            std::vector<float> y(size_t(T) * s[0]);
            matmul(q, x.data(), T, y.data());
            if (T >= kernels::kGemmMinTokens && prefill_int8(q)) {
              CHECK(close_matmul_x8(y, x, m, T, 0, s[0], 2e-6));  // exactly what the kernel computes
              CHECK(close_matmul(y, x, m.w, T, s[0], s[1], 1e-2));
            } else if (T == 1 && std::strncmp(simd_name(), "portable", 8) != 0) {
              CHECK(close_matmul_x16(y, x, m, bits, 2e-6));  // exactly what the kernel computes
              // and within 2^-15-ish of f32 x (int8 for 4 bits: 2^-7-ish)
              CHECK(close_matmul(y, x, m.w, T, s[0], s[1], bits == 4 ? 1e-2 : 1e-4));
            } else {
              CHECK(close_matmul(y, x, m.w, T, s[0], s[1], 2e-6));
            }
          }
        }
  for (Kind k : {kF32, kF16, kBF16})
    for (auto s : {std::pair<uint32_t, uint32_t>{1, 7}, {33, 100}, {70, 512}}) {
      TestMatrix m = make_float(s.first, s.second, k);
      const QMatrix q = parse_qmatrix(m.buf.data(), m.buf.size());
      for (int64_t T : {1, 2, 5, 13}) {
        auto x = rand_vec(size_t(T) * s.second);
        std::vector<float> y(size_t(T) * s.first);
        matmul(q, x.data(), T, y.data());
        CHECK(close_matmul(y, x, m.w, T, s.first, s.second, 2e-6));
      }
    }
  // Headers that lie are refused, never read past.
  TestMatrix m = make_quant(4, 64, 4, 32);
  CHECK(throws<std::invalid_argument>([&] { parse_qmatrix(m.buf.data(), m.buf.size() - 1); }));
  m.buf[9] = 5;
  CHECK(throws<std::invalid_argument>([&] { parse_qmatrix(m.buf.data(), m.buf.size()); }));
  m.buf[9] = 4;
  m.buf[8] = 5;  // no such kind
  CHECK(throws<std::invalid_argument>([&] { parse_qmatrix(m.buf.data(), m.buf.size()); }));
  m.buf[8] = 4;  // kind 4 has no mins: a mins offset is a lie
  CHECK(throws<std::invalid_argument>([&] { parse_qmatrix(m.buf.data(), m.buf.size()); }));
  TestMatrix sm = make_quant(4, 64, 4, 32, true);
  CHECK(throws<std::invalid_argument>([&] { parse_qmatrix(sm.buf.data(), sm.buf.size() - 1); }));
  CHECK(parse_qmatrix(sm.buf.data(), sm.buf.size()).kind == kQuantSym);
  // f16 conversion, subnormals and specials included (portable vs F16C agree with the spec)
  CHECK(f16_to_f32(0x3C00) == 1.0f && f16_to_f32(0xC000) == -2.0f && f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(std::isinf(f16_to_f32(0x7C00)) && std::isnan(f16_to_f32(0x7E00)) && f16_to_f32(0x7BFF) == 65504.0f);
}

// The dense ops (RMSNorm, RoPE, attention, softmax top-k) against float64 references,
// on sizes that leave vector tails, whichever path (AVX2, NEON, scalar) the build has.
static void test_dense_ops() {
  const auto rel_close = [](double got, double want, double scale, double tol) {
    return std::fabs(got - want) <= tol * scale + 1e-30;
  };
  for (int64_t n : {1, 7, 64, 100}) {
    const auto x = rand_vec(size_t(3 * n)), w = rand_vec(size_t(n));
    std::vector<float> y(x.size());
    rms_norm(x.data(), w.data(), 3, n, 1e-5f, y.data());
    bool ok = true;
    for (int64_t r = 0; r < 3; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += double(x[size_t(r * n + i)]) * x[size_t(r * n + i)];
      const double d = std::sqrt(ss / double(n) + 1e-5);
      for (int64_t i = 0; i < n; ++i) {
        const double want = x[size_t(r * n + i)] / d * w[size_t(i)];
        ok = ok && rel_close(y[size_t(r * n + i)], want, std::fabs(want), 1e-6);
      }
    }
    CHECK(ok);
  }
  for (int64_t hd : {6, 16, 24}) {
    const int64_t T = 3, heads = 2, half = hd / 2, start = 5;
    std::vector<float> inv(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) inv[size_t(i)] = std::pow(10000.0f, -2.0f * float(i) / float(hd));
    const auto x0 = rand_vec(size_t(T * heads * hd));
    auto x = x0;
    rope(x.data(), T, heads, hd, start, inv.data());
    bool ok = true;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const double f = double(float(start + t) * inv[size_t(i)]), c = std::cos(f), sn = std::sin(f);
          const size_t a = size_t((t * heads + h) * hd + i), b = a + size_t(half);
          ok = ok && rel_close(x[a], x0[a] * c - x0[b] * sn, 1.0, 1e-5) &&
               rel_close(x[b], x0[b] * c + x0[a] * sn, 1.0, 1e-5);
        }
    CHECK(ok);
  }
  // attention: head sizes on and off the vector widths, short and long contexts, a window,
  // attention sinks (one more logit per head in the denominator; large ones dominate it), and
  // a whole prompt too (the blocked prefill path, with a last block of fewer tokens)
  for (int64_t hd : {6, 12, 64, 80})
    for (int64_t S : {1, 9, 21, 70})
      for (int64_t window : {0, 4, 30})
        for (int variant = 0; variant < 4; ++variant) {
          const bool with_sinks = variant & 1, whole = variant & 2;
          const int64_t heads = 4, kvh = 2, T = whole ? S : std::min<int64_t>(S, 3), start = S - T;
          const auto q = rand_vec(size_t(T * heads * hd)), k = rand_vec(size_t(S * kvh * hd)),
                     v = rand_vec(size_t(S * kvh * hd));
          std::vector<float> sinks = rand_vec(size_t(heads));
          sinks[1] += 8.0f;
          std::vector<float> out(size_t(T * heads * hd));
          attention(q.data(), T, heads, hd, k.data(), v.data(), S, kvh, start, window, out.data(),
                    with_sinks ? sinks.data() : nullptr);
          bool ok = true;
          for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < heads; ++h) {
              const int64_t g = h / (heads / kvh), pos = start + t,
                            j0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
              std::vector<double> p;
              double mx = -1e300, sum = 0;
              for (int64_t j = j0; j <= pos; ++j) {
                double d = 0;
                for (int64_t c = 0; c < hd; ++c)
                  d += double(q[size_t((t * heads + h) * hd + c)]) * k[size_t((j * kvh + g) * hd + c)];
                p.push_back(d / std::sqrt(double(hd)));
                mx = std::max(mx, p.back());
              }
              if (with_sinks) mx = std::max(mx, double(sinks[size_t(h)]));
              for (double& e : p) sum += (e = std::exp(e - mx));
              if (with_sinks) sum += std::exp(double(sinks[size_t(h)]) - mx);
              for (int64_t c = 0; c < hd; ++c) {
                double o = 0, mag = 0;
                for (int64_t j = j0; j <= pos; ++j) {
                  o += p[size_t(j - j0)] / sum * v[size_t((j * kvh + g) * hd + c)];
                  mag += p[size_t(j - j0)] / sum * std::fabs(v[size_t((j * kvh + g) * hd + c)]);
                }
                ok = ok && rel_close(out[size_t((t * heads + h) * hd + c)], o, mag, 1e-5);
              }
            }
          if (!ok)
            std::fprintf(stderr, "attention hd=%lld S=%lld T=%lld window=%lld sinks=%d\n", (long long)hd,
                         (long long)S, (long long)T, (long long)window, int(with_sinks));
          CHECK(ok);
        }
  // attention over a kv-head-major cache [kvh, cap, hd] (the decode cache's layout) gives the
  // packed [S, kvh, hd] cache's outputs bit for bit: one token over short and long caches (the
  // parts path from 1024 keys), and a prompt
  for (int64_t hd : {12, 64})
    for (int64_t S : {9, 70, 1100})
      for (int64_t T : {int64_t(1), int64_t(5)}) {
        const int64_t heads = 4, kvh = 2, cap = S + 3, start = S - T;
        const auto q = rand_vec(size_t(T * heads * hd)), k = rand_vec(size_t(S * kvh * hd)),
                   v = rand_vec(size_t(S * kvh * hd));
        std::vector<float> kh(size_t(kvh * cap * hd), -1e30f), vh(kh.size(), -1e30f);
        for (int64_t j = 0; j < S; ++j)
          for (int64_t g = 0; g < kvh; ++g)
            for (int64_t c = 0; c < hd; ++c) {
              kh[size_t((g * cap + j) * hd + c)] = k[size_t((j * kvh + g) * hd + c)];
              vh[size_t((g * cap + j) * hd + c)] = v[size_t((j * kvh + g) * hd + c)];
            }
        std::vector<float> packed(size_t(T * heads * hd)), major(packed.size());
        attention(q.data(), T, heads, hd, k.data(), v.data(), S, kvh, start, 0, packed.data());
        attention(q.data(), T, heads, hd, kh.data(), vh.data(), S, kvh, start, 0, major.data(), nullptr,
                  KVLayout{hd, cap * hd});
        if (packed != major)
          std::fprintf(stderr, "kv-head-major attention hd=%lld S=%lld T=%lld\n", (long long)hd, (long long)S,
                       (long long)T);
        CHECK(packed == major);
      }
  // float16: every half round-trips; a float midway between two neighbouring halves rounds to
  // the even one, one ulp off it to the nearer; |x| >= 65520 overflows to infinity; the
  // vector conversion agrees with the scalar one
  {
    bool ok = true;
    std::vector<float> xs;
    for (uint32_t h = 0; h < 0x7c00; ++h) {  // the finite non-negative halves
      const float a = half_to_float(uint16_t(h)), na = half_to_float(uint16_t(h | 0x8000));
      ok = ok && float_to_half(a) == h && float_to_half(na) == (h | 0x8000) && na == -a;
      if (h + 1 == 0x7c00) break;
      const float b = half_to_float(uint16_t(h + 1)), mid = float((double(a) + double(b)) / 2);
      ok = ok && double(mid) == (double(a) + double(b)) / 2;  // exact in float
      ok = ok && float_to_half(mid) == ((h & 1) ? h + 1 : h);
      ok = ok && float_to_half(std::nextafter(mid, 0.0f)) == h && float_to_half(std::nextafter(mid, 1e9f)) == h + 1;
      xs.insert(xs.end(), {a, mid, -mid, std::nextafter(mid, 1e9f)});
    }
    ok = ok && half_to_float(0x3c00) == 1.0f && half_to_float(0x0001) == 0x1p-24f && half_to_float(0x7bff) == 65504.0f;
    ok = ok && float_to_half(65519.99f) == 0x7bff && float_to_half(65520.0f) == 0x7c00 &&
         float_to_half(-1e30f) == 0xfc00 && float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    ok = ok && std::isnan(half_to_float(float_to_half(nan))) && std::isinf(half_to_float(0x7c00));
    xs.push_back(1e-30f);  // rounds to zero
    std::vector<uint16_t> hv(xs.size());
    floats_to_halves(xs.data(), int64_t(xs.size()), hv.data());
    for (size_t i = 0; i < xs.size(); ++i) ok = ok && hv[i] == float_to_half(xs[i]);
    CHECK(ok);
  }
  // attention over a float16 cache: the same bits as over a float32 cache of the same values
  for (int64_t hd : {12, 64})
    for (int64_t S : {9, 70, 1100})
      for (int64_t T : {int64_t(1), int64_t(5)}) {
        const int64_t heads = 4, kvh = 2, start = S - T;
        const auto q = rand_vec(size_t(T * heads * hd));
        auto k = rand_vec(size_t(S * kvh * hd)), v = rand_vec(size_t(S * kvh * hd));
        std::vector<uint16_t> kh(k.size()), vh(v.size());
        floats_to_halves(k.data(), int64_t(k.size()), kh.data());
        floats_to_halves(v.data(), int64_t(v.size()), vh.data());
        for (size_t i = 0; i < k.size(); ++i) k[i] = half_to_float(kh[i]), v[i] = half_to_float(vh[i]);
        const std::vector<float> sinks = rand_vec(size_t(heads));
        std::vector<float> full(size_t(T * heads * hd)), half(full.size());
        attention(q.data(), T, heads, hd, k.data(), v.data(), S, kvh, start, 40, full.data(), sinks.data());
        attention(q.data(), T, heads, hd, kh.data(), vh.data(), S, kvh, start, 40, half.data(), sinks.data(),
                  KVLayout{kvh * hd, hd, true});
        if (full != half)
          std::fprintf(stderr, "float16 attention hd=%lld S=%lld T=%lld\n", (long long)hd, (long long)S, (long long)T);
        CHECK(full == half);
      }
  // softmax top-k: the exp of the attention (vector lanes and the scalar tail) against float64
  for (int64_t E : {3, 8, 13, 64}) {
    const auto l = rand_vec(size_t(E));
    const int64_t K = std::min<int64_t>(E, 4);
    std::vector<int32_t> ids(static_cast<size_t>(K));
    std::vector<float> wts(static_cast<size_t>(K));
    softmax_topk(l.data(), 1, E, K, false, ids.data(), wts.data());
    const double mx = *std::max_element(l.begin(), l.end());
    double sum = 0;
    for (float v : l) sum += std::exp(double(v) - mx);
    bool ok = true;
    for (int64_t j = 0; j < K; ++j)
      ok = ok && rel_close(wts[size_t(j)], std::exp(double(l[size_t(ids[size_t(j)])]) - mx) / sum, 1.0, 1e-6);
    CHECK(ok);
  }
}

// sample_logits on a large vocabulary (the nucleus histogram and its bucket sort run under
// the sanitizers here; tests/test_sampling.py checks its draws against the definition).
static void test_sample() {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> l(8192);
  for (float& x : l) x = nd(rng);
  const int64_t top = std::max_element(l.begin(), l.end()) - l.begin();
  CHECK(sample_logits(l.data(), 8192, 1.0, 1, 1.0, 0.99) == top);   // top_k 1: the argmax
  CHECK(sample_logits(l.data(), 8192, 1.0, 0, 1e-9, 0.99) == top);  // the smallest nucleus
  CHECK(sample_logits(l.data(), 8192, 0.01, 0, 0.95, 0.5) == top);  // a cold temperature
  for (double u : {0.0, 0.3, 0.999999}) {
    const int64_t t = sample_logits(l.data(), 8192, 0.8, 0, 0.95, u);
    CHECK(t >= 0 && t < 8192 && l[size_t(t)] > -6.0f);  // never a token far below the nucleus
  }
  std::vector<float> flat(8192, 0.5f);  // one bucket holding every token, all tied
  CHECK(sample_logits(flat.data(), 8192, 1.0, 0, 0.5, 0.0) == 0);
  CHECK(sample_logits(flat.data(), 8192, 1.0, 0, 0.5, 0.999999) == 4095);  // half, ties by id
  l[7] = std::nanf("");
  CHECK(throws<std::invalid_argument>([&] { sample_logits(l.data(), 8192, 1.0, 0, 0.9, 0.5); }, "logit 7 "));
  l[7] = 0;
  l[8190] = std::numeric_limits<float>::infinity();
  CHECK(throws<std::invalid_argument>([&] { sample_logits(l.data(), 8191, 1.0, 0, 0.9, 0.5); }, "logit 8190 "));
}

static void test_crc() {
  CHECK(crc32c("123456789", 9) == 0xE3069283u);
  CHECK(crc32c_portable("123456789", 9) == 0xE3069283u);
  uint8_t z[32] = {}, ff[32], inc[32];
  for (int i = 0; i < 32; ++i) {
    ff[i] = 0xFF;
    inc[i] = uint8_t(i);
  }
  CHECK(crc32c(z, 32) == 0x8A9136AAu);  // RFC 3720 B.4 vectors
  CHECK(crc32c(ff, 32) == 0x62A8AB43u);
  CHECK(crc32c(inc, 32) == 0x46DD794Eu);
  CHECK(crc32c(nullptr, 0) == 0);
  std::vector<uint8_t> d(100007);
  for (auto& b : d) b = uint8_t(rng());
  for (size_t n : {size_t(0), size_t(1), size_t(7), size_t(8), size_t(1000), size_t(3 * 4096), size_t(3 * 4096 + 5),
                   size_t(7 * 4096 - 1), d.size()}) {
    CHECK(crc32c(d.data(), n) == crc32c_portable(d.data(), n));
    CHECK(crc32c(d.data() + 1, n - (n > 0), 0x12345678u) == crc32c_portable(d.data() + 1, n - (n > 0), 0x12345678u));
  }
  CHECK(crc32c(d.data() + 333, d.size() - 333, crc32c(d.data(), 333)) == crc32c(d.data(), d.size()));
}

// ---------------------------------------------------------------- experts file

// bits 0: MXFP4 matrices (kind 5)
static std::vector<uint8_t> make_blob(uint32_t layer, uint32_t expert, uint32_t H, uint32_t I, uint32_t bits,
                                      std::vector<TestMatrix>* mats, bool sym = false) {
  const auto make = [&](uint32_t rows, uint32_t cols) {
    return bits == 0 ? make_mxfp4(rows, cols, 122, 127) : make_quant(rows, cols, bits, 32, sym);
  };
  TestMatrix g = make(I, H), u = make(I, H), d = make(H, I);
  std::vector<uint8_t> blob(64, 0);
  std::memcpy(blob.data(), "EXPB", 4);
  put_u32(blob, 4, layer);
  put_u32(blob, 8, expert);
  put_u32(blob, 12, 3);
  int i = 0;
  for (TestMatrix* m : {&g, &u, &d}) {
    blob.resize(align64(blob.size()), 0);
    put_u32(blob, 16 + 4 * size_t(i), uint32_t(blob.size()));
    put_u32(blob, 28 + 4 * size_t(i), uint32_t(m->buf.size()));
    blob.insert(blob.end(), m->buf.begin(), m->buf.end());
    ++i;
  }
  if (mats) *mats = {g, u, d};
  return blob;
}

struct TestFile {
  std::string path;
  uint32_t L, E;
  std::vector<uint64_t> offsets, sizes;
  std::vector<uint32_t> crcs;
  std::vector<std::vector<uint8_t>> blobs;
  std::vector<std::vector<TestMatrix>> mats;
  ~TestFile() { ::unlink(path.c_str()); }
};

static void write_file(TestFile& f, uint32_t H, uint32_t I, uint32_t (*bits_of)(uint32_t, uint32_t) = nullptr) {
  char tmpl[] = "/tmp/edgemoe_native_XXXXXX";
  const int fd = ::mkstemp(tmpl);
  f.path = tmpl;
  std::vector<uint8_t> data(4096, 0);
  std::memcpy(data.data(), "EDGEMOEX", 8);
  put_u32(data, 8, 1);
  put_u32(data, 12, 4096);
  put_u32(data, 16, f.L);
  put_u32(data, 20, f.E);
  for (uint32_t l = 0; l < f.L; ++l)
    for (uint32_t e = 0; e < f.E; ++e) {
      std::vector<TestMatrix> mats;
      auto blob = make_blob(l, e, H, I, bits_of ? bits_of(l, e) : (e % 2) ? 4 : 3, &mats);
      data.resize((data.size() + 4095) / 4096 * 4096, 0);
      f.offsets.push_back(data.size());
      f.sizes.push_back(blob.size());
      f.crcs.push_back(crc32c(blob.data(), blob.size()));
      data.insert(data.end(), blob.begin(), blob.end());
      f.blobs.push_back(std::move(blob));
      f.mats.push_back(std::move(mats));
    }
  const uint64_t nb = uint64_t(f.L) * f.E, fb = data.size();
  std::memcpy(&data[24], &nb, 8);
  std::memcpy(&data[32], &fb, 8);
  CHECK(::write(fd, data.data(), data.size()) == ssize_t(data.size()));
  ::close(fd);
}

static std::shared_ptr<ExpertStore> open_store(const TestFile& f, Verify verify = Verify::kEveryRead) {
  return std::make_shared<ExpertStore>(f.path, f.L, f.E, f.offsets, f.sizes, f.crcs, true, verify);
}


// True if one token (T=1) meets 4-bit codes with int8 activations: the SIMD decode.
static bool decode_x8() { return std::strncmp(simd_name(), "portable", 8) != 0; }

// How a path rounds a matrix's input: not (float x), as the SIMD decode does (one token:
// int8 for 4-bit codes), or as the int8 prefill does (several tokens: int8 for codes of up to
// 4 bits, AVX2 only; prefill_int8).
enum class XRound { kNone, kDecode, kPrefill };

// SwiGLU expert in float64; the matrices whose input `round` rounds to int8 see it rounded
// (gate/up: x; down: h, rounded from its float value).
static std::vector<double> expert_ref(const std::vector<TestMatrix>& m, const float* x, uint32_t H, uint32_t I,
                                      XRound round = XRound::kNone) {
  const auto rounds = [&](const TestMatrix& t) {
    const bool coded = t.buf[8] == 3 || t.buf[8] == 4 || t.buf[8] == 5;
    if (round == XRound::kDecode) return coded && t.buf[9] == 4;
    if (round == XRound::kPrefill) return prefill_int8_expert(parse_qmatrix(t.buf.data(), t.buf.size()));
    return false;
  };
  const auto levels = [](const TestMatrix& t) { return t.buf[9] == 8 ? 32767.0f : 127.0f; };
  std::vector<double> xd(x, x + H);
  if (rounds(m[0])) xd = round_x8(x, H, round == XRound::kPrefill ? levels(m[0]) : 127.0f);
  std::vector<double> h(I), y(H, 0.0);
  for (uint32_t i = 0; i < I; ++i) {
    double g = 0, u = 0;
    for (uint32_t c = 0; c < H; ++c) {
      g += m[0].w[size_t(i) * H + c] * xd[c];
      u += m[1].w[size_t(i) * H + c] * xd[c];
    }
    h[i] = g / (1 + std::exp(-g)) * u;
  }
  if (rounds(m[2])) {
    std::vector<float> hf(h.begin(), h.end());
    h = round_x8(hf.data(), I, round == XRound::kPrefill ? levels(m[2]) : 127.0f);
  }
  for (uint32_t r = 0; r < H; ++r)
    for (uint32_t i = 0; i < I; ++i) y[r] += m[2].w[size_t(r) * I + i] * h[i];
  return y;
}

// The portable kernels are compiled into every build, whatever path matmul() takes:
// check them directly against the reference, and the bandwidth probe against them.
static bool portable_close(const TestMatrix& m, int nt, float xscale = 1.0f) {
  const QMatrix q = parse_qmatrix(m.buf.data(), m.buf.size());
  const uint32_t ng = q.quantized() ? m.cols / q.group_size : 0;
  auto x = rand_vec(size_t(nt) * m.cols, xscale);
  std::vector<float> xsum(size_t(nt) * ng), y(size_t(nt) * m.rows);
  const float* xp[kernels::kTokenBlock];
  const float* sp[kernels::kTokenBlock];
  for (int t = 0; t < nt; ++t) {
    xp[t] = x.data() + size_t(t) * m.cols;
    if (ng) kernels::group_sums(xp[t], m.cols, q.group_size, &xsum[size_t(t) * ng]);
    sp[t] = ng ? xsum.data() + size_t(t) * ng : nullptr;
  }
  kernels::portable::rows(q, 0, m.rows, xp, sp, nt, y.data(), m.rows);
  return close_matmul(y, x, m.w, nt, m.rows, m.cols, 2e-6);
}

static void test_portable_kernels() {
  for (bool sym : {false, true})
    for (uint32_t bits : {2u, 3u, 4u, 8u})
      for (int nt : {1, 3}) CHECK(portable_close(make_quant(37, 256, bits, 64, sym), nt));
  for (Kind k : {kF32, kF16, kBF16}) CHECK(portable_close(make_float(33, 100, k), 4));
  std::vector<uint8_t> bytes((3u << 20) + 77);
  for (auto& b : bytes) b = uint8_t(rng());
  CHECK(stream_read(bytes.data(), bytes.size()) == kernels::portable::byte_sum(bytes.data(), bytes.size()));
}

// MXFP4 (kind 5) through matmul on every token count, against the float64 reference: one token
// (SIMD decode) and prefill where prefill_int8 says so with x rounded per 32 values to int8,
// exactly, the others with float x; scales
// down to E8M0 0 and 1 (subnormal floats) with an x large enough to keep the products normal.
// And the portable rows directly, and headers that lie.
static void test_mxfp4_kernels() {
  for (uint32_t e = 0; e < 255; ++e) CHECK(kernels::e8m0_half(uint8_t(e)) == std::ldexp(1.0f, int(e) - 128));
  const uint32_t shapes[][2] = {{1, 32}, {3, 96}, {37, 256}, {130, 384}, {9, 544}};
  int checked = 0;
  for (auto range : {std::pair<uint32_t, uint32_t>{118, 133}, {0, 3}, {230, 240}})
    for (auto& s : shapes) {
      const TestMatrix m = make_mxfp4(s[0], s[1], range.first, range.second);
      const QMatrix q = parse_qmatrix(m.buf.data(), m.buf.size());
      CHECK(q.kind == kMxfp4 && q.mxfp4() && q.coded() && !q.quantized() && q.row_bytes() == s[1] / 2);
      const float xscale = range.first == 0 ? 0x1p100f : range.first >= 230 ? 0x1p-110f : 1.0f;
      for (int64_t T : {1, 3, 4, 9, 14, 33}) {
        auto x = rand_vec(size_t(T) * s[1], xscale);
        std::vector<float> y(size_t(T) * s[0]);
        matmul(q, x.data(), T, y.data());
        if (T >= kernels::kGemmMinTokens && prefill_int8(q)) {
          CHECK(close_matmul_x8(y, x, m, T, 0, s[0], 2e-6));  // exactly what the kernel computes
          CHECK(close_matmul(y, x, m.w, T, s[0], s[1], 1e-2));
        } else if (T == 1 && decode_x8()) {
          CHECK(close_matmul_x16(y, x, m, 4, 2e-6));  // exactly what the kernel computes
          CHECK(close_matmul(y, x, m.w, T, s[0], s[1], 1e-2));
        } else {
          CHECK(close_matmul(y, x, m.w, T, s[0], s[1], 2e-6));
        }
        ++checked;
      }
      CHECK(portable_close(m, 3, xscale));
    }
  std::printf("  mxfp4: %d matmul checks (%s)\n", checked, simd_name());
  // a header that lies, or a NaN scale, is refused, never read past
  TestMatrix m = make_mxfp4(4, 64);
  const auto refused = [&](const char* needle) {
    return throws<std::invalid_argument>([&] { parse_qmatrix(m.buf.data(), m.buf.size()); }, needle);
  };
  CHECK(throws<std::invalid_argument>([&] { parse_qmatrix(m.buf.data(), m.buf.size() - 1); }, "claims"));
  m.buf[9] = 8;
  CHECK(refused("bits 8"));
  m.buf[9] = 4;
  put_u32(m.buf, 12, 64);
  CHECK(refused("group_size 64"));
  put_u32(m.buf, 12, 32);
  put_u32(m.buf, 24, 64);
  CHECK(refused("mins offset"));
  put_u32(m.buf, 24, 0);
  const uint32_t scales = 64 + 4 * 2 * 16;
  m.buf[scales + 5] = 0xFF;
  CHECK(refused("NaN scale (E8M0 255) for block 5"));
  m.buf[scales + 5] = 127;
  m.buf[8] = 6;
  CHECK(refused("unknown QMatrix kind 6"));
  m.buf[8] = 5;
  CHECK(parse_qmatrix(m.buf.data(), m.buf.size()).kind == kMxfp4);
  CHECK(throws<std::invalid_argument>([&] { float_view(m.buf.data(), 1, 32, kMxfp4); }));
}

// The int8 prefill: the portable kernels (every build) against the rounded-x reference,
// the SIMD ones (AVX2) against the portable ones, on panels with row and token tails.
static void test_int8_prefill() {
  // the rounding: to the nearest int8 per block, the same bits on every path
  const auto xr = rand_vec(32 * 7);
  std::vector<int8_t> q(xr.size());
  std::vector<float> dx(7), bsum(7);
  kernels::portable::quantize_row_q8(xr.data(), uint32_t(xr.size()), q.data(), dx.data(), bsum.data());
  const auto want = round_x8(xr.data(), uint32_t(xr.size()));
  bool same = true;
  for (size_t i = 0; i < xr.size(); ++i) same = same && double(q[i]) * dx[i / 32] == want[i];
  CHECK(same);
  std::vector<int16_t> w16(xr.size());
  std::vector<float> dxw(7), bsumw(7);
  kernels::portable::quantize_row_q16(xr.data(), uint32_t(xr.size()), w16.data(), dxw.data(), bsumw.data());
  const auto want16 = round_x8(xr.data(), uint32_t(xr.size()), 32767.0f);
  for (size_t i = 0; i < xr.size(); ++i) same = same && double(w16[i]) * dxw[i / 32] == want16[i];
  CHECK(same);
#if defined(EDGEMOE_AVX2)
  std::vector<int16_t> w16b(xr.size());
  std::vector<float> dxw2(7), bsumw2(7);
  kernels::avx2::quantize_row_q16(xr.data(), uint32_t(xr.size()), w16b.data(), dxw2.data(), bsumw2.data());
  CHECK(w16b == w16 && dxw2 == dxw && bsumw2 == bsumw);
  std::vector<int8_t> q2(xr.size());
  std::vector<float> dx2(7), bsum2(7);
  kernels::avx2::quantize_row_q8(xr.data(), uint32_t(xr.size()), q2.data(), dx2.data(), bsum2.data());
  CHECK(q2 == q && dx2 == dx && bsum2 == bsum);
#endif
  const uint32_t shapes[][2] = {{1, 64}, {7, 128}, {9, 256}, {37, 384}};
  int checked = 0;
  for (bool sym : {false, true})
    for (uint32_t bits : {2u, 3u, 4u, 8u})
      for (uint32_t gs : {32u, 64u, 128u})
        for (auto& s : shapes) {
          if (s[1] % gs) continue;
          const TestMatrix m = make_quant(s[0], s[1], bits, gs, sym);
          const QMatrix w = parse_qmatrix(m.buf.data(), m.buf.size());
          for (int64_t T : {1, 2, 5, 13}) {
            const auto x = rand_vec(size_t(T) * s[1]);
            QuantizedActs qx;
            quantize_acts(x.data(), T, s[1], qx, wide_acts(w));
            std::vector<float> ref(size_t(T) * s[0]);
            kernels::portable::gemm_int8_rows(w, 0, s[0], qx, ref.data());
            CHECK(close_matmul_x8(ref, x, m, T, 0, s[0], 2e-6));
#if defined(EDGEMOE_AVX2)
            std::vector<float> y(size_t(T) * s[0], -1.0f);
            kernels::avx2::gemm_int8_rows(w, 0, s[0], qx, y.data());
            CHECK(close_matmul_x8(y, x, m, T, 0, s[0], 2e-6));
            if (s[0] > 8) {  // a range starting at the second panel leaves the first rows alone
              std::vector<float> z(size_t(T) * s[0], -1.0f);
              kernels::avx2::gemm_int8_rows(w, 8, s[0], qx, z.data());
              CHECK(close_matmul_x8(z, x, m, T, 8, s[0], 2e-6) && z[0] == -1.0f && z[7] == -1.0f);
            }
#endif
            ++checked;
          }
        }
  // MXFP4: the codes' e2m1 values (offset to 0..24 on AVX2, whose 16-bit sums take 4 products)
  for (auto& s : shapes)
    for (auto range : {std::pair<uint32_t, uint32_t>{118, 133}, {0, 3}}) {
      const TestMatrix m = make_mxfp4(s[0], s[1], range.first, range.second);
      const QMatrix w = parse_qmatrix(m.buf.data(), m.buf.size());
      CHECK(prefill_int8(w) == prefill_int8(parse_qmatrix(make_quant(1, 32, 4, 32).buf.data(), make_quant(1, 32, 4, 32).buf.size())));
      for (int64_t T : {1, 2, 5, 13}) {
        const auto x = rand_vec(size_t(T) * s[1], range.first == 0 ? 0x1p100f : 1.0f);
        QuantizedActs qx;
        quantize_acts(x.data(), T, s[1], qx);
        std::vector<float> ref(size_t(T) * s[0]);
        kernels::portable::gemm_int8_rows(w, 0, s[0], qx, ref.data());
        CHECK(close_matmul_x8(ref, x, m, T, 0, s[0], 2e-6));
#if defined(EDGEMOE_AVX2)
        std::vector<float> y(size_t(T) * s[0], -1.0f);
        kernels::avx2::gemm_int8_rows(w, 0, s[0], qx, y.data());
        CHECK(close_matmul_x8(y, x, m, T, 0, s[0], 2e-6));
        if (s[0] > 8) {
          std::vector<float> z(size_t(T) * s[0], -1.0f);
          kernels::avx2::gemm_int8_rows(w, 8, s[0], qx, z.data());
          CHECK(close_matmul_x8(z, x, m, T, 8, s[0], 2e-6) && z[0] == -1.0f && z[7] == -1.0f);
        }
#endif
        ++checked;
      }
      // every code at its largest value (6: 24 in the offset table) against x at its largest (127):
      // a 16-bit sum of 8 such pairs would wrap, the kernels' halves of 4 must not
      TestMatrix big = make_mxfp4(s[0], s[1], 127, 127);
      std::fill(big.buf.begin() + 64, big.buf.begin() + 64 + size_t(s[0]) * s[1] / 2, uint8_t(0x77));
      std::fill(big.w.begin(), big.w.end(), 6.0);
      const QMatrix wb = parse_qmatrix(big.buf.data(), big.buf.size());
      const std::vector<float> ones(size_t(13) * s[1], 1.0f);
      QuantizedActs q1;
      quantize_acts(ones.data(), 13, s[1], q1);
      std::vector<float> yb(size_t(13) * s[0]);
      kernels::portable::gemm_int8_rows(wb, 0, s[0], q1, yb.data());
      CHECK(close_matmul_x8(yb, ones, big, 13, 0, s[0], 2e-6));
#if defined(EDGEMOE_AVX2)
      kernels::avx2::gemm_int8_rows(wb, 0, s[0], q1, yb.data());
      CHECK(close_matmul_x8(yb, ones, big, 13, 0, s[0], 2e-6));
#endif
    }
  // what the int8 path cannot take is refused, not misread; 2-bit codes keep float x
  const TestMatrix mf = make_float(4, 64, kF16), m2 = make_quant(4, 64, 2, 32);
  const QMatrix wf = parse_qmatrix(mf.buf.data(), mf.buf.size()), w2 = parse_qmatrix(m2.buf.data(), m2.buf.size());
  QuantizedActs qx;
  const auto x = rand_vec(64);
  quantize_acts(x.data(), 1, 64, qx);
  std::vector<float> y(4);
  const TestMatrix m8 = make_quant(4, 64, 8, 32);
  const QMatrix w8 = parse_qmatrix(m8.buf.data(), m8.buf.size());
  // 8-bit codes take the integer prefill with x rounded to int16 (int8 x would cost them many
  // times their own error), on AVX2 builds; x of the wrong width is refused
  const TestMatrix m4 = make_quant(4, 64, 4, 32);
  const QMatrix w4 = parse_qmatrix(m4.buf.data(), m4.buf.size());
#if defined(EDGEMOE_AVX2)
  CHECK(prefill_int8(w8) && prefill_int8_expert(w8) && prefill_int8(w4));
#else
  CHECK(!prefill_int8(w8) && !prefill_int8_expert(w8));
#endif
  CHECK(!prefill_int8(wf) && !prefill_int8(w2) && !prefill_int8_expert(w2) &&
        throws<std::invalid_argument>([&] { matmul_int8(wf, qx, y.data()); }) &&
        throws<std::invalid_argument>([&] { matmul_int8(w8, qx, y.data()); }));
  QuantizedActs qw;
  quantize_acts(x.data(), 1, 64, qw, true);
  CHECK(qw.wide && qw.q.empty() && qw.q16.size() == 64 && throws<std::invalid_argument>([&] { matmul_int8(w4, qw, y.data()); }));
  CHECK(throws<std::invalid_argument>([&] { quantize_acts(x.data(), 1, 60, qx); }));
  std::printf("  int8 prefill: %d checks (%s)\n", checked, prefill_int8(parse_qmatrix(make_quant(1, 32, 4, 32).buf.data(), make_quant(1, 32, 4, 32).buf.size())) ? "used by matmul" : "reference only");
}

#if defined(EDGEMOE_X86)
// One AVX-512 build's kernels (real or SIMDe) against the rounded-x reference, as the AVX2
// ones: the int8 prefill for 2/3/4/8-bit codes on panels with row and token tails (and a
// range from the second panel), the 4-bit decode with an odd last block.
template <class Gemm, class Decode>
static int check_avx512(Gemm gemm, Decode decode, Decode decode_mx) {
  const uint32_t shapes[][2] = {{1, 64}, {7, 96}, {16, 128}, {17, 256}, {37, 384}};
  int checked = 0;
  for (bool sym : {false, true})
    for (uint32_t bits : {2u, 3u, 4u, 8u})
      for (uint32_t gs : {32u, 64u, 128u})
        for (auto& s : shapes) {
          if (s[1] % gs) continue;
          const TestMatrix m = make_quant(s[0], s[1], bits, gs, sym);
          const QMatrix w = parse_qmatrix(m.buf.data(), m.buf.size());
          for (int64_t T : {1, 3, 8, 13}) {
            const auto x = rand_vec(size_t(T) * s[1]);
            QuantizedActs qx;
            quantize_acts(x.data(), T, s[1], qx, wide_acts(w));
            std::vector<float> y(size_t(T) * s[0], -1.0f);
            gemm(w, 0, s[0], qx, y.data());
            CHECK(close_matmul_x8(y, x, m, T, 0, s[0], 2e-6));
            if (s[0] > 16) {  // a range starting at the second panel leaves the first rows alone
              std::vector<float> z(size_t(T) * s[0], -1.0f);
              gemm(w, 16, s[0], qx, z.data());
              CHECK(close_matmul_x8(z, x, m, T, 16, s[0], 2e-6) && z[0] == -1.0f && z[15] == -1.0f);
            }
            ++checked;
          }
          if (bits != 4) continue;
          const auto x1 = rand_vec(s[1]);
          QuantizedActs q1;
          quantize_acts(x1.data(), 1, s[1], q1);
          std::vector<float> xsum(s[1] / gs, 0.0f);  // group sums of the rounded x, in block order
          for (uint32_t b = 0; b < s[1] / 32; ++b) xsum[b / (gs / 32)] += q1.bsum[b];
          std::vector<int8_t> pairs(s[1]);
          kernels::pair_blocks(q1.q.data(), s[1], pairs.data());
          std::vector<float> y(s[0], -1.0f);
          decode(w, 0, s[0], q1.q.data(), pairs.data(), q1.dx.data(), xsum.data(), y.data());
          CHECK(close_matmul_x16(y, x1, m, 4, 2e-6));
          ++checked;
        }
  // MXFP4: the decode (an odd last block in 96 and 544 columns), x rounded as for 4-bit codes
  for (auto range : {std::pair<uint32_t, uint32_t>{118, 133}, {0, 3}})
    for (auto& s : shapes) {
      for (uint32_t cols : {s[1], s[1] + 32 * 5}) {
        const TestMatrix m = make_mxfp4(s[0], cols, range.first, range.second);
        const QMatrix w = parse_qmatrix(m.buf.data(), m.buf.size());
        const auto x1 = rand_vec(cols, range.first == 0 ? 0x1p100f : 1.0f);
        QuantizedActs q1;
        quantize_acts(x1.data(), 1, cols, q1);
        std::vector<int8_t> pairs(cols);
        kernels::pair_blocks(q1.q.data(), cols, pairs.data());
        std::vector<float> y(s[0], -1.0f);
        decode_mx(w, 0, s[0], q1.q.data(), pairs.data(), q1.dx.data(), q1.bsum.data(), y.data());  // block sums: groups of 32
        CHECK(close_matmul_x16(y, x1, m, 4, 2e-6));
        ++checked;
        for (int64_t T : {3, 13}) {  // the int8 prefill's panels
          const auto x = rand_vec(size_t(T) * cols, range.first == 0 ? 0x1p100f : 1.0f);
          QuantizedActs qx;
          quantize_acts(x.data(), T, cols, qx);
          std::vector<float> z(size_t(T) * s[0], -1.0f);
          gemm(w, 0, s[0], qx, z.data());
          CHECK(close_matmul_x8(z, x, m, T, 0, s[0], 2e-6));
          ++checked;
        }
      }
    }
  return checked;
}

// The AVX-512 kernels: built against SIMDe (the same source, portable intrinsics) on every
// x86-64 CPU, and the real ones where the CPU has AVX-512 F/BW/VL/VNNI; a set it lacks is
// named and that half skipped. EDGEMOE_EXPECT_AVX512=1 makes a missing set a failure.
static void test_avx512_kernels() {
#if defined(EDGEMOE_TEST_AVX512_SIMDE)
  const int n = check_avx512(kernels::avx512_simde::gemm_int8_rows, kernels::avx512_simde::qmatvec_q4,
                             kernels::avx512_simde::qmatvec_mxfp4);
  std::printf("  avx512 (SIMDe build): %d checks\n", n);
#else
  std::printf("  avx512 (SIMDe build): skipped, built without SIMDe (apt-get install libsimde-dev)\n");
#endif
  if (kernels::avx512::cpu_ok()) {
    const int n =
        check_avx512(kernels::avx512::gemm_int8_rows, kernels::avx512::qmatvec_q4, kernels::avx512::qmatvec_mxfp4);
    std::printf("  avx512 (this CPU): %d checks, simd %s\n", n, simd_name());
    CHECK(std::strstr(simd_name(), "avx512vnni") != nullptr);
  } else {
    std::printf("  avx512 (this CPU): skipped, it lacks %s\n", kernels::avx512::cpu_missing());
    CHECK(std::strstr(simd_name(), "avx512") == nullptr);
    if (const char* want = std::getenv("EDGEMOE_EXPECT_AVX512"); want && std::strcmp(want, "1") == 0) CHECK(false);
  }
}
#endif

#if defined(EDGEMOE_NEON)
// y [T, rows] from the portable kernels (the path every other one is checked against).
static std::vector<float> portable_matmul(const QMatrix& q, const std::vector<float>& x, int64_t T) {
  const uint32_t ng = q.quantized() ? q.cols / q.group_size : 0;
  std::vector<float> xsum(size_t(T) * ng), y(size_t(T) * q.rows);
  for (int64_t t0 = 0; t0 < T; t0 += kernels::kTokenBlock) {
    const int nt = int(std::min<int64_t>(kernels::kTokenBlock, T - t0));
    const float* xp[kernels::kTokenBlock];
    const float* sp[kernels::kTokenBlock];
    for (int t = 0; t < nt; ++t) {
      xp[t] = x.data() + size_t(t0 + t) * q.cols;
      if (ng) kernels::group_sums(xp[t], q.cols, q.group_size, &xsum[size_t(t0 + t) * ng]);
      sp[t] = ng ? xsum.data() + size_t(t0 + t) * ng : nullptr;
    }
    kernels::portable::rows(q, 0, q.rows, xp, sp, nt, y.data() + size_t(t0) * q.rows, q.rows);
  }
  return y;
}

// |a - b| <= tol * (|x| |W|^T) elementwise, W the matrix's reference values.
static bool close_to(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& x,
                     const TestMatrix& m, int64_t T, double tol, const char* what) {
  for (int64_t t = 0; t < T; ++t)
    for (uint32_t r = 0; r < m.rows; ++r) {
      double mag = 0;
      for (uint32_t c = 0; c < m.cols; ++c)
        mag += std::fabs(double(x[size_t(t) * m.cols + c]) * m.w[size_t(r) * m.cols + c]);
      const size_t i = size_t(t) * m.rows + r;
      if (std::fabs(double(a[i]) - b[i]) > tol * mag + 1e-30) {
        std::fprintf(stderr, "%s: t=%lld r=%u: %g vs %g\n", what, (long long)t, r, double(a[i]), double(b[i]));
        return false;
      }
    }
  return true;
}

// Each NEON kernel against the portable path, on shapes with row and block tails: the
// decode at every level this CPU has (each level forms the same exact block integers,
// so the levels give the same bits), the few-token rows, the prefill tile, byte_sum. And
// the level the CPU model has: native/run_arm64_tests.sh names it per qemu -cpu.
static void test_neon_kernels() {
  using kernels::neon::Level;
  const Level top = kernels::neon::cpu_level();
  std::printf("  neon: cpu level %s\n", kernels::neon::level_name(top));
  if (const char* want = std::getenv("EDGEMOE_EXPECT_SIMD")) {
    if (std::strcmp(simd_name(), want) != 0) std::fprintf(stderr, "simd %s, expected %s\n", simd_name(), want);
    CHECK(std::strcmp(simd_name(), want) == 0);
  }
  const uint32_t shapes[][2] = {{1, 32}, {3, 96}, {7, 128}, {9, 160}, {13, 384}, {6, 512}};
  int checked = 0;
  for (bool sym : {false, true})
    for (uint32_t bits : {2u, 3u, 4u, 8u})
      for (uint32_t gs : {32u, 64u, 128u})
        for (auto& s : shapes) {
          if (s[1] % gs) continue;
          const TestMatrix m = make_quant(s[0], s[1], bits, gs, sym);
          const QMatrix q = parse_qmatrix(m.buf.data(), m.buf.size());
          // decode: one token, every level up to the CPU's
          const auto x1 = rand_vec(s[1]);
          const kernels::neon::DecodeInput in(x1.data(), s[1], gs, bits != 4, bits == 4);
          const auto ref1 = portable_matmul(q, x1, 1);
          std::vector<float> base;
          for (int lv = 0; lv <= int(top); ++lv) {
            std::vector<float> y(s[0], 0.0f);
            kernels::neon::qmatvec_at(Level(lv), q, 0, s[0], in, y.data());
            CHECK(close_matmul_x16(y, x1, m, bits, 2e-6));  // the rounded x, exactly
            CHECK(close_to(y, ref1, x1, m, 1, bits == 4 ? 1e-2 : 1e-4, "neon decode vs portable"));
            if (lv == 0) base = y;
            else
              CHECK(std::memcmp(y.data(), base.data(), y.size() * 4) == 0);  // the same block integers: the same bits
            ++checked;
          }
          // few tokens and prefill: x as given, as the portable path
          for (int64_t T : {2, 4, 5, 12, 17}) {
            const auto x = rand_vec(size_t(T) * s[1]);
            const auto ref = portable_matmul(q, x, T);
            std::vector<float> y(size_t(T) * s[0]);
            if (T >= kernels::kGemmMinTokens) {
              kernels::neon::gemm_rows(q, 0, s[0], x.data(), T, y.data());
            } else {
              std::vector<float> xsum(size_t(T) * (s[1] / gs));
              for (int64_t t0 = 0; t0 < T; t0 += kernels::kTokenBlock) {
                const int nt = int(std::min<int64_t>(kernels::kTokenBlock, T - t0));
                const float* xp[kernels::kTokenBlock];
                const float* sp[kernels::kTokenBlock];
                for (int t = 0; t < nt; ++t) {
                  xp[t] = x.data() + size_t(t0 + t) * s[1];
                  kernels::group_sums(xp[t], s[1], gs, &xsum[size_t(t0 + t) * (s[1] / gs)]);
                  sp[t] = xsum.data() + size_t(t0 + t) * (s[1] / gs);
                }
                kernels::neon::rows(q, 0, s[0], xp, sp, nt, y.data() + size_t(t0) * s[0], s[0]);
              }
            }
            CHECK(close_to(y, ref, x, m, T, 2e-6, T >= kernels::kGemmMinTokens ? "neon gemm" : "neon rows"));
          }
        }
  for (Kind k : {kF32, kF16, kBF16})
    for (auto s : {std::pair<uint32_t, uint32_t>{1, 7}, {5, 100}, {9, 512}}) {
      const TestMatrix m = make_float(s.first, s.second, k);
      const QMatrix q = parse_qmatrix(m.buf.data(), m.buf.size());
      for (int64_t T : {1, 3, 13}) {
        const auto x = rand_vec(size_t(T) * s.second);
        const auto ref = portable_matmul(q, x, T);
        std::vector<float> y(size_t(T) * s.first);
        if (T >= kernels::kGemmMinTokens) {
          kernels::neon::gemm_rows(q, 0, s.first, x.data(), T, y.data());
        } else {
          const float* xp[kernels::kTokenBlock];
          for (int t = 0; t < T; ++t) xp[t] = x.data() + size_t(t) * s.second;
          kernels::neon::rows(q, 0, s.first, xp, nullptr, int(T), y.data(), s.first);
        }
        CHECK(close_to(y, ref, x, m, T, 2e-6, "neon float rows"));
      }
    }
  // MXFP4: the decode at every level (the same bits), the few-token rows and the prefill tile
  for (auto range : {std::pair<uint32_t, uint32_t>{118, 133}, {0, 3}})
    for (auto& s : shapes) {
      const TestMatrix m = make_mxfp4(s[0], s[1], range.first, range.second);
      const QMatrix q = parse_qmatrix(m.buf.data(), m.buf.size());
      const float xscale = range.first == 0 ? 0x1p100f : 1.0f;
      const auto x1 = rand_vec(s[1], xscale);
      const kernels::neon::DecodeInput in(x1.data(), s[1], 32, false, true);
      std::vector<float> base;
      for (int lv = 0; lv <= int(top); ++lv) {
        std::vector<float> y(s[0], 0.0f);
        kernels::neon::qmatvec_at(Level(lv), q, 0, s[0], in, y.data());
        CHECK(close_matmul_x16(y, x1, m, 4, 2e-6));
        if (lv == 0) base = y;
        else
          CHECK(std::memcmp(y.data(), base.data(), y.size() * 4) == 0);
        ++checked;
      }
      for (int64_t T : {2, 5, 12, 17}) {
        const auto x = rand_vec(size_t(T) * s[1], xscale);
        const auto ref = portable_matmul(q, x, T);
        std::vector<float> y(size_t(T) * s[0]);
        if (T >= kernels::kGemmMinTokens) {
          kernels::neon::gemm_rows(q, 0, s[0], x.data(), T, y.data());
        } else {
          for (int64_t t0 = 0; t0 < T; t0 += kernels::kTokenBlock) {
            const int nt = int(std::min<int64_t>(kernels::kTokenBlock, T - t0));
            const float* xp[kernels::kTokenBlock];
            for (int t = 0; t < nt; ++t) xp[t] = x.data() + size_t(t0 + t) * s[1];
            kernels::neon::rows(q, 0, s[0], xp, nullptr, nt, y.data() + size_t(t0) * s[0], s[0]);
          }
        }
        CHECK(close_to(y, ref, x, m, T, 2e-6, "neon mxfp4 rows/gemm"));
      }
    }
  std::vector<uint8_t> bytes(100003);
  for (auto& b : bytes) b = uint8_t(rng());
  for (size_t n : {size_t(0), size_t(63), size_t(64), size_t(1000), bytes.size()})
    CHECK(kernels::neon::byte_sum(bytes.data(), n) == kernels::portable::byte_sum(bytes.data(), n));
  std::printf("  neon: %d decode checks over %d level(s)\n", checked, int(top) + 1);
}

// Group scales of every kind of f16 (zero, -0, subnormal, the largest normal, either sign)
// through the decode at every level: the dot-product level builds them on the integer unit
// (kernels_neon_decode.h, kWide), plain NEON with fcvtl; the same bits, near the portable path.
static void test_neon_decode_scales() {
  using kernels::neon::Level;
  const Level top = kernels::neon::cpu_level();
  const uint16_t kScales[] = {0x0000, 0x8000, 0x0001, 0x83FF, 0x0200, 0x7BFF, 0xFBFF, 0x3C00, 0x8400, 0x2E66};
  for (uint32_t bits : {2u, 3u, 4u, 8u})
    for (uint32_t gs : {32u, 64u, 128u}) {
      const uint32_t rows = 7, cols = 384, ng = cols / gs;  // 7 rows: a pass of 4 (or 2) and a rest
      TestMatrix m = make_quant(rows, cols, bits, gs);
      const QMatrix q0 = parse_qmatrix(m.buf.data(), m.buf.size());
      const size_t scales_at = size_t(q0.scales - m.buf.data());
      for (size_t i = 0; i < size_t(rows) * ng; ++i) std::memcpy(&m.buf[scales_at + 2 * i], &kScales[i % 10], 2);
      const QMatrix q = parse_qmatrix(m.buf.data(), m.buf.size());
      const auto x = rand_vec(cols);
      const kernels::neon::DecodeInput in(x.data(), cols, gs, bits != 4, bits == 4);
      const auto ref = portable_matmul(q, x, 1);
      std::vector<float> base;
      for (int lv = 0; lv <= int(top); ++lv) {
        std::vector<float> y(rows, 0.0f);
        kernels::neon::qmatvec_at(Level(lv), q, 0, rows, in, y.data());
        for (uint32_t r = 0; r < rows; ++r) {
          double mag = 0;  // sum over the row of |scale| * (2^bits - 1) * |x| + |min x|
          for (uint32_t c = 0; c < cols; ++c) {
            const size_t g = size_t(r) * ng + c / gs;
            mag += (std::fabs(f16_to_f32(kScales[g % 10])) * double((1u << bits) - 1) +
                    std::fabs(f16_to_f32(load_u16(q.mins + 2 * g)))) *
                   std::fabs(x[c]);
          }
          CHECK(std::isfinite(y[r]) && std::fabs(double(y[r]) - ref[r]) <= (bits == 4 ? 1e-2 : 1e-4) * mag + 1e-30);
        }
        if (lv == 0) base = y;
        else CHECK(std::memcmp(y.data(), base.data(), y.size() * 4) == 0);
      }
    }
}
#endif

// round_rows_x8 rounds as the one-token decode rounds a 4-bit matrix's input, and
// unround_rows_x8's values round to the same int8 values, steps and group sums again (what a
// device computes from a call whose input travelled rounded); what cannot be undone is refused.
static void test_rounded_rows() {
  const uint32_t H = 256;
  const int64_t T = 6;
  auto x = rand_vec(size_t(T) * H);
  for (uint32_t i = 0; i < H; ++i) x[H + i] *= 1e-20f, x[2 * H + i] *= 1e20f;
  for (uint32_t i = 0; i < 32; ++i) x[3 * H + i] = float(i % 5) * 63.5f - 127.0f;  // ties at amax 127
  for (uint32_t i = 32; i < 64; ++i) x[3 * H + i] = 0.0f, x[4 * H + i] = -2.0f;    // zeros; all at the maximum
  std::vector<int8_t> q(x.size());
  std::vector<float> amax(x.size() / 32), back(x.size());
  CHECK(round_rows_x8(x.data(), T, H, 1e-30f, q.data(), amax.data()));
  unround_rows_x8(q.data(), amax.data(), T, H, back.data());
  for (size_t b = 0; b < amax.size(); ++b) {
    float m = 0;
    for (size_t i = 0; i < 32; ++i) m = std::max(m, std::fabs(back[b * 32 + i]));
    CHECK(m == amax[b]);  // each block's maximum, hence its step, comes back exactly
  }
#if defined(EDGEMOE_AVX2) || defined(EDGEMOE_NEON)
#if defined(EDGEMOE_AVX2)
  namespace isa = kernels::avx2;
#else
  namespace isa = kernels::neon;
#endif
  for (int64_t t = 0; t < T; ++t)
    for (uint32_t gs : {32u, 64u, 128u}) {
      const isa::DecodeInput a(&x[size_t(t) * H], H, gs, false, true), b(&back[size_t(t) * H], H, gs, false, true);
      CHECK(std::equal(a.x8.begin(), a.x8.end(), q.begin() + t * H));
      CHECK(a.x8 == b.x8 && a.dx8 == b.dx8 && a.xsum8 == b.xsum8);
    }
#endif
  std::vector<float> bad = x;
  bad[5] = std::numeric_limits<float>::infinity();
  CHECK(!round_rows_x8(bad.data(), T, H, 1e-30f, q.data(), amax.data()));
  bad = x;
  for (int i = 0; i < 32; ++i) bad[size_t(i)] = 1e-35f;
  CHECK(!round_rows_x8(bad.data(), T, H, 1e-30f, q.data(), amax.data()));
  CHECK(!round_rows_x8(x.data(), 1, 48, 1e-30f, q.data(), amax.data()));
}

// expert_forward on kind 3, 4 and 5 (MXFP4, bits 0 below) blobs: the fused decode (T=1), a
// few tokens, prefill.
static void test_expert_forward() {
  const uint32_t H = 64, I = 96;
  for (bool sym : {false, true})
    for (uint32_t bits : {3u, 4u, 8u, 0u}) {
      if (bits == 0 && sym) continue;
      std::vector<TestMatrix> mats;
      const auto blob = make_blob(0, 0, H, I, bits, &mats, sym);
      const Expert e = parse_expert(blob.data(), blob.size());
      CHECK(e.gate.kind == (bits == 0 ? kMxfp4 : sym ? kQuantSym : kQuant) && e.down.kind == e.gate.kind);
      for (int64_t T : {1, 3, 13}) {
        // one token on AVX2/NEON rounds x and h per 32 values: to int16 (~2^-15 each, a looser
        // bound), or for 4 bits to int8, which the reference emulates (h's rounding can flip)
        // several tokens on AVX2 round x and h per 32 values where prefill_int8 holds (int8; int16
        // for 8-bit codes)
        const bool decode = T == 1 && decode_x8(), prefill = T >= kernels::kGemmMinTokens;
        const double tol = decode ? (bits == 4 || bits == 0 ? 1e-5 : 1e-3) : 1e-4;
        auto x = rand_vec(size_t(T) * H);
        std::vector<float> y(size_t(T) * H);
        expert_forward(e, x.data(), T, y.data());
        for (int64_t t = 0; t < T; ++t) {
          const auto ref = expert_ref(mats, &x[size_t(t) * H], H, I,
                                      decode ? XRound::kDecode : prefill ? XRound::kPrefill : XRound::kNone);
          double mx = 0, err = 0;
          for (uint32_t h = 0; h < H; ++h) {
            mx = std::max(mx, std::fabs(ref[h]));
            err = std::max(err, std::fabs(ref[h] - y[size_t(t) * H + h]));
          }
          if (err > tol * mx)
            std::fprintf(stderr, "kind %d bits %u T=%lld: error %g of %g\n", sym ? 4 : 3, bits, (long long)T, err, mx);
          CHECK(err <= tol * mx);
        }
      }
    }
}

// A two-matrix blob is a ReLU expert, down(relu(up x)) (Switch Transformers); other counts are refused.
static void test_relu_expert_forward() {
  const uint32_t H = 64, I = 96;
  TestMatrix u = make_quant(I, H, 8, 32), d = make_quant(H, I, 8, 32);
  std::vector<uint8_t> blob(64, 0);
  std::memcpy(blob.data(), "EXPB", 4);
  put_u32(blob, 12, 2);
  int i = 0;
  for (TestMatrix* m : {&u, &d}) {
    blob.resize(align64(blob.size()), 0);
    put_u32(blob, 16 + 4 * size_t(i), uint32_t(blob.size()));
    put_u32(blob, 28 + 4 * size_t(i), uint32_t(m->buf.size()));
    blob.insert(blob.end(), m->buf.begin(), m->buf.end());
    ++i;
  }
  const Expert e = parse_expert(blob.data(), blob.size());
  CHECK(!e.gated && e.hidden() == H && e.intermediate() == I);
  for (int64_t T : {1, 5, 13}) {
    auto x = rand_vec(size_t(T) * H);
    std::vector<float> y(size_t(T) * H);
    expert_forward(e, x.data(), T, y.data());
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> h(I, 0.0), ref(H, 0.0);
      for (uint32_t r = 0; r < I; ++r) {
        for (uint32_t c = 0; c < H; ++c) h[r] += u.w[size_t(r) * H + c] * x[size_t(t) * H + c];
        h[r] = std::max(h[r], 0.0);
      }
      double mx = 0, err = 0;
      for (uint32_t r = 0; r < H; ++r) {
        for (uint32_t c = 0; c < I; ++c) ref[r] += d.w[size_t(r) * I + c] * h[c];
        mx = std::max(mx, std::fabs(ref[r]));
        err = std::max(err, std::fabs(ref[r] - y[size_t(t) * H + r]));
      }
      CHECK(err <= 1e-3 * mx);  // 8-bit codes: x and h rounded to int16 at most
    }
  }
  put_u32(blob, 12, 1);
  CHECK(throws<std::invalid_argument>([&] { parse_expert(blob.data(), blob.size()); }, "expected 3 (SwiGLU) or 2 (ReLU)"));
  // a two-matrix blob carries no biases or activation
  put_u32(blob, 12, 2);
  put_u32(blob, 48, 1);
  CHECK(throws<std::invalid_argument>([&] { parse_expert(blob.data(), blob.size()); }, "no biases and no activation"));
}

// An expert blob with biases and gpt-oss's clamped SwiGLU (header bytes 40..63) against the
// matmuls of its own matrices, the biases and the activation computed here in double.
static void test_expert_glu() {
  const uint32_t H = 64, I = 96;
  const float alpha = 1.702f, limit = 0.5f;  // a limit the rand_vec inputs cross often
  for (uint32_t bits : {4u, 8u}) {
    std::vector<TestMatrix> mats;
    auto blob = make_blob(0, 0, H, I, bits, &mats, true);
    const size_t boff = (blob.size() + 63) / 64 * 64;
    const auto bias = rand_vec(size_t(2 * I + H));  // [I] gate, [I] up, [H] down
    blob.resize(boff + bias.size() * 4);
    std::memcpy(blob.data() + boff, bias.data(), bias.size() * 4);
    const uint32_t fields[3] = {uint32_t(boff), uint32_t(bias.size() * 4), uint32_t(kClampedSwiGLU)};
    std::memcpy(blob.data() + 40, fields, sizeof fields);
    std::memcpy(blob.data() + 52, &alpha, 4);
    std::memcpy(blob.data() + 56, &limit, 4);
    const Expert e = parse_expert(blob.data(), blob.size());
    CHECK(e.bias != nullptr && e.act == kClampedSwiGLU && e.alpha == alpha && e.limit == limit);
    for (int64_t T : {1, 3, 13}) {
      const auto x = rand_vec(size_t(T) * H);
      std::vector<float> y(size_t(T) * H), g(size_t(T) * I), u(size_t(T) * I), h(size_t(T) * I), ref(size_t(T) * H);
      expert_forward(e, x.data(), T, y.data());
      matmul(e.gate, x.data(), T, g.data());
      matmul(e.up, x.data(), T, u.data());
      for (int64_t t = 0; t < T; ++t)
        for (uint32_t i = 0; i < I; ++i) {
          const size_t at = size_t(t) * I + i;
          const double gg = std::min(double(g[at]) + bias[i], double(limit));
          const double uu = std::max(-double(limit), std::min(double(u[at]) + bias[I + i], double(limit)));
          h[at] = float((uu + 1) * gg / (1 + std::exp(-double(alpha) * gg)));
        }
      matmul(e.down, h.data(), T, ref.data());
      double mx = 0, err = 0;
      for (int64_t t = 0; t < T; ++t)
        for (uint32_t c = 0; c < H; ++c) {
          const double want = double(ref[size_t(t) * H + c]) + bias[2 * I + c];
          mx = std::max(mx, std::fabs(want));
          err = std::max(err, std::fabs(want - y[size_t(t) * H + c]));
        }
      // one token and prefill round x to int8 per 32 values on AVX2/NEON (the matmul here does not)
      const double tol = T == 3 ? 1e-5 : 2e-2;
      if (err > tol * mx) std::fprintf(stderr, "expert glu bits %u T=%lld: error %g of %g\n", bits, (long long)T, err, mx);
      CHECK(err <= tol * mx);
    }
  }
  // a plain blob (zeros at 40..63) is SwiGLU without biases; an unknown activation is refused
  std::vector<TestMatrix> mats;
  auto blob = make_blob(0, 0, H, I, 4, &mats, true);
  CHECK(parse_expert(blob.data(), blob.size()).bias == nullptr && parse_expert(blob.data(), blob.size()).act == kSwiGLU);
  blob[48] = 7;
  bool refused = false;
  try {
    parse_expert(blob.data(), blob.size());
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused);
}

// moe_forward = combine_slots(moe_forward_slots(every slot)) bit for bit, also when the slots
// are split by a mask into two calls (the cluster's remote and local halves) made at once on
// two threads over one cache that starts empty (both read); masked-out slots are left as they were.
static void test_moe_slots() {
  const uint32_t H = 64, I = 96;
  TestFile f;
  f.L = 2;
  f.E = 4;
  write_file(f, H, I);
  auto store = open_store(f, Verify::kFirstRead);
  for (int64_t T : {1, 5, 13}) {
    const int64_t K = 2;
    auto x = rand_vec(size_t(T * H));
    std::vector<int32_t> ids(size_t(T * K));
    std::vector<float> w(size_t(T * K));
    for (int64_t i = 0; i < T * K; ++i) {
      ids[size_t(i)] = int32_t((i % K) == 0 ? rng() % f.E : (uint32_t(ids[size_t(i - 1)]) + 1 + rng() % 3) % f.E);
      w[size_t(i)] = float(rng() % 1000) / 1000.0f;
    }
    ExpertCache whole(store, 0);
    std::vector<float> y(size_t(T * H)), ys(size_t(T * K * H), 0.0f), y2(size_t(T * H));
    moe_forward(whole, 1, x.data(), T, H, ids.data(), w.data(), K, y.data());
    moe_forward_slots(whole, 1, x.data(), T, H, ids.data(), w.data(), K, nullptr, ys.data());
    combine_slots(ys.data(), w.data(), T, K, H, y2.data());
    CHECK(std::memcmp(y.data(), y2.data(), y.size() * 4) == 0);

    // per_token: every row is bit for bit what a call with that row alone gives
    std::vector<float> rows(size_t(T * H)), one(static_cast<size_t>(H));
    moe_forward(whole, 1, x.data(), T, H, ids.data(), w.data(), K, rows.data(), true);
    for (int64_t t = 0; t < T; ++t) {
      moe_forward(whole, 1, &x[size_t(t * H)], 1, H, &ids[size_t(t * K)], &w[size_t(t * K)], K, one.data());
      CHECK(std::memcmp(&rows[size_t(t * H)], one.data(), size_t(H) * 4) == 0);
    }

    // the slots of experts 0 and 2 in one call, the others in another, on two threads at once,
    // through a cache that holds two experts (both calls stream)
    std::vector<uint8_t> even(size_t(T * K)), odd(size_t(T * K));
    for (int64_t i = 0; i < T * K; ++i) {
      even[size_t(i)] = uint8_t(ids[size_t(i)] % 2 == 0);
      odd[size_t(i)] = uint8_t(!even[size_t(i)]);
    }
    uint64_t four = 0;
    for (uint32_t e = 0; e < f.E; ++e) four += store->buffer_bytes(1, e);
    ExpertCache small(store, four);
    const float sentinel = 12345.0f;
    std::vector<float> split(size_t(T * K * H), sentinel);
    std::thread other(
        [&] { moe_forward_slots(small, 1, x.data(), T, H, ids.data(), w.data(), K, odd.data(), split.data()); });
    moe_forward_slots(small, 1, x.data(), T, H, ids.data(), nullptr, K, even.data(), split.data());
    other.join();
    std::vector<float> y3(size_t(T * H));
    combine_slots(split.data(), w.data(), T, K, H, y3.data());
    CHECK(std::memcmp(y.data(), y3.data(), y.size() * 4) == 0);

    // a mask of nothing computes nothing and touches nothing
    std::vector<uint8_t> none(size_t(T * K), 0);
    std::vector<float> untouched(size_t(T * K * H), sentinel);
    const uint64_t misses = small.stats().misses;
    moe_forward_slots(small, 1, x.data(), T, H, ids.data(), w.data(), K, none.data(), untouched.data());
    CHECK(std::all_of(untouched.begin(), untouched.end(), [&](float v) { return v == sentinel; }));
    CHECK(small.stats().misses == misses);
    // every id is checked, masked out or not
    auto bad = ids;
    bad[0] = int32_t(f.E);
    CHECK(throws<std::invalid_argument>(
        [&] { moe_forward_slots(small, 1, x.data(), T, H, bad.data(), w.data(), K, none.data(), untouched.data()); },
        "out of range"));
  }
}

static void test_store_and_cache() {
  const uint32_t H = 64, I = 96;
  TestFile f;
  f.L = 2;
  f.E = 4;
  write_file(f, H, I);
  auto store = open_store(f);
  CHECK(store->direct());
  for (uint32_t i = 0; i < f.L * f.E; ++i) {
    auto b = store->read(i / f.E, i % f.E);
    CHECK(b->size == f.blobs[i].size() && std::memcmp(b->data, f.blobs[i].data(), b->size) == 0);
    CHECK((reinterpret_cast<uintptr_t>(b->base) & 4095) == 0);
  }
  CHECK(throws<std::invalid_argument>([&] { store->read(2, 0); }));

  // A wrong checksum names the expert.
  auto bad = f.crcs;
  bad[5] ^= 1;
  ExpertStore corrupt(f.path, f.L, f.E, f.offsets, f.sizes, bad, false, Verify::kEveryRead);
  CHECK(throws<CorruptExpertError>([&] { corrupt.read(1, 1); }, "expert 1 of layer 1 failed its checksum"));
  CHECK(throws<CorruptExpertError>([&] { corrupt.read(1, 1); }, "expert 1 of layer 1 failed its checksum"));
  // kFirstRead: a blob that fails is never marked checked, so it fails on every read.
  ExpertStore once(f.path, f.L, f.E, f.offsets, f.sizes, bad, false, Verify::kFirstRead);
  for (int k = 0; k < 2; ++k)
    CHECK(throws<CorruptExpertError>([&] { once.read(1, 1); }, "expert 1 of layer 1 failed its checksum"));
  CHECK(once.read(1, 0)->size == f.blobs[4].size());
  // A blob beyond the end is refused at construction.
  auto big = f.sizes;
  big[7] += 5000;
  CHECK(throws<ModelDirectoryError>(
      [&] { ExpertStore(f.path, f.L, f.E, f.offsets, big, f.crcs, true, Verify::kEveryRead); }, "expert 3 of layer 1"));

  // moe_forward vs the scalar reference.
  ExpertCache cache(store, 0);
  const int64_t T = 5, K = 2;
  auto x = rand_vec(size_t(T) * H);
  std::vector<int32_t> ids = {0, 1, 2, 1, 3, 0, 1, 1, 2, 3};
  std::vector<float> w = {0.5f, 0.25f, 1, 2, 0.1f, 0.9f, 0.3f, 0.7f, 1, -1};
  std::vector<float> y(size_t(T) * H);
  moe_forward(cache, 1, x.data(), T, H, ids.data(), w.data(), K, y.data());
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> ref(H, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      auto e = expert_ref(f.mats[size_t(f.E + uint32_t(ids[size_t(t * K + k)]))], &x[size_t(t) * H], H, I);
      for (uint32_t h = 0; h < H; ++h) ref[h] += w[size_t(t * K + k)] * e[h];
    }
    double mx = 0;
    for (double v : ref) mx = std::max(mx, std::fabs(v));
    for (uint32_t h = 0; h < H; ++h) CHECK(std::fabs(y[size_t(t) * H + h] - ref[h]) <= 1e-4 * mx);
  }
  CacheStats s = cache.stats();
  CHECK(s.misses == 4 && s.loads == 4 && s.hits == 0);
  std::vector<int32_t> bad_ids = {0, 4, 0, 0, 0, 0, 0, 0, 0, 0};
  CHECK(throws<std::invalid_argument>(
      [&] { moe_forward(cache, 1, x.data(), T, H, bad_ids.data(), w.data(), K, y.data()); }, "out of range"));

  // Budget: two blobs; a third pinned request fails, then LRU eviction works.
  uint64_t two = store->buffer_bytes(0, 0) + store->buffer_bytes(0, 2);
  ExpertCache small(store, two);
  {
    PinnedExpert a = small.acquire(0, 0), b = small.acquire(0, 2);
    CHECK(throws<BudgetError>([&] { small.acquire(0, 1); }, "raise the budget"));
  }
  {
    PinnedExpert c = small.acquire(0, 1);  // evicts (0, 0), the least recently used
    (void)c;
  }
  CHECK(!small.contains(0, 0) && small.contains(0, 2) && small.contains(0, 1));
  CHECK(small.stats().evictions == 1 && small.stats().resident_bytes <= two);
  ExpertCache tiny(store, 4096);
  CHECK(throws<BudgetError>([&] { tiny.acquire(0, 0); }, "4096 bytes"));
}

// decode_layer against the same ops called one by one (what the Python path does), at
// several positions so the KV cache is written and read; under ASan this also checks
// every buffer it touches. Streams the experts (a budget of two blobs).
static void test_decode_layer() {
  const uint32_t H = 64, I = 96, heads = 4, kvh = 2, hd = 16, K = 2;
  TestFile f;
  f.L = 2;
  f.E = 4;
  write_file(f, H, I);
  auto store = open_store(f);
  auto wq = rand_vec(size_t(heads) * hd * H), wk = rand_vec(size_t(kvh) * hd * H), wv = rand_vec(size_t(kvh) * hd * H);
  auto wo = rand_vec(size_t(H) * heads * hd), wr = rand_vec(size_t(f.E) * H);
  auto n1 = rand_vec(H), n2 = rand_vec(H);
  std::vector<float> inv(hd / 2);
  for (uint32_t i = 0; i < hd / 2; ++i) inv[i] = std::pow(10000.0f, -2.0f * float(i) / float(hd));
  DecodeLayer L;
  L.layer = 1;
  L.hidden = H;
  L.heads = heads;
  L.kv_heads = kvh;
  L.head_dim = hd;
  L.experts = f.E;
  L.top_k = K;
  L.eps = 1e-6f;
  L.q = float_view(wq.data(), heads * hd, H, kF32);
  L.k = float_view(wk.data(), kvh * hd, H, kF32);
  L.v = float_view(wv.data(), kvh * hd, H, kF32);
  L.o = float_view(wo.data(), H, heads * hd, kF32);
  L.router = float_view(wr.data(), f.E, H, kF32);
  L.attn_norm = n1.data();
  L.ffn_norm = n2.data();
  L.inv_freq = inv.data();
  check_decode_layer(L);
  DecodeLayer bad = L;
  bad.kv_heads = 3;
  CHECK(throws<std::invalid_argument>([&] { check_decode_layer(bad); }, "kv_heads must divide"));

  const int64_t cap = 4, kn = int64_t(kvh) * hd, qn = int64_t(heads) * hd;
  ExpertCache cache(store, store->buffer_bytes(1, 0) + store->buffer_bytes(1, 1) + store->buffer_bytes(1, 2));
  ExpertCache ref_cache(store, 0);
  const size_t cs = static_cast<size_t>(cap * kn);
  std::vector<float> kc(cs), vc(cs), rk(cs), rv(cs), rk16(cs), rv16(cs);
  std::vector<uint16_t> k16(cs), v16(cs);
  for (int64_t pos = 0; pos < 3; ++pos) {
    auto h = rand_vec(H);
    std::vector<float> r = h, h16 = h, r16 = h;
    decode_layer(L, cache, h.data(), LayerKV{kc.data(), vc.data(), cap, false}, pos);     // kc, vc [kvh, cap, hd]
    decode_layer(L, cache, h16.data(), LayerKV{k16.data(), v16.data(), cap, true}, pos);  // a float16 cache
    // the reference: the ops one by one, over a packed float32 cache and over one that holds
    // the float16 values
    const size_t qs = static_cast<size_t>(qn), ks = static_cast<size_t>(kn);
    std::vector<float> x(H), q(qs), k(ks), v(ks), att(qs), y(H), lg(f.E), w(K);
    std::vector<int32_t> ids(K);
    rms_norm(r.data(), n1.data(), 1, H, L.eps, x.data());
    matmul(L.q, x.data(), 1, q.data());
    matmul(L.k, x.data(), 1, k.data());
    matmul(L.v, x.data(), 1, v.data());
    rope(q.data(), 1, heads, hd, pos, inv.data());
    rope(k.data(), 1, kvh, hd, pos, inv.data());
    std::copy(k.begin(), k.end(), rk.begin() + pos * kn);
    std::copy(v.begin(), v.end(), rv.begin() + pos * kn);
    for (int64_t i = 0; i < kn; ++i) {
      rk16[size_t(pos * kn + i)] = half_to_float(float_to_half(k[size_t(i)]));
      rv16[size_t(pos * kn + i)] = half_to_float(float_to_half(v[size_t(i)]));
    }
    auto rest = [&](const std::vector<float>& a, std::vector<float>& res) {  // o, the MoE, the residuals
      matmul(L.o, a.data(), 1, y.data());
      for (uint32_t i = 0; i < H; ++i) res[i] += y[i];
      rms_norm(res.data(), n2.data(), 1, H, L.eps, x.data());
      matmul(L.router, x.data(), 1, lg.data());
      softmax_topk(lg.data(), 1, f.E, K, true, ids.data(), w.data());
      moe_forward(ref_cache, 1, x.data(), 1, H, ids.data(), w.data(), K, y.data());
      for (uint32_t i = 0; i < H; ++i) res[i] += y[i];
    };
    attention(q.data(), 1, heads, hd, rk.data(), rv.data(), pos + 1, kvh, pos, 0, att.data());
    rest(att, r);
    attention(q.data(), 1, heads, hd, rk16.data(), rv16.data(), pos + 1, kvh, pos, 0, att.data());
    rest(att, r16);
    CHECK(h == r);  // the reference attends to a packed [pos + 1, kvh, hd] cache
    CHECK(h16 == r16);
    for (int64_t p = 0; p <= pos; ++p)
      for (int64_t g = 0; g < int64_t(kvh); ++g)
        for (int64_t c = 0; c < int64_t(hd); ++c) {
          const size_t at = size_t((g * cap + p) * hd + c), ref = size_t(p * kn + g * hd + c);
          CHECK(kc[at] == rk[ref] && vc[at] == rv[ref]);
          CHECK(half_to_float(k16[at]) == rk16[ref] && half_to_float(v16[at]) == rv16[ref]);
        }
  }
  CHECK(cache.stats().loads > 0);
}

// Several threads acquire/prefetch/release under a budget smaller than the set
// of experts, checking each pinned blob's bytes while they hold it.
static void test_cache_threads() {
  TestFile f;
  f.L = 2;
  f.E = 6;
  write_file(f, 64, 64);
  auto store = open_store(f);
  uint64_t budget = 0;
  for (uint32_t e = 0; e < 5; ++e) budget = std::max(budget, store->buffer_bytes(0, e));
  ExpertCache cache(store, budget * 5);
  std::atomic<int> bad{0}, budget_errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 r(uint32_t(t) + 1);
      std::vector<float> x(64), y(64);
      for (int it = 0; it < 300; ++it) {
        const uint32_t l = r() % f.L, e = r() % f.E, i = l * f.E + e;
        try {
          if (it % 7 == 0) {
            cache.load(l, e);
            continue;
          }
          PinnedExpert p = cache.acquire(l, e);
          if (p.blob().size != f.blobs[i].size() || std::memcmp(p.blob().data, f.blobs[i].data(), p.blob().size) != 0)
            ++bad;
          if (it % 5 == 0) {  // kernels from several threads at once share the pool
            const Expert ex = parse_expert(p.blob().data, p.blob().size);
            expert_forward(ex, x.data(), 1, y.data());
          }
        } catch (const BudgetError&) {
          ++budget_errors;  // possible when the other threads pin everything
        }
      }
    });
  for (auto& th : threads) th.join();
  CHECK(bad == 0);
  const CacheStats s = cache.stats();
  CHECK(s.resident_bytes <= cache.budget_bytes() && s.peak_resident_bytes <= cache.budget_bytes());
  CHECK(s.loads >= uint64_t(f.L) * f.E / 2);
  std::printf("  cache threads: %llu hits, %llu misses, %llu loads, %llu evictions, %d budget errors\n",
              (unsigned long long)s.hits, (unsigned long long)s.misses, (unsigned long long)s.loads,
              (unsigned long long)s.evictions, budget_errors.load());
}

// ---------------------------------------------------------------- policies, prefetch, throttling

static uint32_t four_bits(uint32_t, uint32_t) { return 4; }  // equal blob sizes: budgets in whole experts

static void use(ExpertCache& c, uint32_t layer, uint32_t expert) { c.acquire(layer, expert).release(); }

// The scoring functions on a scripted history: three experts, three different victims.
static void test_policy_scores() {
  CHECK(policy_from_name("structure") == Policy::kStructure && std::string(policy_name(Policy::kLfu)) == "lfu");
  CHECK(throws<std::invalid_argument>([] { policy_from_name("fifo"); }, "'lru', 'lfu' or 'structure'"));
  Usage u;
  record_use(u, 1, 0);
  record_use(u, 2, 0);  // twice in one token
  CHECK(u.uses == 2 && std::fabs(u.rate - 0.1) < 1e-12);
  CHECK(std::fabs(policy_score(Policy::kStructure, u, 1, 14).value - 0.1 * std::pow(0.95, 14)) < 1e-12);

  // X: layer 0, used at tokens 0-3 (old, frequent); Z: layer 0, once at token 20;
  // Y: layer 1, once at token 30. Now: token 30, layer 1 computing (M = 2), so
  // layer 0 runs next (distance 1) and layer 1 is the farthest (distance 2).
  Usage X, Y, Z;
  uint64_t tick = 0;
  for (uint64_t t = 0; t < 4; ++t) record_use(X, ++tick, t);
  record_use(Z, ++tick, 20);
  record_use(Y, ++tick, 30);
  auto victim = [&](Policy p) {
    const Score sx = policy_score(p, X, 1, 30), sy = policy_score(p, Y, 2, 30), sz = policy_score(p, Z, 1, 30);
    if (sx < sy && sx < sz) return 'X';
    return sy < sz ? 'Y' : 'Z';
  };
  CHECK(victim(Policy::kLru) == 'X');        // least recently used
  CHECK(victim(Policy::kLfu) == 'Z');        // fewest uses, the older of Y and Z
  CHECK(victim(Policy::kStructure) == 'Y');  // one use at the farthest layer beats an old one at the next
}

// The same policies deciding a real cache's evictions.
static void test_policy_evictions() {
  TestFile f;
  f.L = 3;
  f.E = 4;
  write_file(f, 64, 64, four_bits);
  auto store = open_store(f);
  const uint64_t one = store->read_capacity(0, 0);
  {  // lru: the least recently used goes
    ExpertCache c(store, 4 * one, Policy::kLru, 1);
    for (auto [l, e] : {std::pair{0u, 0u}, {0, 1}, {1, 0}, {1, 1}, {0, 0}, {2, 0}}) use(c, l, e);
    CHECK(!c.contains(0, 1) && c.contains(0, 0) && c.contains(1, 0) && c.contains(2, 0));
  }
  {  // lfu: fewest uses, ties by recency
    ExpertCache c(store, 4 * one, Policy::kLfu, 1);
    for (auto [l, e] : {std::pair{0u, 0u}, {0, 0}, {0, 0}, {0, 1}, {1, 0}, {1, 0}, {1, 1}, {2, 0}}) use(c, l, e);
    CHECK(!c.contains(0, 1) && c.contains(1, 1));
    use(c, 2, 1);
    CHECK(!c.contains(1, 1) && c.contains(0, 0) && c.contains(1, 0) && c.contains(2, 0) && c.contains(2, 1));
  }
  {  // edgemoe: equal rates, so the layer farthest from its next use goes (lru would take (0, 0))
    ExpertCache c(store, 4 * one, Policy::kStructure, 1);
    for (uint32_t l = 0; l < 2; ++l) {
      c.set_current_layer(l);
      use(c, l, 0);
      use(c, l, 1);
    }
    c.set_current_layer(2);  // layer 0 runs next, layer 1 is two layers away
    use(c, 2, 0);
    CHECK(!c.contains(1, 0) && c.contains(0, 0) && c.contains(0, 1) && c.contains(1, 1));
  }
}

// A prefetch never evicts a pinned expert, one of the current layer, nor one the policy values more.
static void test_prefetch_admission() {
  TestFile f;
  f.L = 3;
  f.E = 4;
  write_file(f, 64, 64, four_bits);
  auto store = open_store(f);
  const uint64_t one = store->read_capacity(0, 0);
  {
    ExpertCache c(store, 2 * one, Policy::kLru, 1);
    c.set_current_layer(0);
    PinnedExpert held = c.acquire(0, 0);
    use(c, 0, 1);
    CHECK(c.prefetch(1, {0}) == 1);
    c.wait_idle();
    CHECK(!c.contains(1, 0) && c.contains(0, 0) && c.contains(0, 1));
    CHECK(c.stats().prefetch_dropped == 1 && c.stats().prefetch_loads == 0);
    c.set_current_layer(2);  // layer 0 runs before layer 1 (next token): still protected
    CHECK(c.prefetch(1, {0}) == 1);
    c.wait_idle();
    CHECK(!c.contains(1, 0) && c.stats().prefetch_dropped == 2);
    held.release();
    c.set_current_layer(1);  // layer 0 now runs after layer 2, and (0, 0) is unpinned: it may go
    CHECK(c.prefetch(2, {0}) == 1);
    c.wait_idle();
    CHECK(c.contains(2, 0) && !c.contains(0, 0) && c.stats().prefetch_loads == 1 && c.stats().evictions == 1);
  }
  {  // lfu: an expert used three times outweighs a guess never used
    ExpertCache c(store, 2 * one, Policy::kLfu, 1);
    for (int i = 0; i < 3; ++i) use(c, 0, 1);
    use(c, 2, 0);
    use(c, 2, 0);
    c.set_current_layer(2);
    CHECK(c.prefetch(1, {0}) == 1);
    c.wait_idle();
    CHECK(!c.contains(1, 0) && c.stats().prefetch_dropped == 1);
  }
  {  // edgemoe: a landed guess for the next layer is valued as if used, so this layer's misses take others
    ExpertCache c(store, 4 * one, Policy::kStructure, 1);
    for (uint32_t l = 0; l < 3; ++l) {
      c.set_current_layer(l);
      use(c, l, 0);
    }
    c.set_current_layer(0);  // the next token
    CHECK(c.prefetch(1, {1}) == 1);
    c.wait_idle();
    use(c, 0, 1);  // full: evicts (0, 0), farthest from its next use, not the unused guess (1, 1)
    CHECK(c.contains(1, 1) && !c.contains(0, 0) && c.contains(1, 0) && c.contains(2, 0));
    use(c, 1, 1);
    CHECK(c.stats().prefetch_hits == 1 && c.stats().wasted_prefetch_bytes == 0);
  }
  {  // max_bytes caps one call, resident experts are skipped, io_threads = 0 queues nothing
    ExpertCache c(store, 0, Policy::kLru, 1);
    use(c, 1, 0);
    CHECK(c.prefetch(1, {0, 1, 2, 3}, 2 * one) == 2);
    c.wait_idle();
    CHECK(c.contains(1, 1) && c.contains(1, 2) && !c.contains(1, 3));
    CHECK(c.prefetch(1, {1, 2}) == 0);
    ExpertCache none(store, 0, Policy::kLru, 0);
    CHECK(none.prefetch(1, {0}) == 0 && none.io_threads() == 0);
    use(none, 1, 0);  // demand reads happen on the calling thread
    CHECK(none.contains(1, 0));
    CHECK(throws<std::invalid_argument>([&] { c.prefetch(1, {4}); }, "out of range"));
  }
}

// Prefetch hits, waste, cancellation and demand priority, on emulated slow storage.
static void test_prefetch_flow() {
  TestFile f;
  f.L = 2;
  f.E = 8;
  write_file(f, 64, 64, four_bits);
  auto store = open_store(f);
  const uint64_t one = store->read_capacity(0, 0);
  store->set_throttle(0, 0.02);  // 20 ms per read
  {
    ExpertCache c(store, 0, Policy::kLru, 1);
    CHECK(c.prefetch(1, {0, 1, 2, 3, 4, 5}) == 6);
    const auto t0 = std::chrono::steady_clock::now();
    use(c, 0, 7);  // a demand read goes before the queued prefetches (at most one is in flight)
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(dt < 0.1);
    CHECK(c.stats().prefetch_loads <= 2);
    const size_t cancelled = c.cancel_prefetches(1);
    CHECK(cancelled >= 3 && c.stats().prefetch_cancelled == cancelled);
    c.wait_idle();
    const CacheStats s = c.stats();
    CHECK(s.prefetch_loads + cancelled == 6 && s.prefetch_issued == 6);
    // A demand for an expert whose prefetch is resident or in flight is a prefetch hit; one cancelled is a miss.
    uint32_t landed = 8;
    for (uint32_t e = 0; e < 6; ++e)
      if (c.contains(1, e)) landed = e;
    CHECK(landed < 8);
    use(c, 1, landed);
    CHECK(c.stats().prefetch_hits == 1 && c.stats().hits == 1);
  }
  store->set_throttle(0, 0);
  {  // evicted unused: wasted bytes; cancel of one layer leaves the other
    ExpertCache c(store, 3 * one, Policy::kLru, 1);
    c.set_current_layer(0);
    CHECK(c.prefetch(1, {0, 1}) == 2);
    c.wait_idle();
    use(c, 1, 0);  // used: not wasted
    use(c, 0, 0);
    use(c, 0, 1);  // evicts (1, 1), never used
    CHECK(!c.contains(1, 1) && c.stats().wasted_prefetch_bytes == store->blob_size(1, 1));
    CHECK(c.stats().prefetch_hits == 1);
  }
}

// Storage emulation: n bytes take at least latency + n / bandwidth, shared by concurrent readers.
static void test_throttle() {
  TestFile f;
  f.L = 1;
  f.E = 8;
  write_file(f, 64, 64, four_bits);
  auto store = open_store(f);
  CHECK(throws<std::invalid_argument>([&] { store->set_throttle(-1, 0); }));
  const double bw = 2e6, lat = 0.005;
  store->set_throttle(bw, lat);
  CHECK(store->read_bytes_per_s() == bw && store->read_latency_s() == lat);
  auto t0 = std::chrono::steady_clock::now();
  store->read(0, 0);
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(dt >= lat + double(store->blob_size(0, 0)) / bw);
  // Four I/O threads read all eight: the bandwidth is shared, not multiplied.
  ExpertCache c(store, 0, Policy::kLru, 4);
  uint64_t total = 0;
  for (uint32_t e = 0; e < 8; ++e) total += store->blob_size(0, e);
  t0 = std::chrono::steady_clock::now();
  CHECK(c.prefetch(0, {0, 1, 2, 3, 4, 5, 6, 7}) == 8);
  c.wait_idle();
  dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(dt >= double(total) / bw);
  CHECK(c.stats().read_seconds >= double(total) / bw);
  std::printf("  throttle: %.1f ms for %llu bytes at %.0f MB/s (floor %.1f ms)\n", dt * 1e3, (unsigned long long)total,
              bw / 1e6, 1e3 * double(total) / bw);
  store->set_throttle(0, 0);
}

// moe_forward with a storm of (mostly wrong) prefetches on other threads: the
// same output as with an unbounded cache, the budget never exceeded.
static void test_prefetch_storm() {
  const uint32_t H = 64, I = 64;
  TestFile f;
  f.L = 3;
  f.E = 8;
  write_file(f, H, I);
  auto store = open_store(f);
  uint64_t biggest = 0;
  for (uint32_t e = 0; e < f.E; ++e) biggest = std::max(biggest, store->read_capacity(0, e));
  const int64_t T = 3, K = 2;
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::vector<float>> xs, ws;
  std::mt19937 r(7);
  for (int i = 0; i < 60; ++i) {
    std::vector<int32_t> id(size_t(T * K));
    for (int64_t t = 0; t < T; ++t) {
      id[size_t(t * K)] = int32_t(r() % f.E);
      id[size_t(t * K + 1)] = int32_t((uint32_t(id[size_t(t * K)]) + 1 + r() % (f.E - 1)) % f.E);
    }
    ids.push_back(id);
    xs.push_back(rand_vec(size_t(T * H)));
    ws.push_back(rand_vec(size_t(T * K)));
  }
  auto run = [&](ExpertCache& c, std::vector<std::vector<float>>& out) {
    for (size_t i = 0; i < ids.size(); ++i) {
      out[i].resize(size_t(T * H));
      moe_forward(c, uint32_t(i % f.L), xs[i].data(), T, H, ids[i].data(), ws[i].data(), K, out[i].data());
    }
  };
  std::vector<std::vector<float>> ref(ids.size()), got(ids.size());
  {
    ExpertCache unbounded(store, 0, Policy::kLru, 0);
    run(unbounded, ref);
  }
  for (Policy p : {Policy::kLru, Policy::kLfu, Policy::kStructure}) {
    ExpertCache c(store, 7 * biggest, p, 2);  // room for a layer's 6 and one more
    std::atomic<bool> stop{false};
    std::thread storm([&] {
      std::mt19937 g(11);
      while (!stop) {
        std::vector<uint32_t> guess;
        for (int j = 0; j < 4; ++j) guess.push_back(g() % f.E);
        c.prefetch(g() % f.L, guess, g() % 2 ? 0 : 2 * biggest);
        if (g() % 3 == 0) c.cancel_prefetches(g() % 2 ? -1 : int64_t(g() % f.L));
        std::this_thread::yield();
      }
    });
    run(c, got);
    stop = true;
    storm.join();
    c.wait_idle();
    bool same = true;
    for (size_t i = 0; i < ids.size(); ++i)
      same = same && std::memcmp(ref[i].data(), got[i].data(), ref[i].size() * 4) == 0;
    CHECK(same);
    const CacheStats s = c.stats();
    CHECK(s.peak_resident_bytes <= c.budget_bytes() && s.resident_bytes <= c.budget_bytes());
    CHECK(s.hits + s.misses > 0 && s.prefetch_issued > 0);
    uint64_t hits = 0;
    for (const LayerStats& ls : c.layer_stats()) hits += ls.hits;
    CHECK(hits == s.hits);
  }
}

// Threads acquiring, prefetching and cancelling at once under a tight budget
// (for TSan and ASan); the budget holds in flight included.
static void test_prefetch_threads() {
  TestFile f;
  f.L = 3;
  f.E = 6;
  write_file(f, 64, 64);
  auto store = open_store(f);
  uint64_t biggest = 0;
  for (uint32_t e = 0; e < f.E; ++e) biggest = std::max(biggest, store->read_capacity(0, e));
  for (Policy p : {Policy::kLru, Policy::kStructure}) {
    ExpertCache cache(store, 5 * biggest, p, 2);
    std::atomic<int> bad{0}, budget_errors{0};
    std::vector<std::thread> threads;
    for (int t = 1; t < 4; ++t)
      threads.emplace_back([&, t] {
        std::mt19937 r(uint32_t(t) + 100);
        for (int it = 0; it < 200; ++it) {
          const uint32_t l = r() % f.L;
          try {
            if (t == 3) {  // the prefetcher
              cache.prefetch(l, {uint32_t(r() % f.E), uint32_t(r() % f.E), uint32_t(r() % f.E)}, r() % 2 ? 0 : biggest);
              if (it % 4 == 0) cache.cancel_prefetches(it % 8 ? -1 : int64_t(l));
              std::this_thread::sleep_for(std::chrono::microseconds(300));
              continue;
            }
            cache.set_current_layer(l);
            const uint32_t a = r() % f.E, b = (a + 1 + r() % (f.E - 1)) % f.E;
            LayerRequest req = cache.request(l, {a, b});
            while (!req.done()) {
              PinnedExpert pe = req.next();
              const size_t i = l * f.E + pe.expert();
              if (pe.blob().size != f.blobs[i].size() ||
                  std::memcmp(pe.blob().data, f.blobs[i].data(), pe.blob().size) != 0)
                ++bad;
            }
          } catch (const BudgetError&) {
            ++budget_errors;  // the other threads may pin everything at once
          }
        }
      });
    for (auto& th : threads) th.join();
    cache.wait_idle();
    CHECK(bad == 0);
    const CacheStats s = cache.stats();
    CHECK(s.peak_resident_bytes <= cache.budget_bytes());
    // Every issued prefetch was read, cancelled, dropped, or demanded before it started.
    CHECK(s.prefetch_loads > 0 && s.prefetch_loads + s.prefetch_cancelled + s.prefetch_dropped <= s.prefetch_issued);
    cache.clear();  // nothing is left deferred or pinned: a prefetch runs
    CHECK(cache.prefetch(0, {0}) == 1);
    cache.wait_idle();
    CHECK(cache.contains(0, 0));
    std::printf(
        "  prefetch threads (%s): %llu hits, %llu misses, %llu loads (%llu prefetched), %llu prefetch hits, "
        "%llu cancelled, %llu dropped, %d budget errors\n",
        policy_name(p), (unsigned long long)s.hits, (unsigned long long)s.misses, (unsigned long long)s.loads,
        (unsigned long long)s.prefetch_loads, (unsigned long long)s.prefetch_hits,
        (unsigned long long)s.prefetch_cancelled, (unsigned long long)s.prefetch_dropped, budget_errors.load());
  }
}

// A request bigger than the budget proceeds in turns: pins free room as experts finish.
static void test_request_larger_than_budget() {
  TestFile f;
  f.L = 1;
  f.E = 8;
  write_file(f, 64, 64, four_bits);
  auto store = open_store(f);
  const uint64_t one = store->read_capacity(0, 0);
  for (int io : {0, 2}) {
    ExpertCache c(store, 2 * one, Policy::kLru, io);
    LayerRequest req = c.request(0, {0, 1, 2, 3, 4, 5, 6, 7});
    int n = 0;
    while (!req.done()) {
      PinnedExpert p = req.next();
      ++n;
    }
    CHECK(n == 8 && c.stats().peak_resident_bytes <= 2 * one && c.stats().misses == 8);
  }
  ExpertCache c(store, 2 * one, Policy::kLru, 2);
  PinnedExpert a = c.acquire(0, 0), b = c.acquire(0, 1);
  CHECK(throws<BudgetError>([&] { c.acquire(0, 2); }, "pinned or being read"));
  std::printf("  entry overhead: %zu bytes per (layer, expert), %zu per layer of statistics\n",
              ExpertCache::kEntryBytes, sizeof(LayerStats));
}

// Low-bit fallback: a second store of 2-bit copies (expert 3 of each layer has none).
static uint32_t two_bits(uint32_t, uint32_t) { return 2; }

static void test_fallback() {
  const uint32_t H = 64, I = 64;
  TestFile full, low;
  full.L = low.L = 2;
  full.E = low.E = 4;
  write_file(full, H, I, four_bits);
  write_file(low, H, I, two_bits);
  for (uint32_t l = 0; l < low.L; ++l) low.sizes[l * low.E + 3] = 0;  // no copy
  auto store = open_store(full), lstore = open_store(low);
  const int64_t T = 2, K = 2;
  auto x = rand_vec(size_t(T) * H);
  // token 0: experts 0 (0.9) and 1 (0.1); token 1: experts 2 (0.8) and 1 (0.2)
  std::vector<int32_t> ids = {0, 1, 2, 1};
  std::vector<float> w = {0.9f, 0.1f, 0.8f, 0.2f};
  auto reference = [&](const std::vector<bool>& low_bit) {  // y from the scalar reference, per expert copy
    std::vector<double> y(size_t(T) * H, 0.0);
    for (int64_t i = 0; i < T * K; ++i) {
      const uint32_t e = uint32_t(ids[size_t(i)]);
      const auto& mats = (low_bit[e] ? low : full).mats[full.E + e];
      // an expert routed one token runs the one-token (decode) path
      const bool one = std::count(ids.begin(), ids.end(), int32_t(e)) == 1;
      auto out = expert_ref(mats, &x[size_t(i / K) * H], H, I, one && decode_x8() ? XRound::kDecode : XRound::kNone);
      for (uint32_t h = 0; h < H; ++h) y[size_t(i / K) * H + h] += w[size_t(i)] * out[h];
    }
    return y;
  };
  auto close_to = [&](const std::vector<float>& y, const std::vector<double>& ref) {
    double mx = 0, err = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      mx = std::max(mx, std::fabs(ref[i]));
      err = std::max(err, std::fabs(y[i] - ref[i]));
    }
    return err <= 1e-4 * mx;
  };
  std::vector<float> y0(size_t(T) * H), y(size_t(T) * H);
  {
    ExpertCache plain(store, 0);
    moe_forward(plain, 1, x.data(), T, H, ids.data(), w.data(), K, y0.data());
  }
  for (int io : {0, 2}) {
    ExpertCache c(store, 0, Policy::kLru, io, lstore);
    moe_forward(c, 1, x.data(), T, H, ids.data(), w.data(), K, y.data());  // threshold 0: off
    CHECK(std::memcmp(y.data(), y0.data(), y.size() * 4) == 0 && c.stats().fallback_uses == 0);
    c.clear();
    c.reset_stats();
    c.set_fallback_threshold(0.5f);
    // expert 1 is below 0.5 for both its tokens: its low-bit copy; 0 and 2 are not
    moe_forward(c, 1, x.data(), T, H, ids.data(), w.data(), K, y.data());
    CHECK(close_to(y, reference({false, true, false, false})));
    CHECK(c.contains(1, 1, true) && !c.contains(1, 1) && c.contains(1, 0) && !c.contains(1, 0, true));
    CacheStats s = c.stats();
    CHECK(s.fallback_uses == 1 && s.fallback_loads == 1 && s.fallback_bytes == low.sizes[full.E + 1]);
    CHECK(s.fallback_bytes_saved == full.sizes[full.E + 1] - low.sizes[full.E + 1] && s.misses == 3);
    // again: the low-bit copy is a hit, nothing is read
    moe_forward(c, 1, x.data(), T, H, ids.data(), w.data(), K, y.data());
    s = c.stats();
    CHECK(s.fallback_uses == 2 && s.fallback_loads == 1 && s.hits == 3 && s.loads == 3);
    CHECK(s.fallback_bytes_saved == 2 * full.sizes[full.E + 1] - low.sizes[full.E + 1]);
    // a high weight for expert 1: its full copy is read; from then on it serves the low weights too
    std::vector<float> w_high = {0.4f, 0.6f, 0.8f, 0.2f};
    moe_forward(c, 1, x.data(), T, H, ids.data(), w_high.data(), K, y.data());
    CHECK(c.contains(1, 1) && c.stats().fallback_uses == 2);
    moe_forward(c, 1, x.data(), T, H, ids.data(), w.data(), K, y.data());
    CHECK(std::memcmp(y.data(), y0.data(), y.size() * 4) == 0 && c.stats().fallback_uses == 2);
    // expert 3 has no low-bit copy: always its full copy
    std::vector<int32_t> ids3 = {3, 0, 3, 2};
    std::vector<float> w3 = {0.1f, 0.9f, 0.2f, 0.8f};
    c.clear();
    moe_forward(c, 1, x.data(), T, H, ids3.data(), w3.data(), K, y.data());
    CHECK(c.contains(1, 3) && c.stats().fallback_uses == 2);
  }
  // Budget: the low-bit copy is charged its own (smaller) pages.
  {
    const uint64_t one = store->read_capacity(1, 1), lone = lstore->read_capacity(1, 1);
    ExpertCache c(store, one + lone, Policy::kLru, 2, lstore);
    c.set_fallback_threshold(0.5f);
    moe_forward(c, 1, x.data(), 1, H, ids.data() + 2, w.data() + 2, K, y.data());  // 2 full, 1 low
    CHECK(c.contains(1, 2) && c.contains(1, 1, true) && c.resident_bytes() == one + lone);
    CHECK(c.stats().peak_resident_bytes <= one + lone);
  }
  CHECK(throws<std::invalid_argument>([&] { ExpertCache(store, 0).set_fallback_threshold(0.5f); }, "no low-bit"));
  CHECK(throws<std::invalid_argument>(
      [&] { ExpertCache(store, 0, Policy::kLru, 0, lstore).set_fallback_threshold(-1); }));
  TestFile other;
  other.L = 1;
  other.E = 4;
  write_file(other, H, I, two_bits);
  CHECK(
      throws<std::invalid_argument>([&] { ExpertCache(store, 0, Policy::kLru, 0, open_store(other)); }, "must match"));

  // Threads: requests mixing full and low-bit copies, prefetches and a tight budget;
  // each pinned blob must be the copy it claims to be (for TSan and ASan).
  uint64_t biggest = 0;
  for (uint32_t e = 0; e < full.E; ++e) biggest = std::max(biggest, store->read_capacity(0, e));
  ExpertCache c(store, 3 * biggest, Policy::kStructure, 2, lstore);
  c.set_fallback_threshold(0.3f);
  std::atomic<int> bad{0}, budget_errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 r(uint32_t(t) + 200);
      for (int it = 0; it < 200; ++it) {
        const uint32_t l = r() % full.L;
        try {
          if (t == 2) {
            c.prefetch(l, {uint32_t(r() % full.E), uint32_t(r() % full.E)});
            if (it % 3 == 0) c.cancel_prefetches();
            std::this_thread::sleep_for(std::chrono::microseconds(200));
            continue;
          }
          c.set_current_layer(l);
          const uint32_t a = r() % full.E, b = (a + 1 + r() % (full.E - 1)) % full.E;
          const std::vector<uint8_t> low_ok = {uint8_t(r() % 2), uint8_t(r() % 2)};
          LayerRequest req = c.request(l, {a, b}, true, &low_ok);
          while (!req.done()) {
            PinnedExpert pe = req.next();
            const size_t i = l * full.E + pe.expert();
            const auto& want = (pe.low_bit() ? low : full).blobs[i];
            if (pe.blob().size != want.size() || std::memcmp(pe.blob().data, want.data(), want.size()) != 0) ++bad;
            if (pe.low_bit() && !low_ok[pe.expert() == a ? 0 : 1]) ++bad;
          }
        } catch (const BudgetError&) {
          ++budget_errors;
        }
      }
    });
  for (auto& th : threads) th.join();
  c.wait_idle();
  CHECK(bad == 0);
  const CacheStats s = c.stats();
  CHECK(s.peak_resident_bytes <= c.budget_bytes() && s.fallback_uses > 0 && s.fallback_loads <= s.loads);
  std::printf("  fallback threads: %llu hits, %llu misses, %llu fallback uses (%llu read), %d budget errors\n",
              (unsigned long long)s.hits, (unsigned long long)s.misses, (unsigned long long)s.fallback_uses,
              (unsigned long long)s.fallback_loads, budget_errors.load());
}

// One token whose experts are all resident: with two threads each expert runs whole on one
// thread; with one (and with three for two experts: too uneven) each expert's rows are split.
// Bit for bit the same, also with a second caller on another thread at the same time
// (whose pool calls then run inline).
static void test_one_token_experts_in_parallel() {
  const uint32_t H = 64, I = 96;
  TestFile f;
  f.L = 2;
  f.E = 4;
  write_file(f, H, I);
  auto store = open_store(f, Verify::kFirstRead);
  ExpertCache cache(store, 0);
  ThreadPool& pool = ThreadPool::instance();
  const int n0 = pool.num_threads();
  for (int64_t K : {2, 3, 4}) {
    auto x = rand_vec(static_cast<size_t>(H));
    std::vector<int32_t> ids(static_cast<size_t>(K));
    std::vector<float> w(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) {
      ids[size_t(k)] = int32_t(k);
      w[size_t(k)] = float(k + 1) / 10.0f;
    }
    std::vector<float> want(static_cast<size_t>(H));
    pool.set_num_threads(1);
    moe_forward(cache, 1, x.data(), 1, H, ids.data(), w.data(), K, want.data());  // reads them: resident after
    for (int n : {2, 3, 2}) {
      pool.set_num_threads(n);
      std::vector<float> y(static_cast<size_t>(H)), y_other(static_cast<size_t>(H));
      std::thread other([&] { moe_forward(cache, 1, x.data(), 1, H, ids.data(), w.data(), K, y_other.data()); });
      moe_forward(cache, 1, x.data(), 1, H, ids.data(), w.data(), K, y.data());
      other.join();
      CHECK(std::memcmp(y.data(), want.data(), want.size() * 4) == 0);
      CHECK(std::memcmp(y_other.data(), want.data(), want.size() * 4) == 0);
    }
  }
  pool.set_num_threads(n0);
}

static void test_pool() {
  ThreadPool& pool = ThreadPool::instance();
  const int n0 = pool.num_threads();
  for (int n : {1, 3, 2}) {
    pool.set_num_threads(n);
    std::vector<std::atomic<int>> hit(1000);
    pool.parallel_for(1000, [&](int64_t i) { hit[size_t(i)]++; });
    bool ok = true;
    for (auto& h : hit) ok = ok && h == 1;
    CHECK(ok);
    std::atomic<int> inner{0};  // nested calls run inline
    pool.parallel_for(8, [&](int64_t) { pool.parallel_for(4, [&](int64_t) { inner++; }); });
    CHECK(inner == 32);
  }
  pool.set_num_threads(n0);
}

// wake() from another thread while jobs run, and into a pool whose workers sleep (spin 0)
// or spin: every job still runs each task once, and a pool stopped (resized) meanwhile
// leaves no worker behind.
static void test_pool_wake() {
  ThreadPool& pool = ThreadPool::instance();
  const int n0 = pool.num_threads(), spin0 = pool.spin_microseconds();
  for (int spin : {0, 200}) {
    pool.set_spin_microseconds(spin);
    pool.set_num_threads(3);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // the workers sleep (spin 0)
    pool.wake();
    pool.wake();
    std::atomic<bool> done{false};
    std::thread waker([&] {
      while (!done) pool.wake();
    });
    bool ok = true;
    for (int job = 0; job < 200; ++job) {
      std::vector<std::atomic<int>> hit(64);
      pool.parallel_for(64, [&](int64_t i) { hit[size_t(i)]++; });
      for (auto& h : hit) ok = ok && h == 1;
      if (job == 100) pool.set_num_threads(2);
    }
    done = true;
    waker.join();
    CHECK(ok);
  }
  pool.set_spin_microseconds(spin0);
  pool.set_num_threads(n0);
}

// ---------------------------------------------------------------- link switch (the link emulator's loop)
#if defined(__linux__)
// An IPv4/UDP packet of `size` bytes from src to dst whose payload starts with n.
static std::vector<uint8_t> udp_packet(uint32_t src, uint32_t dst, uint16_t sport, uint16_t dport, uint32_t n,
                                       size_t size) {
  std::vector<uint8_t> p(std::max<size_t>(size, 32), 0);
  p[0] = 0x45;
  p[2] = uint8_t(p.size() >> 8);
  p[3] = uint8_t(p.size());
  p[9] = 17;
  for (int b = 0; b < 4; ++b) {
    p[12 + b] = uint8_t(src >> (24 - 8 * b));
    p[16 + b] = uint8_t(dst >> (24 - 8 * b));
  }
  p[20] = uint8_t(sport >> 8), p[21] = uint8_t(sport), p[22] = uint8_t(dport >> 8), p[23] = uint8_t(dport);
  std::memcpy(p.data() + 28, &n, 4);
  return p;
}

static double mono_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Reads `count` packets from fd (blocking); returns (arrival time, the number in each).
static std::vector<std::pair<double, uint32_t>> receive_packets(int fd, int count) {
  std::vector<std::pair<double, uint32_t>> got;
  std::vector<uint8_t> buf(70000);
  while (int(got.size()) < count) {
    ssize_t n = read(fd, buf.data(), buf.size());
    if (n < 32) break;
    uint32_t k;
    std::memcpy(&k, buf.data() + 28, 4);
    got.push_back({mono_s(), k});
  }
  return got;
}

static void test_link_switch() {
  // Three endpoints over packet socket pairs: [0] the switch's end, [1] the endpoint's.
  const uint32_t head = 0x0A000001, slow = 0x0A000002, far = 0x0A000003;
  int pairs[3][2];
  for (auto& p : pairs) {
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, p) == 0);
    fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK);
  }
  const double slow_delay = 0.002, slow_rate = 8e6, far_delay = 0.001;  // 8 Mbit/s: 1 ms per 1000 bytes
  std::vector<LinkPort> ports = {{pairs[0][0], head, 0, 0}, {pairs[1][0], slow, slow_delay, slow_rate},
                                 {pairs[2][0], far, far_delay, 0}};
  CHECK(throws<std::invalid_argument>([&] { LinkSwitch bad({ports[0], ports[0]}); }, "one address"));
  CHECK(throws<std::invalid_argument>([&] { LinkSwitch bad({}); }, "no ports"));

  int watch[2];
  CHECK(pipe(watch) == 0);
  LinkSwitch sw(ports);
  std::atomic<int> why{-1};
  std::thread t([&] { why = sw.run(watch[0]); });

  // Delay and pacing: ten 1000-byte packets head -> slow take 1 ms each on the slow link; a
  // 40-byte one sent after them does not overtake them.
  const double t0 = mono_s();
  for (uint32_t k = 0; k < 10; ++k) {
    auto p = udp_packet(head, slow, 5000, 6000, k, 1000);
    CHECK(write(pairs[0][1], p.data(), p.size()) == ssize_t(p.size()));
  }
  auto small = udp_packet(head, slow, 5000, 6000, 10, 40);
  CHECK(write(pairs[0][1], small.data(), small.size()) == ssize_t(small.size()));
  // Meanwhile a packet to the other node is held for its own delay only.
  auto other = udp_packet(head, far, 5000, 7000, 99, 100);
  CHECK(write(pairs[0][1], other.data(), other.size()) == ssize_t(other.size()));
  auto to_far = receive_packets(pairs[2][1], 1);
  auto to_slow = receive_packets(pairs[1][1], 11);
  CHECK(to_far.size() == 1 && to_far[0].second == 99 && to_far[0].first - t0 >= far_delay);
  CHECK(to_far.size() == 1 && to_slow.size() == 11 && to_far[0].first < to_slow.back().first);
  CHECK(to_slow.size() == 11);
  for (size_t k = 0; k < to_slow.size(); ++k) {
    CHECK(to_slow[k].second == k);  // in the order sent
    // packet k cannot arrive before k + 1 packets' time on the 8 Mbit/s link plus its delay
    CHECK(to_slow[k].first - t0 >= slow_delay + 1e-3 * double(std::min<size_t>(k + 1, 10)) - 1e-6);
  }

  // The way back: slow -> head pays the slow link's delay and rate on leaving.
  const double t1 = mono_s();
  auto back = udp_packet(slow, head, 6000, 5000, 7, 500);
  CHECK(write(pairs[1][1], back.data(), back.size()) == ssize_t(back.size()));
  auto to_head = receive_packets(pairs[0][1], 1);
  CHECK(to_head.size() == 1 && to_head[0].second == 7 && to_head[0].first - t1 >= slow_delay + 0.5e-3 - 1e-6);

  // Not IPv4, and to an address no port has: dropped and counted.
  std::vector<uint8_t> v6(40, 0);
  v6[0] = 0x60;
  CHECK(write(pairs[0][1], v6.data(), v6.size()) == 40);
  auto nowhere = udp_packet(head, 0x0A000009, 1, 2, 0, 64);
  CHECK(write(pairs[0][1], nowhere.data(), nowhere.size()) == 64);

  // The watched descriptor readable (a signal's wake-up byte): run() returns, and can be called again.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(write(watch[1], "x", 1) == 1);
  t.join();
  CHECK(why == LinkSwitch::kReadable);
  LinkStats s = sw.stats();
  CHECK(s.packets == 13 && s.dropped == 2);
  CHECK(s.bytes == 10 * 1000 + 40 + 100 + 500);
  uint64_t slow_packets = 0;
  for (const LinkFlow& f : s.flows) {
    if (f.src == 0 && f.dst == 1) {
      CHECK(f.protocol == 17 && f.sport == 5000 && f.dport == 6000);
      slow_packets += f.packets;
      CHECK(f.queued_s > 0.03);  // the 10 followers waited 1..10 ms behind the first ones
    }
  }
  CHECK(slow_packets == 11 && s.flows.size() == 3);
  CHECK(s.late_max_s >= 0 && s.seconds > 0);

  // stop() from another thread ends a run, even one that has not started yet.
  sw.stop();
  CHECK(sw.run() == LinkSwitch::kStopped);
  std::thread t2([&] { why = sw.run(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  sw.stop();
  t2.join();
  CHECK(why == LinkSwitch::kStopped);
  for (auto& p : pairs) close(p[0]), close(p[1]);
  close(watch[0]), close(watch[1]);
}
#endif

int main() {
  std::printf("simd: %s, crc32c: %s\n", simd_name(), crc32c_impl());
  test_pool();
  test_pool_wake();
  test_one_token_experts_in_parallel();
  test_kernels();
  test_portable_kernels();
  test_mxfp4_kernels();
  test_int8_prefill();
#if defined(EDGEMOE_X86)
  test_avx512_kernels();
#endif
#if defined(EDGEMOE_NEON)
  test_neon_kernels();
  test_neon_decode_scales();
#endif
  test_dense_ops();
  test_rounded_rows();
  test_expert_forward();
  test_relu_expert_forward();
  test_expert_glu();
  test_crc();
  test_sample();
  test_store_and_cache();
  test_moe_slots();
  test_decode_layer();
  test_cache_threads();
  test_policy_scores();
  test_policy_evictions();
  test_prefetch_admission();
  test_prefetch_flow();
  test_throttle();
  test_prefetch_storm();
  test_prefetch_threads();
  test_request_larger_than_budget();
  test_fallback();
#if defined(__linux__)
  test_link_switch();
#endif
  if (g_failures) {
    std::printf("%d check(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("all native tests passed\n");
  return 0;
}
