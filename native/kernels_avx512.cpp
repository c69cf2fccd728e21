// The AVX-512 kernels (F, BW, VL and VNNI): vpdpbusd multiplies unsigned codes with
// int8 activations and sums four products into each 32-bit lane, with no 16-bit
// saturation; vpdpwssd two 16-bit products (8-bit codes, whose x is int16).
//   - decode (T=1) of 4-bit codes and MXFP4: the AVX2 decode's layout (two blocks of 32 per
//     ymm, 8 blocks reduced together) with vpdpbusd on 256-bit vectors (VL), x rounded to
//     int8 per 32 values as the AVX2 decode rounds it (the same integers); MXFP4's codes
//     looked up with vpshufb first;
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
#include <simde/x86/f16c.h>
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
  const __m256 lo = _mm256_cvtepi32_ps(_mm512_castsi512_si256(v)),
               hi = _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(v, 1));
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
  __m256 acc = _mm256_setzero_ps();
  uint32_t g = 0;
  for (; g + 8 <= ng; g += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + 2 * g))),
                          _mm256_loadu_ps(xsum + g), acc);
  alignas(32) float l[8];
  _mm256_store_ps(l, acc);
  float v = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  for (; g < ng; ++g) v += scale_of(mn, g) * xsum[g];
  return v;
}

// 32 4-bit codes (v[j] low nibble, v[j+16] high nibble of byte j) -> their values as bytes, in order.
inline __m256i nibbles32(const uint8_t* p) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

inline float hsum8(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// The multipliers of blocks b..b+7 of a row, in order: f16 group scales (CPG blocks per
// group), or MXFP4's e8m0 block scales 2^(e - 128) (CPG 0).
template <uint32_t CPG>
inline __m256 scales8(const uint8_t* sc, uint32_t b) {
  if constexpr (CPG == 0) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + b)));
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(v, one), 23);
    const __m256i subnormal = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), v);  // e < 2 (counts >= 32 give 0)
    return _mm256_castsi256_ps(_mm256_blendv_epi8(subnormal, normal, _mm256_cmpgt_epi32(v, one)));
  } else if constexpr (CPG == 1) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 2 * b)));
  } else if constexpr (CPG == 2) {  // groups 0 0 1 1 2 2 3 3
    const __m128i s = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + b));
    return _mm256_cvtph_ps(_mm_unpacklo_epi16(s, s));
  } else {  // groups 0 0 0 0 1 1 1 1
    static_assert(CPG == 4, "blocks per group");
    const __m128i s = _mm_cvtsi32_si128(int(load_u32(sc + b / 2)));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3)));
  }
}

// ---- decode (T=1) of 4-bit codes and MXFP4 (CPG 0), one row, 8 blocks at a time. One 32-byte
// load holds blocks b (low 128 bits) and b+1 (high); its low nibbles meet xp's first 32 bytes
// for the pair (the first 16 x values of each block) and its high nibbles the next 32, both
// summed into one int32 vector by two vpdpbusd (no 16-bit limit, so MXFP4's values up to 24 too).
// The 4 pairs' int32 vectors are added up transposed with unpacks to one lane per block, put
// in order, converted and scaled once per 8 blocks. 256-bit vectors: a zmm (two pairs) per
// load and a multiplier per pair ran at about half the speed of this layout on a Zen 4 core,
// whose 512-bit operations take two passes.
template <uint32_t CPG>
inline __m256 q4_row(const QMatrix& w, uint64_t rb, uint32_t r, const int8_t* xp, const int8_t* x8, const float* dx,
                     const float* xsum, float& rest) {
  constexpr bool kMx = CPG == 0;
  constexpr bool kFold = CPG <= 1;  // a group per block: the min term rides in the loop, one FMA per 8 blocks
  const uint32_t nb = w.cols / kChunk, ng = kMx ? nb : nb / CPG;
  const uint8_t* codes = w.data + uint64_t(r) * rb;
  const uint8_t* sc = w.scales + uint64_t(r) * (kMx ? nb : ng * 2);
  const uint8_t* mn = kMx ? sc : w.mins + uint64_t(r) * ng * 2;
  const bool same = kMx || w.mins == w.scales;  // symmetric codes: the mins are the scales
  const __m256i low4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kMxLutU8)));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // blocks 0 2 4 6 1 3 5 7 -> 0..7
  __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
  uint32_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    for (uint32_t o = 0; o < 8 * chunk_bytes(4); o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(codes) + kPrefetchBytes + o, _MM_HINT_T0);
    __m256i s[4];  // pair p: int32 partial dots of blocks 2p (low 128 bits) and 2p+1 (high)
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i* xq = reinterpret_cast<const __m256i*>(xp + (b + 2 * uint32_t(p)) * kChunk);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
      codes += 2 * chunk_bytes(4);
      __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      if constexpr (kMx) lo = _mm256_shuffle_epi8(lut, lo), hi = _mm256_shuffle_epi8(lut, hi);
      s[p] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, lo, _mm256_loadu_si256(xq)), hi, _mm256_loadu_si256(xq + 1));
    }
    // lanes of blocks (0 2 0 2), then (0 2 4 6) per 128 bits; odd blocks in the high half
    const __m256i t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(s[0], s[1]), _mm256_unpackhi_epi32(s[0], s[1]));
    const __m256i t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(s[2], s[3]), _mm256_unpackhi_epi32(s[2], s[3]));
    const __m256i t = _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
    const __m256 sv = scales8<CPG>(sc, b);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(t, order)),
                          _mm256_mul_ps(sv, _mm256_loadu_ps(dx + b)), acc);
    if constexpr (kFold) macc = _mm256_fmadd_ps(same ? sv : scales8<CPG>(mn, b), _mm256_loadu_ps(xsum + b), macc);
  }
  // what multiplies the min term: MXFP4's looked-up codes carry kMxOffset, 4-bit codes min_mult
  const float mult = kMx ? -float(kMxOffset) : w.min_mult;
  float tail = 0, mtail = 0;
  for (; b < nb; ++b) {  // the last < 8 blocks of the row
    __m256i v = nibbles32(codes);
    codes += chunk_bytes(4);
    if constexpr (kMx) v = _mm256_shuffle_epi8(lut, v);
    const __m256i p =
        _mm256_dpbusd_epi32(zero, v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x8 + b * kChunk)));
    const float s1 = kMx ? e8m0_half(sc[b]) : scale_of(sc, b / (kMx ? 1 : CPG));
    tail += hsum8(_mm256_cvtepi32_ps(p)) * (s1 * dx[b]);
    if constexpr (kFold) mtail += (same ? s1 : scale_of(mn, b)) * xsum[b];
  }
  rest = tail + mult * (kFold ? mtail : min_term(mn, xsum, ng));
  return _mm256_fmadd_ps(macc, _mm256_set1_ps(mult), acc);  // its lanes sum to the rest of y[r]
}

// The lane sums of v[0..7], in order.
inline __m256 hsum8x8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Rows [r0, r1) of one token's 4-bit or MXFP4 (CPG 0) decode; eight rows' vectors summed
// across lanes together.
template <uint32_t CPG>
void q4_range(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const int8_t* x8p, const float* dx,
              const float* xsum, float* y) {
  const uint64_t rb = w.row_bytes();  // once: an out-of-line call per row cost 1% of a decode step
  uint32_t r = r0;
  for (; r + 8 <= r1; r += 8) {
    __m256 v[8];
    alignas(32) float rest[8];
    for (uint32_t i = 0; i < 8; ++i) v[i] = q4_row<CPG>(w, rb, r + i, x8p, x8, dx, xsum, rest[i]);
    _mm256_storeu_ps(y + r, _mm256_add_ps(hsum8x8(v), _mm256_load_ps(rest)));
  }
  for (; r < r1; ++r) {
    float rest;
    const __m256 v = q4_row<CPG>(w, rb, r, x8p, x8, dx, xsum, rest);
    y[r] = hsum8(v) + rest;
  }
}

// ---- prefill with int8 activations.

// The panels' BITS for MXFP4 (kind 5): codes looked up as kE2m1x2 + kMxOffset (0..24, unsigned
// for vpdpbusd), so a block is scale * (u - kMxOffset) and its min -kMxOffset * scale.
constexpr int kMx = 5;

// One chunk of 32 codes -> its values as bytes, in order.
template <int BITS>
inline __m256i chunk_u8(const uint8_t* p) {
  if constexpr (BITS == kMx) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kMxLutU8)));
    return _mm256_shuffle_epi8(lut, nibbles32(p));
  } else if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {
    return nibbles32(p);
  } else {
    static_assert(BITS == 2 || BITS == 3, "bits");
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(0x03);
    const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 2), m));
    const __m128i hi =
        _mm_unpacklo_epi64(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(_mm_srli_epi16(b, 6), m));
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

void qmatvec_q4(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const int8_t* x8p, const float* dx,
                const float* xsum, float* y) {
  // x8 [cols] (and in pair_blocks' layout), dx [cols / 32], xsum [cols / gs] -> y[r], r in [r0, r1)
  switch (w.group_size) {
    case 32: return q4_range<1>(w, r0, r1, x8, x8p, dx, xsum, y);
    case 64: return q4_range<2>(w, r0, r1, x8, x8p, dx, xsum, y);
    default: return q4_range<4>(w, r0, r1, x8, x8p, dx, xsum, y);
  }
}

void qmatvec_mxfp4(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const int8_t* x8p, const float* dx,
                   const float* xsum, float* y) {
  // x8 [cols] (and in pair_blocks' layout), dx [cols / 32], xsum [cols / 32] -> y[r], r in [r0, r1)
  q4_range<0>(w, r0, r1, x8, x8p, dx, xsum, y);
}

void gemm_int8_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y) {
  // x: T tokens rounded [T, cols] -> y [T, rows], rows [r0, r1) in panels of 16
  const uint32_t nb = w.cols / kChunk;
  struct alignas(64) Vec {
    uint8_t bytes[64];
  };
  const bool wide = w.bits == 8;                            // x int16, 16 zmm per block
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
