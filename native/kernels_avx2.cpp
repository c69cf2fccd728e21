// The AVX2+FMA+F16C kernels (x86-64 built with -march=native on a CPU that has
// them); without those the file compiles to nothing and the driver
// (kernels.cpp) runs the portable ones.
//   - decode (T=1): x is rounded per 32 values, to int8 for 4-bit codes (dotted
//     with vpmaddubsw, as llama.cpp's Q4_0 x Q8_0; 8 chunks of a row reduced together)
//     and to int16 for 2/3/8-bit ones (widened codes, vpmaddwd); 4- and 8-bit codes a
//     row per pass, 2- and 3-bit two, prefetching ahead;
//   - 2..11 tokens: a row's codes are decoded to f32 once for 4 tokens;
//   - prefill (T >= 12) of 4-bit codes: x rounded to int8 per 32 values, 8 rows' codes unpacked
//     to bytes for every token (vpmaddubsw); of 8-bit codes: x rounded to int16, the codes less
//     128 in 16 bits (vpmaddwd);
//   - other prefill (T >= 12): 3 rows at a time are dequantized to an f32 tile and a
//     3x4 register-blocked FMA kernel runs every token over it.
#include "kernels_impl.h"

#if defined(EDGEMOE_AVX2)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace edgemoe::kernels::avx2 {

namespace {

constexpr int kPrefetchBytes = 2048;  // how far decode runs ahead of the weight stream

// 8 bytes at p zero-extended to 8 x u32 (the load folds into vpmovzxbd).
inline __m256i u8x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// One chunk of 32 codes -> w[k] = values 8k..8k+7 as floats. Bytes are widened
// to 32-bit lanes first, so splitting them into fields is a shift and a mask.
template <int BITS>
inline void decode_chunk(const uint8_t* p, __m256 w[4]) {
  if constexpr (BITS == 8) {
    for (int k = 0; k < 4; ++k) w[k] = _mm256_cvtepi32_ps(u8x8(p + 8 * k));
  } else if constexpr (BITS == 4) {
    const __m256i m = _mm256_set1_epi32(0x0F);
    const __m256i a = u8x8(p), b = u8x8(p + 8);  // bytes 0-7 and 8-15
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, m));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, m));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  } else if constexpr (BITS == 2) {
    const __m256i m = _mm256_set1_epi32(0x03);
    const __m256i a = u8x8(p);
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, m));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 2), m));
    w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 4), m));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 6));
  } else {
    static_assert(BITS == 3, "bits");
    const __m256i m = _mm256_set1_epi32(0x03);
    const __m256i a = u8x8(p);
    // bit 2 of v[j] is bit j of the u32 after the 2-bit part: move it to bit 2
    const __m256i hi = _mm256_set1_epi32(int(load_u32(p + 8)));
    const __m256i four = _mm256_set1_epi32(4);
    const __m256i sh0 = _mm256_setr_epi32(-2, -1, 0, 1, 2, 3, 4, 5);  // lane j: shift right by j-2
    for (int k = 0; k < 4; ++k) {
      const __m256i lo = k == 0 ? _mm256_and_si256(a, m) : _mm256_and_si256(_mm256_srli_epi32(a, 2 * k), m);
      const __m256i sh = _mm256_add_epi32(sh0, _mm256_set1_epi32(8 * k));
      // lanes 0,1 of chunk 0 need a left shift: srlv with a negative count gives 0, so use sllv there
      const __m256i h = k == 0 ? _mm256_or_si256(_mm256_srlv_epi32(hi, sh),
                                                 _mm256_sllv_epi32(hi, _mm256_sub_epi32(_mm256_setzero_si256(), sh)))
                               : _mm256_srlv_epi32(hi, sh);
      w[k] = _mm256_cvtepi32_ps(_mm256_or_si256(lo, _mm256_and_si256(h, four)));
    }
  }
}

// 32 4-bit codes (a chunk: v[j] low nibble, v[j+16] high nibble of byte j) -> their values as bytes, in order.
inline __m256i nibbles32(const uint8_t* p) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // the upper lane shifted by 4 bits: a byte then holds its own high nibble in its low 4 bits
  return _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

// One MXFP4 chunk -> w[k] = values 8k..8k+7 as floats times s: the codes looked up (vpshufb)
// as kE2m1x2, widened.
inline void mx_decode_chunk(const uint8_t* p, __m256 s, __m256 w[4]) {
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2m1x2)));
  const __m256i v = _mm256_shuffle_epi8(lut, nibbles32(p));
  const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
  w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), s);
  w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), s);
  w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), s);
  w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), s);
}

// 8 E8M0 bytes at e -> 2^(e[i] - 128) as floats (e8m0_half: exponent bits, subnormals below e = 2).
inline __m256 e8m0_half8(const uint8_t* e) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e)));
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(v, one), 23);
  const __m256i subnormal = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), v);  // e < 2 (counts >= 32 give 0)
  return _mm256_castsi256_ps(_mm256_blendv_epi8(subnormal, normal, _mm256_cmpgt_epi32(v, one)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Independent FMA chains per token, enough to hide the FMA latency.
template <int NT>
constexpr int kChains = NT == 1 ? 4 : 2;

// sum_g min_g * xsum[g] for one row, before the factor min_mult (a power of two, so
// applying it to the sum rounds exactly as applying it to each min).
inline float min_term(const uint8_t* mn, const float* xsum, uint32_t ng) {
  __m256 acc = _mm256_setzero_ps();
  uint32_t g = 0;
  for (; g + 8 <= ng; g += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + 2 * g))),
                          _mm256_loadu_ps(xsum + g), acc);
  float v = hsum(acc);
  for (; g < ng; ++g) v += f16_to_f32(load_u16(mn + 2 * g)) * xsum[g];
  return v;
}

// Group-quantized rows [r0, r1) for a few tokens (the tail of a single token
// only when T > 1): weights are decoded and scaled once per chunk and shared
// by the tokens; the min term uses xsum.
template <int BITS, int NT>
void qrows_avx2(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, float* y,
                uint32_t ystride) {
  constexpr int C = kChains<NT>;
  const uint32_t gs = w.group_size, ng = w.cols / gs, cpg = gs / kChunk;
  const uint64_t rb = w.row_bytes();
  for (uint32_t r = r0; r < r1; ++r) {
    const uint8_t* codes = w.data + uint64_t(r) * rb;
    const uint8_t* sc = w.scales + uint64_t(r) * ng * 2;
    const uint8_t* mn = w.mins + uint64_t(r) * ng * 2;
    __m256 acc[NT][C];
    for (int t = 0; t < NT; ++t)
      for (int c = 0; c < C; ++c) acc[t][c] = _mm256_setzero_ps();
    for (uint32_t g = 0; g < ng; ++g) {
      const __m256 s = _mm256_set1_ps(f16_to_f32(load_u16(sc + 2 * g)));
      for (uint32_t c = 0; c < cpg; ++c, codes += chunk_bytes(BITS)) {
        __m256 wv[4];
        decode_chunk<BITS>(codes, wv);
        const uint32_t col = (g * cpg + c) * kChunk;
        for (int k = 0; k < 4; ++k) {
          wv[k] = _mm256_mul_ps(wv[k], s);
          for (int t = 0; t < NT; ++t)
            acc[t][k % C] = _mm256_fmadd_ps(wv[k], _mm256_loadu_ps(x[t] + col + 8 * k), acc[t][k % C]);
        }
      }
    }
    // min term: sum_g min_g * xsum[t][g] (min_mult a power of two: exact)
    __m256 macc[NT];
    for (int t = 0; t < NT; ++t) macc[t] = _mm256_setzero_ps();
    const __m256 mm = _mm256_set1_ps(w.min_mult);
    uint32_t g = 0;
    for (; g + 8 <= ng; g += 8) {
      const __m256 m8 =
          _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + 2 * g))), mm);
      for (int t = 0; t < NT; ++t) macc[t] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xsum[t] + g), macc[t]);
    }
    for (int t = 0; t < NT; ++t) {
      __m256 a = acc[t][0];
      for (int c = 1; c < C; ++c) a = _mm256_add_ps(a, acc[t][c]);
      float v = hsum(_mm256_add_ps(a, macc[t]));
      for (uint32_t gg = g; gg < ng; ++gg) v += w.min_mult * f16_to_f32(load_u16(mn + 2 * gg)) * xsum[t][gg];
      y[uint64_t(t) * ystride + r] = v;
    }
  }
}

// MXFP4 rows [r0, r1) for a few tokens: each chunk decoded to floats (times its block's
// 2^(e - 128)) once and shared by the tokens.
template <int NT>
void mxrows_avx2(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, float* y, uint32_t ystride) {
  constexpr int C = kChains<NT>;
  const uint32_t nb = w.cols / kChunk;
  for (uint32_t r = r0; r < r1; ++r) {
    const uint8_t* codes = w.data + uint64_t(r) * w.row_bytes();
    const uint8_t* sc = w.scales + uint64_t(r) * nb;
    __m256 acc[NT][C];
    for (int t = 0; t < NT; ++t)
      for (int c = 0; c < C; ++c) acc[t][c] = _mm256_setzero_ps();
    for (uint32_t b = 0; b < nb; ++b, codes += chunk_bytes(4)) {
      __m256 wv[4];
      mx_decode_chunk(codes, _mm256_set1_ps(e8m0_half(sc[b])), wv);
      for (int k = 0; k < 4; ++k)
        for (int t = 0; t < NT; ++t)
          acc[t][k % C] = _mm256_fmadd_ps(wv[k], _mm256_loadu_ps(x[t] + b * kChunk + 8 * k), acc[t][k % C]);
    }
    for (int t = 0; t < NT; ++t) {
      __m256 a = acc[t][0];
      for (int c = 1; c < C; ++c) a = _mm256_add_ps(a, acc[t][c]);
      y[uint64_t(t) * ystride + r] = hsum(a);
    }
  }
}

template <Kind K>
inline __m256 load8(const uint8_t* p) {
  if constexpr (K == kF32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  if constexpr (K == kF16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  if constexpr (K == kBF16)
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <Kind K>
inline float load1(const uint8_t* p) {
  if constexpr (K == kF32) return load_f32(p);
  if constexpr (K == kF16) return f16_to_f32(load_u16(p));
  if constexpr (K == kBF16) return bf16_to_f32(load_u16(p));
}

template <Kind K, int NT>
void frows_avx2(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, float* y, uint32_t ystride) {
  constexpr int C = kChains<NT>;
  constexpr uint32_t es = K == kF32 ? 4 : 2;
  const uint32_t cols = w.cols;
  for (uint32_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.data + uint64_t(r) * w.row_bytes();
    __m256 acc[NT][C];
    for (int t = 0; t < NT; ++t)
      for (int c = 0; c < C; ++c) acc[t][c] = _mm256_setzero_ps();
    uint32_t col = 0;
    for (; col + 32 <= cols; col += 32)
      for (int k = 0; k < 4; ++k) {
        const __m256 wv = load8<K>(row + (col + 8 * k) * es);
        for (int t = 0; t < NT; ++t)
          acc[t][k % C] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t] + col + 8 * k), acc[t][k % C]);
      }
    for (; col + 8 <= cols; col += 8) {
      const __m256 wv = load8<K>(row + col * es);
      for (int t = 0; t < NT; ++t) acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t] + col), acc[t][0]);
    }
    for (int t = 0; t < NT; ++t) {
      __m256 a = acc[t][0];
      for (int c = 1; c < C; ++c) a = _mm256_add_ps(a, acc[t][c]);
      float v = hsum(a);
      for (uint32_t c = col; c < cols; ++c) v += load1<K>(row + c * es) * x[t][c];
      y[uint64_t(t) * ystride + r] = v;
    }
  }
}

template <int NT>
void rows_nt(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, float* y,
             uint32_t ystride) {
  switch (w.kind) {
    case kF32: return frows_avx2<kF32, NT>(w, r0, r1, x, y, ystride);
    case kF16: return frows_avx2<kF16, NT>(w, r0, r1, x, y, ystride);
    case kBF16: return frows_avx2<kBF16, NT>(w, r0, r1, x, y, ystride);
    case kMxfp4: return mxrows_avx2<NT>(w, r0, r1, x, y, ystride);
    case kQuant:
    case kQuantSym: break;
  }
  switch (w.bits) {
    case 2: return qrows_avx2<2, NT>(w, r0, r1, x, xsum, y, ystride);
    case 3: return qrows_avx2<3, NT>(w, r0, r1, x, xsum, y, ystride);
    case 4: return qrows_avx2<4, NT>(w, r0, r1, x, xsum, y, ystride);
    default: return qrows_avx2<8, NT>(w, r0, r1, x, xsum, y, ystride);
  }
}

// ---- decode with int16 activations (one token): x is
// quantized per block of 32 values to int16 (error <= max|x_block| / 65534,
// far below the weights' own quantization error), so a chunk's dot product is
// two vpmaddwd on widened codes instead of eight int->float conversions.

// One block of 32 values rounded to integers of magnitude <= qmax, nearest: q[0..3] (8 int32
// each, in order); returns the step dx (x ~= q * dx).
inline float round_block(const float* xb, float qmax, __m256i q[4]) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  for (int k = 0; k < 4; ++k) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * k)));
  const float amax = hmax(mx);
  const __m256 inv = _mm256_set1_ps(amax > 0 ? qmax / amax : 0.0f);
  for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * k), inv));
  return amax / qmax;
}

// x [cols] -> x16 [cols], dx [cols/32] with x ~= x16 * dx per block.
void quantize_x16(const float* x, uint32_t cols, int16_t* x16, float* dx) {
  for (uint32_t b = 0; b < cols / kChunk; ++b) {
    __m256i q[4];
    dx[b] = round_block(x + b * kChunk, 32767.0f, q);
    // packs interleaves 128-bit lanes: restore order with a 64-bit permute
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + b * kChunk), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + b * kChunk + 16), hi);
  }
}

// Codes of one chunk times x16 -> 8 int32 partial sums.
template <int BITS>
inline __m256i chunk_dot16(const uint8_t* p, __m256i xa, __m256i xb) {
  if constexpr (BITS == 4) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // 16 bytes
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x0F)), xa),
                            _mm256_madd_epi16(_mm256_srli_epi16(b, 4), xb));
  } else if constexpr (BITS == 2 || BITS == 3) {
    // The 8 bytes twice over 16-bit lanes; multiplying the low half by 4 lines
    // its fields up so one shift gives v[0..15] and another v[16..31].
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m256i w = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi64(b, b)),
                                         _mm256_setr_epi16(4, 4, 4, 4, 4, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1));
    const __m256i three = _mm256_set1_epi16(3);
    __m256i lo = _mm256_and_si256(_mm256_srli_epi16(w, 2), three),
            hi = _mm256_and_si256(_mm256_srli_epi16(w, 6), three);
    if constexpr (BITS == 3) {
      // bit 2 of v[j] is bit j of the u32 after the 2-bit part: test each lane's bit
      const uint32_t word = load_u32(p + 8);
      const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                            int16_t(16384), int16_t(-32768));
      const __m256i four = _mm256_set1_epi16(4);
      const __m256i h0 = _mm256_and_si256(_mm256_set1_epi16(int16_t(word & 0xFFFF)), bit);
      const __m256i h1 = _mm256_and_si256(_mm256_set1_epi16(int16_t(word >> 16)), bit);
      lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi16(h0, bit), four));
      hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi16(h1, bit), four));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(lo, xa), _mm256_madd_epi16(hi, xb));
  } else {
    static_assert(BITS == 8, "bits");
    const __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    return _mm256_add_epi32(_mm256_madd_epi16(a, xa), _mm256_madd_epi16(b, xb));
  }
}

// ---- decode with int8 activations for 4-bit codes (as llama.cpp's Q4_0 x Q8_0):
// x rounded per block of 32 to int8 (error <= max|x_block| / 254), so a chunk's dot
// product is one vpmaddubsw (u8 codes x s8 x, pairs summed to s16: 15*127*2 fits)
// and one vpmaddwd, half the multiplies and x loads of the int16 path.

// x [cols] -> x8 [cols], dx [cols/32] with x ~= x8 * dx per block, and xsum
// [cols/gs] the group sums of that rounded x (sum_b dx[b] * sum x8_b): the min term
// then uses the same x as the codes' dot, so y = W . x8*dx exactly up to float sums
// (with the float x's sums, kind 4's -8*scale min would add scale * sum (x8*dx - x) * 8).
void quantize_x8(const float* x, uint32_t cols, uint32_t gs, int8_t* x8, float* dx, float* xsum) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const uint32_t bpg = gs / kChunk;
  for (uint32_t g = 0; g < cols / gs; ++g) {
    float s = 0;
    for (uint32_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      __m256i q[4];
      dx[b] = round_block(x + b * kChunk, 127.0f, q);
      // packs work per 128-bit lane: dwords come out as q0lo q1lo q2lo q3lo q0hi ..., reorder them
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x8 + b * kChunk), _mm256_permutevar8x32_epi32(p, order));
      const __m256i qs = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      s += dx[b] * float(hsum(_mm256_cvtepi32_ps(qs)));  // |sum| <= 32*127: exact in f32
    }
    xsum[g] = s;
  }
}

// 32 4-bit codes (a chunk: v[j] low nibble, v[j+16] high nibble of byte j) times x8 -> 8 int32 sums.
inline __m256i chunk_dot8_q4(const uint8_t* p, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles32(p), x), _mm256_set1_epi16(1));
}

// One token's x as the decode kernels read it: int8 (x8) for 4-bit codes, int16 (x16)
// for the others, with the per-32 factors dx and group sums xsum that go with it.
struct DecodeX {
  const int16_t* x16;
  const int8_t* x8;
  const float* dx;    // [cols/32]
  const float* xsum;  // [cols/gs]
  const int8_t* x8p;  // 4-bit codes: DecodeInput's x8p and dx8p
  const float* dx8p;
};

// A block of 32 activations loaded once for the RR rows that use it.
template <int BITS>
struct XBlock {
  __m256i a, b;
  XBlock(const DecodeX& x, uint32_t blk) {
    if constexpr (BITS == 4) {
      a = b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.x8 + blk * kChunk));
    } else {
      a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.x16 + blk * kChunk));
      b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.x16 + blk * kChunk + 16));
    }
  }
  __m256i dot(const uint8_t* p) const {
    if constexpr (BITS == 4) return chunk_dot8_q4(p, a);
    else return chunk_dot16<BITS>(p, a, b);
  }
};

// The part of `in` that a matrix of `bits`-bit codes reads.
DecodeX decode_x(const DecodeInput& in, uint32_t bits) {
  if (bits == 4) return {nullptr, in.x8.data(), in.dx8.data(), in.xsum8.data(), in.x8p.data(), in.dx8p.data()};
  return {in.x16.data(), nullptr, in.dx16.data(), in.xsum16.data(), nullptr, nullptr};
}

// RR rows at a time share the x loads; two FMA chains per row. CPG (chunks
// per group) is a template argument so the chains stay in registers.
template <int BITS, int RR, uint32_t CPG>
void qmatvec_rows(const QMatrix& w, uint32_t r, const DecodeX& x, float* y) {
  const float* dx = x.dx;
  constexpr uint32_t cpg = CPG;
  const uint32_t ng = w.cols / (CPG * kChunk);
  const uint8_t* codes[RR];
  const uint8_t* sc[RR];
  __m256 acc[RR];
  for (int i = 0; i < RR; ++i) {
    codes[i] = w.data + uint64_t(r + uint32_t(i)) * w.row_bytes();
    sc[i] = w.scales + uint64_t(r + uint32_t(i)) * ng * 2;
    acc[i] = _mm256_setzero_ps();
  }
  for (uint32_t g = 0; g < ng; ++g) {
    __m256 d[RR][2];
    for (int i = 0; i < RR; ++i) {
      d[i][0] = d[i][1] = _mm256_setzero_ps();
      _mm_prefetch(reinterpret_cast<const char*>(codes[i]) + kPrefetchBytes, _MM_HINT_T0);
    }
    for (uint32_t c = 0; c < cpg; ++c) {
      const uint32_t b = g * cpg + c;
      const XBlock<BITS> xv(x, b);
      const __m256 dv = _mm256_broadcast_ss(dx + b);
      for (int i = 0; i < RR; ++i) {
        const __m256i p = xv.dot(codes[i]);
        codes[i] += chunk_bytes(BITS);
        d[i][c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv, d[i][c & 1]);
      }
    }
    for (int i = 0; i < RR; ++i) {
      const __m256 s = _mm256_set1_ps(f16_to_f32(load_u16(sc[i] + 2 * g)));
      acc[i] = _mm256_fmadd_ps(_mm256_add_ps(d[i][0], d[i][1]), s, acc[i]);
    }
  }
  for (int i = 0; i < RR; ++i)
    y[r + uint32_t(i)] = hsum(acc[i]) + w.min_mult * min_term(w.mins + uint64_t(r + uint32_t(i)) * ng * 2, x.xsum, ng);
}

// The scale of each of the 8 chunks b..b+7 of a row (b a multiple of 8) whose f16
// group scales start at sc, CPG chunks per group.
template <uint32_t CPG>
inline __m256 chunk_scales8(const uint8_t* sc, uint32_t b) {
  if constexpr (CPG == 1) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 2 * b)));
  } else if constexpr (CPG == 2) {  // 4 groups
    const __m256 s = _mm256_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + b)));
    return _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  } else {  // 2 groups
    static_assert(CPG == 4, "chunks per group");
    const __m256 s = _mm256_cvtph_ps(_mm_cvtsi32_si128(int(load_u32(sc + b / 2))));
    return _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
}

// As qmatvec_rows, for small groups: per 8 chunks, each row's multipliers
// dx[b] * scale(b) come from one vector multiply and are read back as broadcasts
// (load ports), instead of a scalar f16 scale load and convert per group.
template <int BITS, int RR, uint32_t CPG>
void qmatvec_rows_m(const QMatrix& w, uint32_t r, const DecodeX& x, float* y) {
  const float* dx = x.dx;
  const uint32_t nb = w.cols / kChunk, ng = nb / CPG;
  constexpr uint32_t cb = chunk_bytes(BITS);
  const uint8_t* codes[RR];
  const uint8_t* sc[RR];
  __m256 acc[RR][2];
  for (int i = 0; i < RR; ++i) {
    codes[i] = w.data + uint64_t(r + uint32_t(i)) * w.row_bytes();
    sc[i] = w.scales + uint64_t(r + uint32_t(i)) * ng * 2;
    acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  }
  alignas(32) float m[2][RR][8];  // double-buffered: a block's stores land well before its loads
  uint32_t b = 0;
  if (nb >= 8)
    for (int i = 0; i < RR; ++i)
      _mm256_store_ps(m[0][i], _mm256_mul_ps(chunk_scales8<CPG>(sc[i], 0), _mm256_loadu_ps(dx)));
  for (int cur = 0; b + 8 <= nb; b += 8, cur ^= 1) {
    if (b + 16 <= nb) {
      const __m256 dx8 = _mm256_loadu_ps(dx + b + 8);
      for (int i = 0; i < RR; ++i) _mm256_store_ps(m[cur ^ 1][i], _mm256_mul_ps(chunk_scales8<CPG>(sc[i], b + 8), dx8));
    }
    for (int i = 0; i < RR; ++i)
      for (uint32_t o = 0; o < 8 * cb; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(codes[i]) + kPrefetchBytes + o, _MM_HINT_T0);
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const XBlock<BITS> xv(x, b + uint32_t(c));
      for (int i = 0; i < RR; ++i) {
        const __m256i p = xv.dot(codes[i]);
        codes[i] += cb;
        acc[i][c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&m[cur][i][c]), acc[i][c & 1]);
      }
    }
  }
  for (; b < nb; ++b) {  // the last < 8 chunks of a row
    const XBlock<BITS> xv(x, b);
    for (int i = 0; i < RR; ++i) {
      const __m256i p = xv.dot(codes[i]);
      codes[i] += cb;
      const float mult = dx[b] * f16_to_f32(load_u16(sc[i] + 2 * (b / CPG)));
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(mult), acc[i][0]);
    }
  }
  for (int i = 0; i < RR; ++i)
    y[r + uint32_t(i)] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) +
                         w.min_mult * min_term(w.mins + uint64_t(r + uint32_t(i)) * ng * 2, x.xsum, ng);
}

// ---- decode of 4-bit codes, 8 chunks of a row at a time. One 32-byte load holds two chunks
// (b in the low 128 bits, b+1 in the high), so its low nibbles meet x8p's first 32 bytes of
// the pair and its high nibbles the next 32 (vpmaddubsw, both summed in int16: 4 products of
// <= 15 * 127 a word). The 4 pairs' int16 vectors are then added up transposed with unpacks
// (shuffle ports, which the multiplies leave free) until each word sums 16 products
// (<= 30480, no overflow), so a row takes one vpmaddwd, one convert and one FMA per 8 chunks,
// not one of each per chunk. The chunks come out in the order 0 2 4 6 1 3 5 7, as dx8p and
// scales8_eo give their multipliers. One Zen 3 core: 8.3 -> 6.6 ns per 8 chunks and row with
// the codes in cache; from DRAM ~91% of a plain streaming read's speed instead of ~75%.

// The scales of chunks b..b+7 of a row (b a multiple of 8), f16 group scales at sc, CPG
// chunks per group, as floats in the chunk order 0 2 4 6 1 3 5 7.
template <uint32_t CPG>
inline __m256 scales8_eo(const uint8_t* sc, uint32_t b) {
  if constexpr (CPG == 1) {
    const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 2 * b));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)));
  } else if constexpr (CPG == 2) {  // groups 0 1 2 3 0 1 2 3
    const __m128i s = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + b));
    return _mm256_cvtph_ps(_mm_unpacklo_epi64(s, s));
  } else {  // groups 0 0 1 1 0 0 1 1
    static_assert(CPG == 4, "chunks per group");
    const __m128i s = _mm_cvtsi32_si128(int(load_u32(sc + b / 2)));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3)));
  }
}

// Rows r..r+RR-1 of 4-bit codes, CPG chunks per group: y = sum_b scale_b dx_b (codes_b . x8_b) + min term.
template <int RR, uint32_t CPG>
void q4_rows(const QMatrix& w, uint32_t r, const DecodeX& x, float* y) {
  const uint32_t nb = w.cols / kChunk, ng = nb / CPG;
  const uint8_t* codes[RR];
  const uint8_t* sc[RR];
  __m256 acc[RR];
  for (int i = 0; i < RR; ++i) {
    codes[i] = w.data + uint64_t(r + uint32_t(i)) * w.row_bytes();
    sc[i] = w.scales + uint64_t(r + uint32_t(i)) * ng * 2;
    acc[i] = _mm256_setzero_ps();
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  uint32_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    for (int i = 0; i < RR; ++i)
      for (uint32_t o = 0; o < 8 * chunk_bytes(4); o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(codes[i]) + kPrefetchBytes + o, _MM_HINT_T0);
    __m256i s[RR][4];  // pair p: int16 partial dots of chunks 2p (low 128 bits) and 2p+1 (high)
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i* xp = reinterpret_cast<const __m256i*>(x.x8p + (b + 2 * uint32_t(p)) * kChunk);
      const __m256i xa = _mm256_loadu_si256(xp), xb = _mm256_loadu_si256(xp + 1);
      for (int i = 0; i < RR; ++i) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes[i]));
        codes[i] += 2 * chunk_bytes(4);
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        s[i][p] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
      }
    }
    const __m256 dxp = _mm256_loadu_ps(x.dx8p + b);
    for (int i = 0; i < RR; ++i) {
      // words of chunks (0 0 2 2), then (0 0 2 2 4 4 6 6) per 128 bits; odd chunks in the high half
      const __m256i t01 =
          _mm256_add_epi16(_mm256_unpacklo_epi32(s[i][0], s[i][1]), _mm256_unpackhi_epi32(s[i][0], s[i][1]));
      const __m256i t23 =
          _mm256_add_epi16(_mm256_unpacklo_epi32(s[i][2], s[i][3]), _mm256_unpackhi_epi32(s[i][2], s[i][3]));
      const __m256i t = _mm256_add_epi16(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
      const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(t, ones));  // chunks 0 2 4 6 1 3 5 7
      acc[i] = _mm256_fmadd_ps(d, _mm256_mul_ps(scales8_eo<CPG>(sc[i], b), dxp), acc[i]);
    }
  }
  for (; b < nb; ++b) {  // the last < 8 chunks of a row
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.x8 + b * kChunk));
    for (int i = 0; i < RR; ++i) {
      const __m256i p = chunk_dot8_q4(codes[i], xv);
      codes[i] += chunk_bytes(4);
      const float mult = x.dx[b] * f16_to_f32(load_u16(sc[i] + 2 * (b / CPG)));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(mult), acc[i]);
    }
  }
  for (int i = 0; i < RR; ++i)
    y[r + uint32_t(i)] = hsum(acc[i]) + w.min_mult * min_term(w.mins + uint64_t(r + uint32_t(i)) * ng * 2, x.xsum, ng);
}

// ---- decode of MXFP4 (kind 5), x rounded to int8 as for 4-bit codes: a chunk's codes are
// looked up (vpshufb) as kE2m1x2 + kMxOffset, unsigned (0..24), so vpmaddubsw takes them as it
// takes 4-bit codes (pairs of 24 * 127 fit int16); the offset comes back out once per row:
// y = sum_b m_b (c_b . x8_b) - kMxOffset * sum_b s_b xsum_b, s_b = 2^(e_b - 128), m_b = s_b dx_b,
// xsum the block sums of the rounded x (DecodeInput for groups of 32).
//
// One row at a time in q4_rows' pair layout. The looked-up values reach 24, so the int16 sums
// stop at 8 products (<= 24384): two vpmaddwd per 8 blocks widen them, then one more unpack
// step (one thread, 2816x1024 from DRAM: 12.6-13.2 -> 15.7-15.9 GB/s against a chunk at a time).
void mx_row8(const QMatrix& w, uint32_t r, const DecodeX& x, float* y) {
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kMxLutU8)));
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i eo = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const uint32_t nb = w.cols / kChunk;
  const uint8_t* codes = w.data + uint64_t(r) * w.row_bytes();
  const uint8_t* sc = w.scales + uint64_t(r) * nb;
  __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
  uint32_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    for (uint32_t o = 0; o < 8 * chunk_bytes(4); o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(codes) + kPrefetchBytes + o, _MM_HINT_T0);
    __m256i s[4];  // pair p: int16 partial dots of blocks 2p (low 128 bits) and 2p+1 (high)
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i* xp = reinterpret_cast<const __m256i*>(x.x8p + (b + 2 * uint32_t(p)) * kChunk);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
      codes += 2 * chunk_bytes(4);
      const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
      const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
      s[p] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xp)),
                              _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xp + 1)));
    }
    // int32 of blocks (0 2 0 2) and (4 6 4 6) per 128 bits, then (0 2 4 6); odd blocks in the high half
    const __m256i q01 =
        _mm256_madd_epi16(_mm256_add_epi16(_mm256_unpacklo_epi32(s[0], s[1]), _mm256_unpackhi_epi32(s[0], s[1])), ones);
    const __m256i q23 =
        _mm256_madd_epi16(_mm256_add_epi16(_mm256_unpacklo_epi32(s[2], s[3]), _mm256_unpackhi_epi32(s[2], s[3])), ones);
    const __m256i q = _mm256_add_epi32(_mm256_unpacklo_epi64(q01, q23), _mm256_unpackhi_epi64(q01, q23));
    const __m256 sv = e8m0_half8(sc + b);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q),
                          _mm256_mul_ps(_mm256_permutevar8x32_ps(sv, eo), _mm256_loadu_ps(x.dx8p + b)), acc);
    macc = _mm256_fmadd_ps(sv, _mm256_loadu_ps(x.xsum + b), macc);
  }
  float tail = 0, mtail = 0;
  for (; b < nb; ++b) {  // the last < 8 blocks of the row
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.x8 + b * kChunk));
    const __m256i v = _mm256_shuffle_epi8(lut, nibbles32(codes));
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(v, xv), ones);
    codes += chunk_bytes(4);
    const float s = e8m0_half(sc[b]);
    tail += hsum(_mm256_cvtepi32_ps(p)) * (s * x.dx[b]);
    mtail += s * x.xsum[b];
  }
  y[r] = (hsum(acc) + tail) - float(kMxOffset) * (hsum(macc) + mtail);
}

void qmatvec_mx(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeX& x, float* y) {
  for (uint32_t r = r0; r < r1; ++r) mx_row8(w, r, x, y);
}

template <int BITS, uint32_t CPG>
void qmatvec_t(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeX& x, float* y) {
  uint32_t r = r0;
  // 4- and 8-bit codes a row at a time: one sequential stream, which Zen 3's prefetchers
  // follow better than two rows' (one thread, 2816x1024 from DRAM: 8-bit g32 15.9 -> 21.4 GB/s,
  // 4-bit 90 -> 85 us; with the codes in cache two rows gain nothing). 2- and 3-bit decode is
  // compute-bound and shares x's loads between two rows (one row: 10-15% slower).
  if constexpr (BITS == 4) {
    for (; r < r1; ++r) q4_rows<1, CPG>(w, r, x, y);
    return;
  }
  if constexpr (BITS == 8) {
    if constexpr (CPG == 1)
      for (; r < r1; ++r) qmatvec_rows_m<BITS, 1, CPG>(w, r, x, y);
    else
      for (; r < r1; ++r) qmatvec_rows<BITS, 1, CPG>(w, r, x, y);
    return;
  }
  if constexpr (CPG == 1) {  // groups of 32: 24.5 vs 18.9 GMAC/s on one Zen 3 core (g64: no gain)
    for (; r + 2 <= r1; r += 2) qmatvec_rows_m<BITS, 2, CPG>(w, r, x, y);
    if (r < r1) qmatvec_rows_m<BITS, 1, CPG>(w, r, x, y);
    return;
  }
  for (; r + 2 <= r1; r += 2) qmatvec_rows<BITS, 2, CPG>(w, r, x, y);
  if (r < r1) qmatvec_rows<BITS, 1, CPG>(w, r, x, y);
}

template <int BITS>
void qmatvec_b(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeX& x, float* y) {
  switch (w.group_size) {
    case 32: return qmatvec_t<BITS, 1>(w, r0, r1, x, y);
    case 64: return qmatvec_t<BITS, 2>(w, r0, r1, x, y);
    default: return qmatvec_t<BITS, 4>(w, r0, r1, x, y);
  }
}

// ---- prefill (T >= kGemmMinTokens): rows are dequantized once into an f32
// tile, then a register-blocked kernel runs every token over the tile.

constexpr int kGemmRows = 3, kGemmTokens = 4;  // 12 accumulators + 3 weights + 1 x

// Row r of W as f32 into dst[cols].
void dequant_row(const QMatrix& w, uint32_t r, float* dst) {
  const uint8_t* row = w.data + uint64_t(r) * w.row_bytes();
  const uint32_t cols = w.cols;
  if (w.mxfp4()) {
    const uint8_t* sc = w.scales + uint64_t(r) * (cols / kChunk);
    for (uint32_t b = 0; b < cols / kChunk; ++b, row += chunk_bytes(4)) {
      __m256 wv[4];
      mx_decode_chunk(row, _mm256_set1_ps(e8m0_half(sc[b])), wv);
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(dst + b * kChunk + 8 * k, wv[k]);
    }
    return;
  }
  if (!w.quantized()) {
    uint32_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      __m256 v;
      if (w.kind == kF32) v = load8<kF32>(row + 4 * c);
      else if (w.kind == kF16) v = load8<kF16>(row + 2 * c);
      else v = load8<kBF16>(row + 2 * c);
      _mm256_storeu_ps(dst + c, v);
    }
    for (; c < cols; ++c)
      dst[c] = w.kind == kF32   ? load1<kF32>(row + 4 * c)
               : w.kind == kF16 ? load1<kF16>(row + 2 * c)
                                : load1<kBF16>(row + 2 * c);
    return;
  }
  const uint32_t gs = w.group_size, ng = cols / gs, cpg = gs / kChunk, cb = chunk_bytes(w.bits);
  const uint8_t* sc = w.scales + uint64_t(r) * ng * 2;
  const uint8_t* mn = w.mins + uint64_t(r) * ng * 2;
  for (uint32_t g = 0; g < ng; ++g) {
    const __m256 s = _mm256_set1_ps(f16_to_f32(load_u16(sc + 2 * g)));
    const __m256 m = _mm256_set1_ps(w.min_mult * f16_to_f32(load_u16(mn + 2 * g)));
    for (uint32_t c = 0; c < cpg; ++c, row += cb) {
      __m256 wv[4];
      switch (w.bits) {
        case 2: decode_chunk<2>(row, wv); break;
        case 3: decode_chunk<3>(row, wv); break;
        case 4: decode_chunk<4>(row, wv); break;
        default: decode_chunk<8>(row, wv); break;
      }
      float* d = dst + (g * cpg + c) * kChunk;
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(d + 8 * k, _mm256_fmadd_ps(wv[k], s, m));
    }
  }
}

// out[t * ystride + r] = tile[r] . x[t] for R rows, TB tokens.
template <int R, int TB>
void gemm_micro(const float* const* wr, const float* const* xt, uint32_t cols, float* out, uint32_t ystride) {
  __m256 acc[TB][R];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  uint32_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(wr[r] + c);
    for (int t = 0; t < TB; ++t) {
      const __m256 xv = _mm256_loadu_ps(xt[t] + c);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_fmadd_ps(wv[r], xv, acc[t][r]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r) {
      float v = hsum(acc[t][r]);
      for (uint32_t cc = c; cc < cols; ++cc) v += wr[r][cc] * xt[t][cc];
      out[uint64_t(t) * ystride + uint32_t(r)] = v;
    }
}

// Every token of x [T, cols] over R dequantized rows wr[r] [cols] -> y[t * ystride + r].
template <int R>
void gemm_tokens(const float* const* wr, const float* x, int64_t T, uint32_t cols, float* y, uint32_t ystride) {
  int64_t t0 = 0;
  const float* xt[kGemmTokens];
  for (; t0 + kGemmTokens <= T; t0 += kGemmTokens) {
    for (int t = 0; t < kGemmTokens; ++t) xt[t] = x + (t0 + t) * cols;
    gemm_micro<R, kGemmTokens>(wr, xt, cols, y + t0 * ystride, ystride);
  }
  const int rest = int(T - t0);
  for (int t = 0; t < rest; ++t) xt[t] = x + (t0 + t) * cols;
  switch (rest) {
    case 1: return gemm_micro<R, 1>(wr, xt, cols, y + t0 * ystride, ystride);
    case 2: return gemm_micro<R, 2>(wr, xt, cols, y + t0 * ystride, ystride);
    case 3: return gemm_micro<R, 3>(wr, xt, cols, y + t0 * ystride, ystride);
    default: return;
  }
}

// ---- prefill with integer activations. Codes of at most 4 bits: a panel of 8 rows is
// unpacked to bytes once, interleaved so that one vector holds 4 consecutive values of
// each of the 8 rows; vpmaddubsw multiplies it with 4 of a token's int8 values broadcast
// (u8 codes <= 15 times s8 x: 8 such products summed per 16-bit lane stay below
// 8 * 2 * 15 * 127 = 30480), and each 32-bit lane of the block's dot is one row's.
// 8-bit codes meet x rounded to int16 (int8 x would cost them many times their own error):
// code - 128 in 16 bits, 2 columns per 32-bit lane, vpmaddwd with 2 of a token's values.

constexpr uint32_t kPanel = 8;  // rows per panel, one per 32-bit lane
constexpr int kPanelTokens = 4;  // tokens per pass over a panel: 4 dots + 4 sums in registers
// The panels' BITS for MXFP4 (kind 5): codes looked up as kE2m1x2 + kMxOffset (0..24), so a
// block is scale * (u - kMxOffset) and its min -kMxOffset * scale. 24 * 127 * 2 per pair: 4
// products per 16-bit lane at most (24384), so a block's 8 are summed as two halves.
constexpr int kMx = 5;

// The MXFP4 lookup table, unsigned: kE2m1x2 + kMxOffset.
inline __m256i mx_lut_u8() {
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kMxLutU8)));
}

// One chunk of 32 codes -> its values as bytes, in order.
template <int BITS>
inline __m256i chunk_u8(const uint8_t* p) {
  if constexpr (BITS == kMx) {
    return _mm256_shuffle_epi8(mx_lut_u8(), nibbles32(p));
  } else if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
  } else {
    static_assert(BITS == 2 || BITS == 3, "bits");
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(0x03);
    const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 2), m));
    const __m128i hi = _mm_unpacklo_epi64(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(_mm_srli_epi16(b, 6), m));
    __m256i v = _mm256_set_m128i(hi, lo);
    if constexpr (BITS == 3) {
      // bit 2 of v[j] is bit j of the u32 after the 2-bit part: byte j of the word spread over 8 lanes
      const __m256i word = _mm256_set1_epi32(int(load_u32(p + 8)));
      const __m256i spread = _mm256_shuffle_epi8(
          word, _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
      const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
      v = _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(4)));
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

// Vectors per block of a panel: 8-bit codes take 16-bit lanes (x is int16 for them).
template <int BITS>
constexpr uint32_t kPanelVecs = BITS == 8 ? 16 : 8;

// Rows r0..r0+n-1 (n <= 8; the others zero) -> tile [nb][kPanelVecs] vectors, per block b the
// 8 vectors of 4 columns as bytes (8-bit codes: 16 vectors of 2 columns as code - 128 in 16
// bits), and sc8, mn8 [nb][8]: each row's scale and min * min_mult per block (8-bit codes:
// the min plus 128 * scale, as the codes lost 128; 0 for symmetric ones).
template <int BITS>
void unpack_panel(const QMatrix& w, uint32_t r0, uint32_t n, __m256i* tile, float* sc8, float* mn8) {
  const uint32_t nb = w.cols / kChunk, cpg = w.group_size / kChunk, ng = nb / cpg;
  const uint64_t rb = w.row_bytes();
  constexpr uint32_t cb = chunk_bytes(BITS == kMx ? 4 : BITS);
  for (uint32_t b = 0; b < nb; ++b) {
    if constexpr (BITS == 8) {
      __m256i lo[kPanel], hi[kPanel];  // columns 0..15 and 16..31 of each row, 16 bits each
      const __m256i off = _mm256_set1_epi16(128);
      for (uint32_t i = 0; i < kPanel; ++i) {
        if (i >= n) {
          lo[i] = hi[i] = _mm256_setzero_si256();
          continue;
        }
        const uint8_t* p = w.data + uint64_t(r0 + i) * rb + b * kChunk;
        lo[i] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), off);
        hi[i] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))), off);
      }
      transpose8x8_epi32(lo);
      transpose8x8_epi32(hi);
      for (uint32_t q = 0; q < 8; ++q) {
        _mm256_store_si256(tile + b * 16 + q, lo[q]);
        _mm256_store_si256(tile + b * 16 + 8 + q, hi[q]);
      }
    } else {
      __m256i v[kPanel];
      for (uint32_t i = 0; i < kPanel; ++i)
        v[i] = i < n ? chunk_u8<BITS>(w.data + uint64_t(r0 + i) * rb + b * cb) : _mm256_setzero_si256();
      transpose8x8_epi32(v);
      for (uint32_t q = 0; q < 8; ++q) _mm256_store_si256(tile + b * 8 + q, v[q]);
    }
  }
  for (uint32_t i = 0; i < kPanel; ++i) {
    if constexpr (BITS == kMx) {
      for (uint32_t b = 0; b < nb; ++b) {
        const float s = i < n ? e8m0_half(w.scales[uint64_t(r0 + i) * nb + b]) : 0.0f;
        sc8[b * kPanel + i] = s;
        mn8[b * kPanel + i] = -float(kMxOffset) * s;
      }
      continue;
    }
    const uint8_t* sc = w.scales + uint64_t(r0 + i) * ng * 2;
    const uint8_t* mn = w.mins + uint64_t(r0 + i) * ng * 2;
    for (uint32_t b = 0; b < nb; ++b) {
      const float s = i < n ? f16_to_f32(load_u16(sc + 2 * (b / cpg))) : 0.0f;
      const float m = i < n ? w.min_mult * f16_to_f32(load_u16(mn + 2 * (b / cpg))) : 0.0f;
      sc8[b * kPanel + i] = s;
      mn8[b * kPanel + i] = BITS == 8 ? m + 128.0f * s : m;
    }
  }
}

// 4 bytes at p (4 int8 values, or 2 int16) in every 32-bit lane.
template <class T>
inline __m256i bcast_i32(const T* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// NT tokens from t0 over one unpacked panel -> y[t * ystride + r0 + i] for its n rows.
// Inlined into the panel loop: called once per panel it ran 25% slower (GCC 12).
template <int BITS, int NT>
__attribute__((always_inline)) inline void panel_tokens(const __m256i* tile, const float* sc8, const float* mn8, uint32_t nb, const QuantizedActs& x,
                  int64_t t0, float* y, uint32_t ystride, uint32_t r0, uint32_t n) {
  using XT = std::conditional_t<BITS == 8, int16_t, int8_t>;  // x's values: int16 for 8-bit codes
  const XT* xq[NT];
  const float* dx[NT];
  const float* bs[NT];
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) {
    if constexpr (BITS == 8) xq[t] = x.q16.data() + (t0 + t) * int64_t(x.cols);
    else xq[t] = x.q.data() + (t0 + t) * int64_t(x.cols);
    dx[t] = x.dx.data() + (t0 + t) * int64_t(nb);
    bs[t] = x.bsum.data() + (t0 + t) * int64_t(nb);
    acc[t] = _mm256_setzero_ps();
  }
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  for (uint32_t b = 0; b < nb; ++b) {
    const __m256i* wb = tile + b * kPanelVecs<BITS>;
    __m256i d32[NT];
    if constexpr (BITS == 8) {
      // 16 vectors of 2 columns: (code - 128) * x16 pairs summed to 32 bits, |sum| < 2^31 over
      // the block (32 * 128 * 32767)
      {
        const __m256i w0 = _mm256_load_si256(wb);
        for (int t = 0; t < NT; ++t) d32[t] = _mm256_madd_epi16(w0, bcast_i32(xq[t] + b * kChunk));
      }
#pragma GCC unroll 15
      for (uint32_t q = 1; q < 16; ++q) {
        const __m256i wq = _mm256_load_si256(wb + q);
        for (int t = 0; t < NT; ++t)
          d32[t] = _mm256_add_epi32(d32[t], _mm256_madd_epi16(wq, bcast_i32(xq[t] + b * kChunk + 2 * q)));
      }
    } else {
      __m256i s16[NT];
      [[maybe_unused]] __m256i s16b[BITS == kMx ? NT : 1];  // MXFP4: columns 16..31 summed apart
      {
        const __m256i w0 = _mm256_load_si256(wb);
        for (int t = 0; t < NT; ++t) s16[t] = _mm256_maddubs_epi16(w0, bcast_i32(xq[t] + b * kChunk));
      }
#pragma GCC unroll 7
      for (uint32_t q = 1; q < 8; ++q) {
        const __m256i wq = _mm256_load_si256(wb + q);
        for (int t = 0; t < NT; ++t) {
          const __m256i p = _mm256_maddubs_epi16(wq, bcast_i32(xq[t] + b * kChunk + 4 * q));
          if constexpr (BITS == kMx) {
            if (q < 4) s16[t] = _mm256_add_epi16(s16[t], p);
            else s16b[t] = q == 4 ? p : _mm256_add_epi16(s16b[t], p);
          } else {
            s16[t] = _mm256_add_epi16(s16[t], p);
          }
        }
      }
      for (int t = 0; t < NT; ++t) {
        d32[t] = _mm256_madd_epi16(s16[t], ones);
        if constexpr (BITS == kMx) d32[t] = _mm256_add_epi32(d32[t], _mm256_madd_epi16(s16b[t], ones));
      }
    }
    const __m256 sv = _mm256_loadu_ps(sc8 + b * kPanel), mv = _mm256_loadu_ps(mn8 + b * kPanel);
    for (int t = 0; t < NT; ++t) {
      const __m256 d = _mm256_cvtepi32_ps(d32[t]);
      acc[t] = _mm256_fmadd_ps(d, _mm256_mul_ps(sv, _mm256_broadcast_ss(dx[t] + b)), acc[t]);
      acc[t] = _mm256_fmadd_ps(mv, _mm256_broadcast_ss(bs[t] + b), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    float* yt = y + uint64_t(t0 + t) * ystride + r0;
    if (n == kPanel) {
      _mm256_storeu_ps(yt, acc[t]);
    } else {
      alignas(32) float out[kPanel];
      _mm256_store_ps(out, acc[t]);
      for (uint32_t i = 0; i < n; ++i) yt[i] = out[i];
    }
  }
}

// The last nt < kPanelTokens tokens (NT the largest such count).
template <int BITS, int NT>
void panel_tail(int nt, const __m256i* tile, const float* sc8, const float* mn8, uint32_t nb, const QuantizedActs& x,
                int64_t t0, float* y, uint32_t ystride, uint32_t r0, uint32_t n) {
  if constexpr (NT > 0) {
    if (nt == NT) return panel_tokens<BITS, NT>(tile, sc8, mn8, nb, x, t0, y, ystride, r0, n);
    panel_tail<BITS, NT - 1>(nt, tile, sc8, mn8, nb, x, t0, y, ystride, r0, n);
  }
}

// Every token of x over the panels of rows [r0, r1).
template <int BITS>
void gemm_int8_panels(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y) {
  const uint32_t nb = w.cols / kChunk;
  struct alignas(32) Vec {
    uint8_t bytes[32];
  };
  std::vector<Vec> tile_buf(size_t(nb) * kPanelVecs<BITS>);  // C++17: over-aligned new
  __m256i* tile = reinterpret_cast<__m256i*>(tile_buf.data());
  std::vector<float> sc8(size_t(nb) * kPanel), mn8(size_t(nb) * kPanel);
  for (uint32_t r = r0; r < r1; r += kPanel) {
    const uint32_t n = std::min(kPanel, r1 - r);
    unpack_panel<BITS>(w, r, n, tile, sc8.data(), mn8.data());
    int64_t t = 0;
    for (; t + kPanelTokens <= x.T; t += kPanelTokens)
      panel_tokens<BITS, kPanelTokens>(tile, sc8.data(), mn8.data(), nb, x, t, y, w.rows, r, n);
    panel_tail<BITS, kPanelTokens - 1>(int(x.T - t), tile, sc8.data(), mn8.data(), nb, x, t, y, w.rows, r, n);
  }
}

}  // namespace

void rows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, int nt, float* y,
          uint32_t ystride) {
  // x[t] [cols], xsum[t] [cols / group_size] -> y[t * ystride + r], r in [r0, r1)
  switch (nt) {
    case 1: return rows_nt<1>(w, r0, r1, x, xsum, y, ystride);
    case 2: return rows_nt<2>(w, r0, r1, x, xsum, y, ystride);
    case 3: return rows_nt<3>(w, r0, r1, x, xsum, y, ystride);
    default: return rows_nt<4>(w, r0, r1, x, xsum, y, ystride);
  }
}

DecodeInput::DecodeInput(const float* x, uint32_t cols, uint32_t gs, bool need16, bool need8) {
  if (need16) {
    x16.resize(cols), dx16.resize(cols / kChunk), xsum16.resize(cols / gs);
    quantize_x16(x, cols, x16.data(), dx16.data());
    group_sums(x, cols, gs, xsum16.data());
  }
  if (need8) {
    x8.resize(cols), dx8.resize(cols / kChunk), xsum8.resize(cols / gs);
    quantize_x8(x, cols, gs, x8.data(), dx8.data(), xsum8.data());
    // q4_rows' layouts: per pair of blocks the first halves, then the second halves; dx per 8
    // blocks in the order 0 2 4 6 1 3 5 7
    const uint32_t nb = cols / kChunk;
    x8p.resize(cols), dx8p.resize(nb);
    pair_blocks(x8.data(), cols, x8p.data());
    for (uint32_t b = 0; b < nb; ++b)
      dx8p[b] = b / 8 * 8 + 8 <= nb ? dx8[b / 8 * 8 + (b % 8) % 4 * 2 + (b % 8) / 4] : dx8[b];
  }
}

void qmatvec(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  // in: x [cols] rounded -> y[r], r in [r0, r1)
  const DecodeX x = decode_x(in, w.bits);
  if (w.mxfp4()) return qmatvec_mx(w, r0, r1, x, y);
  switch (w.bits) {
    case 2: return qmatvec_b<2>(w, r0, r1, x, y);
    case 3: return qmatvec_b<3>(w, r0, r1, x, y);
    case 4: return qmatvec_b<4>(w, r0, r1, x, y);
    default: return qmatvec_b<8>(w, r0, r1, x, y);
  }
}

void gemm_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* x, int64_t T, float* y) {
  // x [T, cols] -> y [T, rows], rows [r0, r1), through an f32 tile of kGemmRows rows
  const uint32_t cols = w.cols;
  std::vector<float> tile(size_t(kGemmRows) * cols);
  for (uint32_t r = r0; r < r1; r += kGemmRows) {
    const int R = int(std::min<uint32_t>(kGemmRows, r1 - r));
    const float* wr[kGemmRows];
    for (int i = 0; i < R; ++i) {
      if (w.kind == kF32 && (reinterpret_cast<uintptr_t>(w.data) & 3) == 0) {
        wr[i] = reinterpret_cast<const float*>(w.data + uint64_t(r + uint32_t(i)) * w.row_bytes());  // in place
      } else {
        dequant_row(w, r + uint32_t(i), tile.data() + uint64_t(i) * cols);
        wr[i] = tile.data() + uint64_t(i) * cols;
      }
    }
    switch (R) {
      case 1: gemm_tokens<1>(wr, x, T, cols, y + r, w.rows); break;
      case 2: gemm_tokens<2>(wr, x, T, cols, y + r, w.rows); break;
      default: gemm_tokens<3>(wr, x, T, cols, y + r, w.rows); break;
    }
  }
}

void quantize_row_q16(const float* x, uint32_t cols, int16_t* q, float* dx, float* bsum) {
  // x [cols] -> q [cols], dx, bsum [cols / 32], as portable::quantize_row_q16
  for (uint32_t b = 0; b < cols / kChunk; ++b) {
    __m256i v[4];
    dx[b] = round_block(x + b * kChunk, 32767.0f, v);
    // packs interleaves 128-bit lanes: restore order with a 64-bit permute
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kChunk),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kChunk + 16),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(v[2], v[3]), 0xD8));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    bsum[b] = dx[b] * hsum(_mm256_cvtepi32_ps(s));  // |sum| <= 32 * 32767 < 2^24: exact in f32
  }
}

void quantize_row_q8(const float* x, uint32_t cols, int8_t* q, float* dx, float* bsum) {
  // x [cols] -> q [cols], dx, bsum [cols / 32], as portable::quantize_row_q8
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (uint32_t b = 0; b < cols / kChunk; ++b) {
    __m256i v[4];
    dx[b] = round_block(x + b * kChunk, 127.0f, v);
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kChunk), _mm256_permutevar8x32_epi32(p, order));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    bsum[b] = dx[b] * hsum(_mm256_cvtepi32_ps(s));  // |sum| <= 32 * 127: exact in f32
  }
}

void gemm_int8_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y) {
  // x: T tokens rounded [T, cols] -> y [T, rows], rows [r0, r1) in panels of 8
  if (w.mxfp4()) return gemm_int8_panels<kMx>(w, r0, r1, x, y);
  switch (w.bits) {
    case 2: return gemm_int8_panels<2>(w, r0, r1, x, y);
    case 3: return gemm_int8_panels<3>(w, r0, r1, x, y);
    case 4: return gemm_int8_panels<4>(w, r0, r1, x, y);
    default: return gemm_int8_panels<8>(w, r0, r1, x, y);
  }
}

uint64_t byte_sum(const uint8_t* p, uint64_t n) {
  uint64_t i = 0;
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 128 <= n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + portable::byte_sum(p + i, n - i);  // the tail, 8 bytes a step
}

}  // namespace edgemoe::kernels::avx2

#endif  // EDGEMOE_AVX2
