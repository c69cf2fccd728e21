// The AVX-512 kernels (F, BW, VL and VNNI): vpdpbusd multiplies unsigned codes with
// int8 activations and sums four products into each 32-bit lane, with no 16-bit
// saturation; vpdpwssd two 16-bit products (8-bit codes, whose x is int16).
//   - decode (T=1) of 4-bit codes: two blocks of 32 per zmm, x rounded to int8 per 32
//     values as the AVX2 decode rounds it (the same integers, the same DecodeInput); MXFP4
//     the same way, its codes looked up with vpshufb first;
//   - prefill with int8 activations (codes of 2, 3 or 4 bits, MXFP4): a panel of 16 rows is
//     unpacked to bytes, interleaved so that one zmm holds 4 consecutive values of each of
//     the 16 rows; every token runs over it with its 4 int8 values broadcast. 8-bit codes:
//     code - 128 in 16 bits, 2 values of each row per zmm, times 2 of a token's int16 values.
// Compiled on every x86-64 build with its own target (a pragma, not a flag for the file,
// so no inline function shared with other files is built with AVX-512), and chosen at run
// time from CPUID and the OS's XSAVE state (cpu_ok), so one build serves every x86 CPU.
// The native tests build this source a second time against SIMDe (SIMD Everywhere) as
// namespace avx512_simde (tests/kernels_avx512_simde.cpp): the same kernels, checked on
// CPUs without AVX-512.
#include "kernels_impl.h"

#if defined(EDGEMOE_X86)

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(EDGEMOE_AVX512_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define EDGEMOE_AVX512_NS avx512_simde
#else
#include <cpuid.h>
#include <immintrin.h>
#define EDGEMOE_AVX512_NS avx512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
// GCC 12's AVX-512 headers pass an undefined vector as the unmasked source (GCC bug 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace edgemoe::kernels::EDGEMOE_AVX512_NS {

namespace {

#if defined(EDGEMOE_AVX512_SIMDE)
using Mask32 = simde__mmask32;  // SIMDe aliases the intrinsics, not the mask types, without native AVX2
#else
using Mask32 = __mmask32;
#endif

constexpr int kPrefetchBytes = 2048;  // how far decode runs ahead of the weight stream
constexpr uint32_t kPanel = 16;       // rows per prefill panel, one per 32-bit lane
constexpr int kPanelTokens = 8;       // tokens per pass over a panel: 8 dots + 8 sums in registers

// Three operations SIMDe 0.7 (Debian's) lacks, written from ones it has in its build.
inline __m512 cvt_ps(__m512i v) {
#if defined(EDGEMOE_AVX512_SIMDE)
  const __m256 lo = _mm256_cvtepi32_ps(_mm512_castsi512_si256(v)), hi = _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(v, 1));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
#else
  return _mm512_cvtepi32_ps(v);
#endif
}

inline float hsum(__m512 v) {
#if defined(EDGEMOE_AVX512_SIMDE)
  alignas(64) float l[16];
  _mm512_store_ps(l, v);
  float s = 0;
  for (float f : l) s += f;
  return s;
#else
  return _mm512_reduce_add_ps(v);
#endif
}

// Lanes [0, n) of v to p.
inline void store_n(float* p, __m512 v, uint32_t n) {
#if defined(EDGEMOE_AVX512_SIMDE)
  alignas(64) float l[16];
  _mm512_store_ps(l, v);
  std::memcpy(p, l, n * sizeof(float));
#else
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v);
#endif
}

inline float scale_of(const uint8_t* sc, uint32_t g) { return f16_to_f32(load_u16(sc + 2 * g)); }

// sum_g min_g * xsum[g] for one row, before the factor min_mult (a power of two).
inline float min_term(const uint8_t* mn, const float* xsum, uint32_t ng) {
  float v = 0;
  for (uint32_t g = 0; g < ng; ++g) v += scale_of(mn, g) * xsum[g];
  return v;
}

// 32 4-bit codes (v[j] low nibble, v[j+16] high nibble of byte j) -> their values as bytes, in order.
inline __m256i nibbles32(const uint8_t* p) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

// Two consecutive chunks of 4-bit codes (32 bytes) -> their 64 values as bytes, in order.
inline __m512i nibbles64(const uint8_t* p) {
  const __m512i c = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i lanes = _mm512_shuffle_i32x4(c, c, 0x50);  // 128-bit lanes: chunk 0, chunk 0, chunk 1, chunk 1
  return _mm512_and_si512(_mm512_srlv_epi64(lanes, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(0x0F));
}

// ---- decode, 4-bit codes: RR rows share each load of x; per pair of blocks one vpdpbusd
// per row gives 16 lanes (8 per block), scaled by dx * the block's group scale.
template <int RR>
void q4_rows(const QMatrix& w, uint32_t r, const int8_t* x8, const float* dx, const float* xsum, float* y) {
  const uint32_t nb = w.cols / kChunk, cpg = w.group_size / kChunk, ng = nb / cpg;
  const uint8_t* codes[RR];
  const uint8_t* sc[RR];
  __m512 acc[RR];
  for (int i = 0; i < RR; ++i) {
    codes[i] = w.data + uint64_t(r + uint32_t(i)) * w.row_bytes();
    sc[i] = w.scales + uint64_t(r + uint32_t(i)) * ng * 2;
    acc[i] = _mm512_setzero_ps();
  }
  uint32_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m512i xv = _mm512_loadu_si512(x8 + b * kChunk);
    for (int i = 0; i < RR; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(codes[i] + b * 16) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), nibbles64(codes[i] + b * 16), xv);
      const __m512 m = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(dx[b] * scale_of(sc[i], b / cpg)),
                                            _mm512_set1_ps(dx[b + 1] * scale_of(sc[i], (b + 1) / cpg)));
      acc[i] = _mm512_fmadd_ps(cvt_ps(p), m, acc[i]);
    }
  }
  if (b < nb) {  // an odd last block: lanes 8..15 masked to zero
    const __m512i xv =
        _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + b * kChunk)), 0);
    for (int i = 0; i < RR; ++i) {
      const __m512i v = _mm512_inserti64x4(_mm512_setzero_si512(), nibbles32(codes[i] + b * 16), 0);
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, xv);
      acc[i] = _mm512_fmadd_ps(cvt_ps(p), _mm512_set1_ps(dx[b] * scale_of(sc[i], b / cpg)), acc[i]);
    }
  }
  for (int i = 0; i < RR; ++i)
    y[r + uint32_t(i)] = hsum(acc[i]) +
                         w.min_mult * min_term(w.mins + uint64_t(r + uint32_t(i)) * ng * 2, xsum, ng);
}

// ---- decode, MXFP4 (kind 5): as q4_rows, the codes looked up (vpshufb) as kE2m1x2 +
// kMxOffset (0..24, unsigned for vpdpbusd); the offset comes back out once per row as
// kMxOffset * sum_b s_b xsum_b, s_b = 2^(e_b - 128) the block's scale.
template <int RR>
void mx_rows(const QMatrix& w, uint32_t r, const int8_t* x8, const float* dx, const float* xsum, float* y) {
  alignas(16) static constexpr int8_t kLut[16] = {
      kE2m1x2[0] + kMxOffset,  kE2m1x2[1] + kMxOffset,  kE2m1x2[2] + kMxOffset,  kE2m1x2[3] + kMxOffset,
      kE2m1x2[4] + kMxOffset,  kE2m1x2[5] + kMxOffset,  kE2m1x2[6] + kMxOffset,  kE2m1x2[7] + kMxOffset,
      kE2m1x2[8] + kMxOffset,  kE2m1x2[9] + kMxOffset,  kE2m1x2[10] + kMxOffset, kE2m1x2[11] + kMxOffset,
      kE2m1x2[12] + kMxOffset, kE2m1x2[13] + kMxOffset, kE2m1x2[14] + kMxOffset, kE2m1x2[15] + kMxOffset};
  const __m128i lut16 = _mm_load_si128(reinterpret_cast<const __m128i*>(kLut));
  const __m512i lut = _mm512_broadcast_i32x4(lut16);
  const __m256i lut256 = _mm256_broadcastsi128_si256(lut16);
  const uint32_t nb = w.cols / kChunk;
  const uint8_t* codes[RR];
  const uint8_t* sc[RR];
  __m512 acc[RR];
  float mt[RR];
  for (int i = 0; i < RR; ++i) {
    codes[i] = w.data + uint64_t(r + uint32_t(i)) * w.row_bytes();
    sc[i] = w.scales + uint64_t(r + uint32_t(i)) * nb;
    acc[i] = _mm512_setzero_ps();
    mt[i] = 0;
  }
  uint32_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m512i xv = _mm512_loadu_si512(x8 + b * kChunk);
    for (int i = 0; i < RR; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(codes[i] + b * 16) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i v = _mm512_shuffle_epi8(lut, nibbles64(codes[i] + b * 16));
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, xv);
      const float s0 = e8m0_half(sc[i][b]), s1 = e8m0_half(sc[i][b + 1]);
      const __m512 m = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(dx[b] * s0), _mm512_set1_ps(dx[b + 1] * s1));
      acc[i] = _mm512_fmadd_ps(cvt_ps(p), m, acc[i]);
      mt[i] += s0 * xsum[b] + s1 * xsum[b + 1];
    }
  }
  if (b < nb) {  // an odd last block: lanes 8..15 masked to zero
    const __m512i xv =
        _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + b * kChunk)), 0);
    for (int i = 0; i < RR; ++i) {
      const __m512i v = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_shuffle_epi8(lut256, nibbles32(codes[i] + b * 16)), 0);
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, xv);
      const float s0 = e8m0_half(sc[i][b]);
      acc[i] = _mm512_fmadd_ps(cvt_ps(p), _mm512_set1_ps(dx[b] * s0), acc[i]);
      mt[i] += s0 * xsum[b];
    }
  }
  for (int i = 0; i < RR; ++i) y[r + uint32_t(i)] = hsum(acc[i]) - float(kMxOffset) * mt[i];
}

// ---- prefill with int8 activations.

// The panels' BITS for MXFP4 (kind 5): codes looked up as kE2m1x2 + kMxOffset (0..24, unsigned
// for vpdpbusd), so a block is scale * (u - kMxOffset) and its min -kMxOffset * scale.
constexpr int kMx = 5;

// One chunk of 32 codes -> its values as bytes, in order.
template <int BITS>
inline __m256i chunk_u8(const uint8_t* p) {
  if constexpr (BITS == kMx) {
    alignas(16) static constexpr int8_t kLut[16] = {
        kE2m1x2[0] + kMxOffset,  kE2m1x2[1] + kMxOffset,  kE2m1x2[2] + kMxOffset,  kE2m1x2[3] + kMxOffset,
        kE2m1x2[4] + kMxOffset,  kE2m1x2[5] + kMxOffset,  kE2m1x2[6] + kMxOffset,  kE2m1x2[7] + kMxOffset,
        kE2m1x2[8] + kMxOffset,  kE2m1x2[9] + kMxOffset,  kE2m1x2[10] + kMxOffset, kE2m1x2[11] + kMxOffset,
        kE2m1x2[12] + kMxOffset, kE2m1x2[13] + kMxOffset, kE2m1x2[14] + kMxOffset, kE2m1x2[15] + kMxOffset};
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kLut)));
    return _mm256_shuffle_epi8(lut, nibbles32(p));
  } else if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {
    return nibbles32(p);
  } else {
    static_assert(BITS == 2 || BITS == 3, "bits");
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(0x03);
    const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 2), m));
    const __m128i hi = _mm_unpacklo_epi64(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(_mm_srli_epi16(b, 6), m));
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    if constexpr (BITS == 3) {
      // bit 2 of v[j] is bit j of the u32 after the 2-bit part: a mask register of 32 bits
      v = _mm256_or_si256(v, _mm256_maskz_mov_epi8(Mask32(load_u32(p + 8)), _mm256_set1_epi8(4)));
    }
    return v;
  }
}

// v[i] = 8 dwords of row i -> v[q] = dword q of rows 0..7.
inline void transpose8x8_epi32(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    v[q] = _mm256_permute2x128_si256(u[q], u[q + 4], 0x20);
    v[q + 4] = _mm256_permute2x128_si256(u[q], u[q + 4], 0x31);
  }
}

// Rows r0..r0+n-1 (n <= 16; the others zero) -> tile [nb][8] zmm, per block b the 8 vectors
// of 4 columns (lane i: row i), and sc16, mn16 [nb][16]: each row's scale and min * min_mult.
// 8-bit codes: tile [nb][16] zmm of 2 columns each, as code - 128 in 16 bits, and mn16 the
// min plus 128 * scale (0 for symmetric codes).
template <int BITS>
void unpack_panel(const QMatrix& w, uint32_t r0, uint32_t n, __m512i* tile, float* sc16, float* mn16) {
  const uint32_t nb = w.cols / kChunk, cpg = w.group_size / kChunk, ng = nb / cpg;
  const uint64_t rb = w.row_bytes();
  constexpr uint32_t cb = chunk_bytes(BITS == kMx ? 4 : BITS);
  for (uint32_t b = 0; b < nb && BITS == 8; ++b) {
    __m256i a[4][8];  // [rows 0..7 columns 0..15, rows 0..7 columns 16..31, rows 8..15 ..., ...]
    const __m256i off = _mm256_set1_epi16(128);
    for (uint32_t i = 0; i < 16; ++i) {
      const uint32_t h = i < 8 ? 0 : 2;
      if (i >= n) {
        a[h][i % 8] = a[h + 1][i % 8] = _mm256_setzero_si256();
        continue;
      }
      const uint8_t* p = w.data + uint64_t(r0 + i) * rb + b * kChunk;
      a[h][i % 8] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), off);
      a[h + 1][i % 8] =
          _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))), off);
    }
    for (auto& v : a) transpose8x8_epi32(v);
    for (uint32_t q = 0; q < 8; ++q) {
      _mm512_store_si512(tile + b * 16 + q, _mm512_inserti64x4(_mm512_castsi256_si512(a[0][q]), a[2][q], 1));
      _mm512_store_si512(tile + b * 16 + 8 + q, _mm512_inserti64x4(_mm512_castsi256_si512(a[1][q]), a[3][q], 1));
    }
  }
  for (uint32_t b = 0; b < nb && BITS != 8; ++b) {
    __m256i lo[8], hi[8];  // rows 0..7 and 8..15
    for (uint32_t i = 0; i < 8; ++i) {
      const uint64_t off = uint64_t(r0 + i) * rb + b * cb;
      lo[i] = i < n ? chunk_u8<BITS>(w.data + off) : _mm256_setzero_si256();
      hi[i] = i + 8 < n ? chunk_u8<BITS>(w.data + off + 8 * rb) : _mm256_setzero_si256();
    }
    transpose8x8_epi32(lo);
    transpose8x8_epi32(hi);
    for (uint32_t q = 0; q < 8; ++q)
      _mm512_store_si512(tile + b * 8 + q, _mm512_inserti64x4(_mm512_castsi256_si512(lo[q]), hi[q], 1));
  }
  for (uint32_t i = 0; i < kPanel; ++i) {
    if constexpr (BITS == kMx) {
      for (uint32_t b = 0; b < nb; ++b) {
        const float s = i < n ? e8m0_half(w.scales[uint64_t(r0 + i) * nb + b]) : 0.0f;
        sc16[b * kPanel + i] = s;
        mn16[b * kPanel + i] = -float(kMxOffset) * s;
      }
      continue;
    }
    const uint8_t* sc = w.scales + uint64_t(r0 + i) * ng * 2;
    const uint8_t* mn = w.mins + uint64_t(r0 + i) * ng * 2;
    for (uint32_t b = 0; b < nb; ++b) {
      const float sv = i < n ? scale_of(sc, b / cpg) : 0.0f, mv = i < n ? w.min_mult * scale_of(mn, b / cpg) : 0.0f;
      sc16[b * kPanel + i] = sv;
      mn16[b * kPanel + i] = BITS == 8 ? mv + 128.0f * sv : mv;
    }
  }
}

template <class T>
inline __m512i bcast_i32(const T* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// NT tokens from t0 over one unpacked panel -> y[t * ystride + r0 + i] for its n rows
// (WIDE: a panel of 8-bit codes, x int16).
template <bool WIDE, int NT>
void panel_tokens(const __m512i* tile, const float* sc16, const float* mn16, uint32_t nb, const QuantizedActs& x,
                  int64_t t0, float* y, uint32_t ystride, uint32_t r0, uint32_t n) {
  using XT = std::conditional_t<WIDE, int16_t, int8_t>;
  const XT* xq[NT];
  const float* dx[NT];
  const float* bs[NT];
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) {
    if constexpr (WIDE) xq[t] = x.q16.data() + (t0 + t) * int64_t(x.cols);
    else xq[t] = x.q.data() + (t0 + t) * int64_t(x.cols);
    dx[t] = x.dx.data() + (t0 + t) * int64_t(nb);
    bs[t] = x.bsum.data() + (t0 + t) * int64_t(nb);
    acc[t] = _mm512_setzero_ps();
  }
  for (uint32_t b = 0; b < nb; ++b) {
    __m512i d[NT];
    for (int t = 0; t < NT; ++t) d[t] = _mm512_setzero_si512();
    if constexpr (WIDE) {
      const __m512i* wb = tile + b * 16;
#pragma GCC unroll 16
      for (uint32_t q = 0; q < 16; ++q) {
        const __m512i wq = _mm512_load_si512(wb + q);
        for (int t = 0; t < NT; ++t) d[t] = _mm512_dpwssd_epi32(d[t], wq, bcast_i32(xq[t] + b * kChunk + 2 * q));
      }
    } else {
      const __m512i* wb = tile + b * 8;
#pragma GCC unroll 8
      for (uint32_t q = 0; q < 8; ++q) {
        const __m512i wq = _mm512_load_si512(wb + q);
        for (int t = 0; t < NT; ++t) d[t] = _mm512_dpbusd_epi32(d[t], wq, bcast_i32(xq[t] + b * kChunk + 4 * q));
      }
    }
    const __m512 sv = _mm512_loadu_ps(sc16 + b * kPanel), mv = _mm512_loadu_ps(mn16 + b * kPanel);
    for (int t = 0; t < NT; ++t) {
      acc[t] = _mm512_fmadd_ps(cvt_ps(d[t]), _mm512_mul_ps(sv, _mm512_set1_ps(dx[t][b])), acc[t]);
      acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(bs[t][b]), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    float* yt = y + uint64_t(t0 + t) * ystride + r0;
    if (n == kPanel) _mm512_storeu_ps(yt, acc[t]);
    else store_n(yt, acc[t], n);
  }
}

// The last nt < kPanelTokens tokens (NT the largest such count).
template <bool WIDE, int NT>
void panel_tail(int nt, const __m512i* tile, const float* sc16, const float* mn16, uint32_t nb, const QuantizedActs& x,
                int64_t t0, float* y, uint32_t ystride, uint32_t r0, uint32_t n) {
  if constexpr (NT > 0) {
    if (nt == NT) return panel_tokens<WIDE, NT>(tile, sc16, mn16, nb, x, t0, y, ystride, r0, n);
    panel_tail<WIDE, NT - 1>(nt, tile, sc16, mn16, nb, x, t0, y, ystride, r0, n);
  }
}

}  // namespace

void qmatvec_q4(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const float* dx, const float* xsum,
                float* y) {
  // x8 [cols], dx [cols / 32], xsum [cols / gs] -> y[r], r in [r0, r1)
  uint32_t r = r0;
  for (; r + 2 <= r1; r += 2) q4_rows<2>(w, r, x8, dx, xsum, y);
  if (r < r1) q4_rows<1>(w, r, x8, dx, xsum, y);
}

void qmatvec_mxfp4(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const float* dx, const float* xsum,
                   float* y) {
  // x8 [cols], dx [cols / 32], xsum [cols / 32] -> y[r], r in [r0, r1)
  uint32_t r = r0;
  for (; r + 2 <= r1; r += 2) mx_rows<2>(w, r, x8, dx, xsum, y);
  if (r < r1) mx_rows<1>(w, r, x8, dx, xsum, y);
}

void gemm_int8_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y) {
  // x: T tokens rounded [T, cols] -> y [T, rows], rows [r0, r1) in panels of 16
  const uint32_t nb = w.cols / kChunk;
  struct alignas(64) Vec {
    uint8_t bytes[64];
  };
  const bool wide = w.bits == 8;  // x int16, 16 zmm per block
  std::vector<Vec> tile_buf(size_t(nb) * (wide ? 16 : 8));  // C++17: over-aligned new
  __m512i* tile = reinterpret_cast<__m512i*>(tile_buf.data());
  std::vector<float> sc16(size_t(nb) * kPanel), mn16(size_t(nb) * kPanel);
  for (uint32_t r = r0; r < r1; r += kPanel) {
    const uint32_t n = std::min(kPanel, r1 - r);
    if (w.mxfp4()) unpack_panel<kMx>(w, r, n, tile, sc16.data(), mn16.data());
    else switch (w.bits) {
      case 2: unpack_panel<2>(w, r, n, tile, sc16.data(), mn16.data()); break;
      case 3: unpack_panel<3>(w, r, n, tile, sc16.data(), mn16.data()); break;
      case 4: unpack_panel<4>(w, r, n, tile, sc16.data(), mn16.data()); break;
      default: unpack_panel<8>(w, r, n, tile, sc16.data(), mn16.data()); break;
    }
    int64_t t = 0;
    if (wide) {
      for (; t + kPanelTokens <= x.T; t += kPanelTokens)
        panel_tokens<true, kPanelTokens>(tile, sc16.data(), mn16.data(), nb, x, t, y, w.rows, r, n);
      panel_tail<true, kPanelTokens - 1>(int(x.T - t), tile, sc16.data(), mn16.data(), nb, x, t, y, w.rows, r, n);
      continue;
    }
    for (; t + kPanelTokens <= x.T; t += kPanelTokens)
      panel_tokens<false, kPanelTokens>(tile, sc16.data(), mn16.data(), nb, x, t, y, w.rows, r, n);
    panel_tail<false, kPanelTokens - 1>(int(x.T - t), tile, sc16.data(), mn16.data(), nb, x, t, y, w.rows, r, n);
  }
}

}  // namespace edgemoe::kernels::EDGEMOE_AVX512_NS

#if !defined(EDGEMOE_AVX512_SIMDE)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace edgemoe::kernels::avx512 {

namespace {

// What the CPU and the OS provide, from CPUID and XGETBV: the names of the sets missing.
std::string probe() {
  if (const char* off = std::getenv("EDGEMOE_NO_AVX512"); off && *off && std::strcmp(off, "0") != 0)
    return "avx512 (EDGEMOE_NO_AVX512 is set)";
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return "avx512f avx512bw avx512vl avx512vnni (no CPUID leaf 1)";
  const bool osxsave = (c >> 27) & 1u;
  unsigned b7 = 0, c7 = 0;
  if (!__get_cpuid_count(7, 0, &a, &b7, &c7, &d)) b7 = c7 = 0;
  std::string missing;
  if (!((b7 >> 16) & 1u)) missing += " avx512f";
  if (!((b7 >> 30) & 1u)) missing += " avx512bw";
  if (!((b7 >> 31) & 1u)) missing += " avx512vl";
  if (!((c7 >> 11) & 1u)) missing += " avx512vnni";
  if (missing.empty()) {
    // the OS must save the opmask and all 32 zmm registers on a context switch (XCR0 bits 1, 2, 5, 6, 7)
    uint32_t lo = 0, hi = 0;
    if (osxsave) __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xE6u) != 0xE6u) missing = " zmm state (the OS does not enable it in XCR0)";
  }
  return missing.empty() ? "" : missing.substr(1);
}

const std::string& missing_sets() {
  static const std::string m = probe();
  return m;
}

}  // namespace

bool cpu_ok() { return missing_sets().empty(); }

const char* cpu_missing() { return missing_sets().c_str(); }

}  // namespace edgemoe::kernels::avx512
#endif  // !EDGEMOE_AVX512_SIMDE

#endif  // EDGEMOE_X86
