// The AArch64 NEON kernels (NEON is baseline there, so every aarch64 build runs
// them; elsewhere the file compiles to nothing):
//   - decode (T=1): x is rounded per 32 values as on AVX2 (int8 for 4-bit codes,
//     int16 for 2/3/8-bit ones), 4-bit rows four per pass with sdot, two otherwise,
//     groups of 64 scaled two rows at once. The block dot comes in three
//     variants picked at run time from the CPU's hwcaps (cpu_level): plain NEON
//     (smull/smlal; Cortex-A72 of a Pi 4), sdot/udot (dotprod; A76, A78AE, X4,
//     kernels_neon_dotprod.cpp) and usdot for 8-bit codes (i8mm). All three form
//     the same exact integer per block, and so give the same bits;
//   - 2..11 tokens: a row's codes are decoded to f32 once for 4 tokens;
//   - prefill (T >= 12): 4 rows at a time are dequantized to an f32 tile and a
//     4x4 register-blocked FMA kernel runs every token over it.
#include "kernels_impl.h"

#if defined(EDGEMOE_NEON)

#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "kernels_neon_decode.h"

namespace edgemoe::kernels::neon {

namespace {

// Baseline NEON block dots. 4-bit codes (<= 15) times int8 x: products summed in
// int16 lanes (4 * 15 * 127 fits), then widened. Others: codes widened to int16 and
// multiplied-accumulated into int32 with int16 x (8 * 255 * 32767 fits).
struct DotNeon : PlainTotals {
  static constexpr int kLevel = int(Level::kNeon);
  static constexpr bool kWideScales = false;  // the unscaled loop (see kWide)

  // An MXFP4 block: its codes looked up in lut (kE2m1x2) and multiplied with int8 x, the
  // products summed in int16 lanes (4 * 12 * 127 fits), then widened.
  static EDGEMOE_INLINE int32x4_t mx_dot(int8x16_t lut, const uint8_t* p, int8x16_t x0, int8x16_t x1) {
    const uint8x16_t b = vld1q_u8(p);
    const int8x16_t a = vqtbl1q_s8(lut, vandq_u8(b, vdupq_n_u8(0x0F))), c = vqtbl1q_s8(lut, vshrq_n_u8(b, 4));
    int16x8_t s = vmull_s8(vget_low_s8(a), vget_low_s8(x0));
    s = vmlal_high_s8(s, a, x0);
    s = vmlal_s8(s, vget_low_s8(c), vget_low_s8(x1));
    s = vmlal_high_s8(s, c, x1);
    return vpaddlq_s16(s);
  }
  template <int BITS>
  static constexpr bool kPaired = BITS == 2 || BITS == 3;

  // 2/3-bit codes, two blocks at once (unpack_pair) against xh2/xl2: codes < 8 times xh
  // in int16 lanes (4 * 7 * 128 fits) and times xl in uint16 (4 * 7 * 255), block b in
  // the low halves, b+1 in the high ones; then 256 * (c . xh) + (c . xl) per block.
  template <int BITS>
  struct Pair {
    int8x16_t h[4];   // xh2: field k of blocks b, b+1
    uint8x16_t l[4];  // xl2
    Pair(const DecodeX& x, uint32_t b) {
      for (uint32_t k = 0; k < 4; ++k) {
        h[k] = vld1q_s8(x.xh2 + b * kChunk + 16 * k);
        l[k] = vld1q_u8(x.xl2 + b * kChunk + 16 * k);
      }
    }
    int32x4_t dot(const uint8_t* p) const {
      uint8x16_t f[4];
      unpack_pair<BITS>(p, f);
      int8x16_t c = vreinterpretq_s8_u8(f[0]);
      int16x8_t s0 = vmull_s8(vget_low_s8(c), vget_low_s8(h[0])), s1 = vmull_high_s8(c, h[0]);
      uint16x8_t u0 = vmull_u8(vget_low_u8(f[0]), vget_low_u8(l[0])), u1 = vmull_high_u8(f[0], l[0]);
      for (int k = 1; k < 4; ++k) {
        c = vreinterpretq_s8_u8(f[k]);
        s0 = vmlal_s8(s0, vget_low_s8(c), vget_low_s8(h[k]));
        s1 = vmlal_high_s8(s1, c, h[k]);
        u0 = vmlal_u8(u0, vget_low_u8(f[k]), vget_low_u8(l[k]));
        u1 = vmlal_high_u8(u1, f[k], l[k]);
      }
      const int32x4_t t0 = vmlaq_n_s32(vreinterpretq_s32_u32(vpaddlq_u16(u0)), vpaddlq_s16(s0), 256);
      const int32x4_t t1 = vmlaq_n_s32(vreinterpretq_s32_u32(vpaddlq_u16(u1)), vpaddlq_s16(s1), 256);
      return vpaddq_s32(t0, t1);
    }
  };
  template <int BITS>
  struct Block : OneVector {
    int8x16_t x0, x1;  // 4-bit: int8 x, values 0..15 and 16..31
    int16x8_t v[4];    // others: int16 x, values 8k..8k+7
    Block(const DecodeX& x, uint32_t b) {
      if constexpr (BITS == 4) {
        x0 = vld1q_s8(x.x8 + b * kChunk);
        x1 = vld1q_s8(x.x8 + b * kChunk + 16);
      } else {
        for (int k = 0; k < 4; ++k) v[k] = vld1q_s16(x.x16 + b * kChunk + 8 * uint32_t(k));
      }
    }
    int32x4_t dot(const uint8_t* p) const {
      uint8x16_t lo, hi;
      unpack<BITS>(p, lo, hi);
      if constexpr (BITS == 4) {
        const int8x16_t a = vreinterpretq_s8_u8(lo), c = vreinterpretq_s8_u8(hi);
        int16x8_t s = vmull_s8(vget_low_s8(a), vget_low_s8(x0));
        s = vmlal_high_s8(s, a, x0);
        s = vmlal_s8(s, vget_low_s8(c), vget_low_s8(x1));
        s = vmlal_high_s8(s, c, x1);
        return vpaddlq_s16(s);
      } else {
        const int16x8_t a0 = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo)));
        const int16x8_t a1 = vreinterpretq_s16_u16(vmovl_high_u8(lo));
        const int16x8_t c0 = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi)));
        const int16x8_t c1 = vreinterpretq_s16_u16(vmovl_high_u8(hi));
        int32x4_t s0 = vmull_s16(vget_low_s16(a0), vget_low_s16(v[0]));
        int32x4_t s1 = vmull_s16(vget_low_s16(a1), vget_low_s16(v[1]));
        s0 = vmlal_high_s16(s0, a0, v[0]);
        s1 = vmlal_high_s16(s1, a1, v[1]);
        s0 = vmlal_s16(s0, vget_low_s16(c0), vget_low_s16(v[2]));
        s1 = vmlal_s16(s1, vget_low_s16(c1), vget_low_s16(v[3]));
        s0 = vmlal_high_s16(s0, c0, v[2]);
        s1 = vmlal_high_s16(s1, c1, v[3]);
        return vaddq_s32(s0, s1);
      }
    }
  };
};

#if defined(__linux__)
#if defined(HWCAP_ASIMDDP)
constexpr unsigned long kHwcapDotprod = HWCAP_ASIMDDP;
#else
constexpr unsigned long kHwcapDotprod = 1ul << 20;
#endif
#if defined(HWCAP2_I8MM)
constexpr unsigned long kHwcap2I8mm = HWCAP2_I8MM;
#else
constexpr unsigned long kHwcap2I8mm = 1ul << 13;
#endif
#endif

Level detect_level() {
#if defined(__linux__)
  if (!(getauxval(AT_HWCAP) & kHwcapDotprod)) return Level::kNeon;
  return (getauxval(AT_HWCAP2) & kHwcap2I8mm) ? Level::kI8mm : Level::kDotprod;
#else
  return Level::kNeon;  // no hwcaps to ask: the baseline runs everywhere
#endif
}

// One block of 32 values rounded to integers of magnitude <= qmax, nearest with ties
// to even (as the AVX2 path and the tests' reference): q[k] = values 4k..4k+3; returns
// the step dx (x ~= q * dx).
inline float round_block(const float* xb, float qmax, int32x4_t q[8]) {
  float32x4_t v[8];
  float32x4_t mx = vdupq_n_f32(0);
  for (int k = 0; k < 8; ++k) {
    v[k] = vld1q_f32(xb + 4 * k);
    mx = vmaxq_f32(mx, vabsq_f32(v[k]));
  }
  const float amax = vmaxvq_f32(mx);
  const float32x4_t inv = vdupq_n_f32(amax > 0 ? qmax / amax : 0.0f);
  for (int k = 0; k < 8; ++k) q[k] = vcvtnq_s32_f32(vmulq_f32(v[k], inv));
  return amax / qmax;
}

// ---- 2..11 tokens: a row's codes decoded to f32 once for up to 4 tokens.

// One chunk of 32 codes -> w[k] = values 4k..4k+3 as floats.
template <int BITS>
inline void decode_f32(const uint8_t* p, float32x4_t w[8]) {
  uint8x16_t lo, hi;
  unpack<BITS>(p, lo, hi);
  const uint16x8_t h[4] = {vmovl_u8(vget_low_u8(lo)), vmovl_high_u8(lo), vmovl_u8(vget_low_u8(hi)), vmovl_high_u8(hi)};
  for (int k = 0; k < 4; ++k) {
    w[2 * k] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(h[k])));
    w[2 * k + 1] = vcvtq_f32_u32(vmovl_high_u16(h[k]));
  }
}

template <int BITS, int NT>
void qrows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, float* y,
           uint32_t ystride) {
  const uint32_t gs = w.group_size, ng = w.cols / gs, cpg = gs / kChunk;
  for (uint32_t r = r0; r < r1; ++r) {
    const uint8_t* codes = w.data + uint64_t(r) * w.row_bytes();
    const uint8_t* sc = w.scales + uint64_t(r) * ng * 2;
    float32x4_t acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = vdupq_n_f32(0);
    for (uint32_t g = 0; g < ng; ++g) {
      float32x4_t d[NT][2];  // two FMA chains per token
      for (int t = 0; t < NT; ++t) d[t][0] = d[t][1] = vdupq_n_f32(0);
      for (uint32_t c = 0; c < cpg; ++c, codes += chunk_bytes(BITS)) {
        EDGEMOE_MCA_MARK("BEGIN", "rows_b%c0_tokens%c1", BITS, NT, 0, 0);
        float32x4_t wv[8];
        decode_f32<BITS>(codes, wv);
        const uint32_t col = (g * cpg + c) * kChunk;
        for (int k = 0; k < 8; ++k)
          for (int t = 0; t < NT; ++t) d[t][k & 1] = vfmaq_f32(d[t][k & 1], wv[k], vld1q_f32(x[t] + col + 4 * k));
        EDGEMOE_MCA_MARK("END", "rows_b%c0_tokens%c1", BITS, NT, 0, 0);
      }
      const float s = f16_to_f32(load_u16(sc + 2 * g));
      for (int t = 0; t < NT; ++t) acc[t] = vfmaq_n_f32(acc[t], vaddq_f32(d[t][0], d[t][1]), s);
    }
    const uint8_t* mn = w.mins + uint64_t(r) * ng * 2;
    for (int t = 0; t < NT; ++t)
      y[uint64_t(t) * ystride + r] = vaddvq_f32(acc[t]) + w.min_mult * min_term(mn, xsum[t], ng);
  }
}

// One MXFP4 chunk -> w[k] = values 4k..4k+3 as floats times s (the codes looked up as kE2m1x2).
inline void mx_decode_f32(const uint8_t* p, float s, float32x4_t w[8]) {
  const int8x16_t lut = vld1q_s8(kE2m1x2);
  const uint8x16_t b = vld1q_u8(p);
  const int8x16_t lo = vqtbl1q_s8(lut, vandq_u8(b, vdupq_n_u8(0x0F))), hi = vqtbl1q_s8(lut, vshrq_n_u8(b, 4));
  const int16x8_t h[4] = {vmovl_s8(vget_low_s8(lo)), vmovl_high_s8(lo), vmovl_s8(vget_low_s8(hi)), vmovl_high_s8(hi)};
  for (int k = 0; k < 4; ++k) {
    w[2 * k] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[k]))), s);
    w[2 * k + 1] = vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(h[k])), s);
  }
}

// MXFP4 rows for NT tokens: each chunk decoded to floats once and shared by the tokens.
template <int NT>
void mxrows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, float* y, uint32_t ystride) {
  const uint32_t nb = w.cols / kChunk;
  for (uint32_t r = r0; r < r1; ++r) {
    const uint8_t* codes = w.data + uint64_t(r) * w.row_bytes();
    const uint8_t* sc = w.scales + uint64_t(r) * nb;
    float32x4_t acc[NT][2];
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = vdupq_n_f32(0);
    for (uint32_t b = 0; b < nb; ++b, codes += chunk_bytes(4)) {
      float32x4_t wv[8];
      mx_decode_f32(codes, e8m0_half(sc[b]), wv);
      for (int k = 0; k < 8; ++k)
        for (int t = 0; t < NT; ++t)
          acc[t][k & 1] = vfmaq_f32(acc[t][k & 1], wv[k], vld1q_f32(x[t] + b * kChunk + 4 * uint32_t(k)));
    }
    for (int t = 0; t < NT; ++t) y[uint64_t(t) * ystride + r] = vaddvq_f32(vaddq_f32(acc[t][0], acc[t][1]));
  }
}

// 4 values of a float row at p (any alignment) as f32.
template <Kind K>
inline float32x4_t load4(const uint8_t* p) {
  if constexpr (K == kF32) return vreinterpretq_f32_u8(vld1q_u8(p));
  if constexpr (K == kF16) return f16x4(p);
  if constexpr (K == kBF16) return vreinterpretq_f32_u32(vshll_n_u16(vreinterpret_u16_u8(vld1_u8(p)), 16));
}

template <Kind K>
inline float load1(const uint8_t* p) {
  if constexpr (K == kF32) return load_f32(p);
  if constexpr (K == kF16) return f16_to_f32(load_u16(p));
  if constexpr (K == kBF16) return bf16_to_f32(load_u16(p));
}

template <Kind K, int NT>
void frows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, float* y, uint32_t ystride) {
  constexpr uint32_t es = K == kF32 ? 4 : 2;
  constexpr int C = NT == 1 ? 4 : 2;  // FMA chains per token: enough to hide the FMA latency
  const uint32_t cols = w.cols;
  for (uint32_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.data + uint64_t(r) * w.row_bytes();
    float32x4_t acc[NT][C];
    for (int t = 0; t < NT; ++t)
      for (int c = 0; c < C; ++c) acc[t][c] = vdupq_n_f32(0);
    uint32_t col = 0;
    for (; col + 16 <= cols; col += 16) {
      EDGEMOE_MCA_MARK("BEGIN", "float_kind%c0_tokens%c1", int(K), NT, 0, 0);
      for (int k = 0; k < 4; ++k) {
        const float32x4_t wv = load4<K>(row + (col + 4 * uint32_t(k)) * es);
        for (int t = 0; t < NT; ++t)
          acc[t][k % C] = vfmaq_f32(acc[t][k % C], wv, vld1q_f32(x[t] + col + 4 * uint32_t(k)));
      }
      EDGEMOE_MCA_MARK("END", "float_kind%c0_tokens%c1", int(K), NT, 0, 0);
    }
    for (; col + 4 <= cols; col += 4) {
      const float32x4_t wv = load4<K>(row + col * es);
      for (int t = 0; t < NT; ++t) acc[t][0] = vfmaq_f32(acc[t][0], wv, vld1q_f32(x[t] + col));
    }
    for (int t = 0; t < NT; ++t) {
      float32x4_t a = acc[t][0];
      for (int c = 1; c < C; ++c) a = vaddq_f32(a, acc[t][c]);
      float v = vaddvq_f32(a);
      for (uint32_t c = col; c < cols; ++c) v += load1<K>(row + c * es) * x[t][c];
      y[uint64_t(t) * ystride + r] = v;
    }
  }
}

template <int NT>
void rows_nt(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, float* y,
             uint32_t ystride) {
  switch (w.kind) {
    case kF32: return frows<kF32, NT>(w, r0, r1, x, y, ystride);
    case kF16: return frows<kF16, NT>(w, r0, r1, x, y, ystride);
    case kBF16: return frows<kBF16, NT>(w, r0, r1, x, y, ystride);
    case kMxfp4: return mxrows<NT>(w, r0, r1, x, y, ystride);
    case kQuant:
    case kQuantSym: break;
  }
  switch (w.bits) {
    case 2: return qrows<2, NT>(w, r0, r1, x, xsum, y, ystride);
    case 3: return qrows<3, NT>(w, r0, r1, x, xsum, y, ystride);
    case 4: return qrows<4, NT>(w, r0, r1, x, xsum, y, ystride);
    default: return qrows<8, NT>(w, r0, r1, x, xsum, y, ystride);
  }
}

// ---- prefill (T >= kGemmMinTokens): rows dequantized once into an f32 tile, then a
// register-blocked kernel runs every token over it.

constexpr int kGemmRows = 4, kGemmTokens = 4;  // 16 accumulators + 4 weights + 1 x of 32 registers

// Row r of W as f32 into dst[cols].
void dequant_row(const QMatrix& w, uint32_t r, float* dst) {
  const uint8_t* row = w.data + uint64_t(r) * w.row_bytes();
  const uint32_t cols = w.cols;
  if (w.mxfp4()) {
    const uint8_t* sc = w.scales + uint64_t(r) * (cols / kChunk);
    for (uint32_t b = 0; b < cols / kChunk; ++b, row += chunk_bytes(4)) {
      float32x4_t wv[8];
      mx_decode_f32(row, e8m0_half(sc[b]), wv);
      for (int k = 0; k < 8; ++k) vst1q_f32(dst + b * kChunk + 4 * uint32_t(k), wv[k]);
    }
    return;
  }
  if (!w.quantized()) {
    const uint32_t es = w.kind == kF32 ? 4 : 2;
    uint32_t c = 0;
    for (; c + 4 <= cols; c += 4)
      vst1q_f32(dst + c, w.kind == kF32   ? load4<kF32>(row + 4 * c)
                         : w.kind == kF16 ? load4<kF16>(row + 2 * c)
                                          : load4<kBF16>(row + 2 * c));
    for (; c < cols; ++c)
      dst[c] = w.kind == kF32   ? load1<kF32>(row + es * c)
               : w.kind == kF16 ? load1<kF16>(row + es * c)
                                : load1<kBF16>(row + es * c);
    return;
  }
  const uint32_t gs = w.group_size, ng = cols / gs, cpg = gs / kChunk, cb = chunk_bytes(w.bits);
  const uint8_t* sc = w.scales + uint64_t(r) * ng * 2;
  const uint8_t* mn = w.mins + uint64_t(r) * ng * 2;
  for (uint32_t g = 0; g < ng; ++g) {
    const float s = f16_to_f32(load_u16(sc + 2 * g));
    const float32x4_t m = vdupq_n_f32(w.min_mult * f16_to_f32(load_u16(mn + 2 * g)));
    for (uint32_t c = 0; c < cpg; ++c, row += cb) {
      float32x4_t wv[8];
      switch (w.bits) {
        case 2: decode_f32<2>(row, wv); break;
        case 3: decode_f32<3>(row, wv); break;
        case 4: decode_f32<4>(row, wv); break;
        default: decode_f32<8>(row, wv); break;
      }
      float* d = dst + (g * cpg + c) * kChunk;
      for (int k = 0; k < 8; ++k) vst1q_f32(d + 4 * k, vfmaq_n_f32(m, wv[k], s));
    }
  }
}

// out[t * ystride + r] = tile[r] . x[t] for R rows, TB tokens.
template <int R, int TB>
void gemm_micro(const float* const* wr, const float* const* xt, uint32_t cols, float* out, uint32_t ystride) {
  float32x4_t acc[TB][R];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = vdupq_n_f32(0);
  uint32_t c = 0;
  for (; c + 4 <= cols; c += 4) {
    EDGEMOE_MCA_MARK("BEGIN", "gemm_rows%c0_tokens%c1", R, TB, 0, 0);
    float32x4_t wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vld1q_f32(wr[r] + c);
    for (int t = 0; t < TB; ++t) {
      const float32x4_t xv = vld1q_f32(xt[t] + c);
      for (int r = 0; r < R; ++r) acc[t][r] = vfmaq_f32(acc[t][r], wv[r], xv);
    }
    EDGEMOE_MCA_MARK("END", "gemm_rows%c0_tokens%c1", R, TB, 0, 0);
  }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < R; ++r) {
      float v = vaddvq_f32(acc[t][r]);
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

}  // namespace

Level cpu_level() {
  static const Level level = detect_level();
  return level;
}

const char* level_name(Level level) {
  switch (level) {
    case Level::kI8mm: return "neon+dotprod+i8mm";
    case Level::kDotprod: return "neon+dotprod";
    case Level::kNeon: break;
  }
  return "neon";
}

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
  const uint32_t nb = cols / kChunk;
  if (need16) {
    x16.resize(cols), xh.resize(cols), xl.resize(cols), hcorr.resize(nb), dx16.resize(nb), xsum16.resize(cols / gs);
    xh2.resize(cols), xl2.resize(cols);
    for (uint32_t b = 0; b < nb; ++b) {
      int32x4_t q[8];
      dx16[b] = round_block(x + b * kChunk, 32767.0f, q);
      int32_t hs = 0;
      for (int k = 0; k < 4; ++k) {
        const int16x8_t v = vcombine_s16(vmovn_s32(q[2 * k]), vmovn_s32(q[2 * k + 1]));
        const uint32_t at = b * kChunk + 8 * uint32_t(k);
        vst1q_s16(&x16[at], v);
        const int8x8_t h = vshrn_n_s16(v, 8);  // x16 = 256 * h + l, l in [0, 255]
        vst1_s8(&xh[at], h);
        vst1_u8(&xl[at], vmovn_u16(vreinterpretq_u16_s16(v)));
        hs += vaddlv_s8(h);
      }
      hcorr[b] = 32768 * hs;
    }
    // a pair of blocks as one 2-bit code load holds them: values 8k..8k+7 of the first, then of the second
    for (uint32_t b = 0; b + 2 <= nb; b += 2)
      for (uint32_t k = 0; k < 4; ++k)
        for (uint32_t h = 0; h < 2; ++h) {
          const uint32_t from = (b + h) * kChunk + 8 * k, to = b * kChunk + 16 * k + 8 * h;
          std::copy(&xh[from], &xh[from] + 8, &xh2[to]);
          std::copy(&xl[from], &xl[from] + 8, &xl2[to]);
        }
    group_sums(x, cols, gs, xsum16.data());
    dx16w.resize(nb);
    for (uint32_t b = 0; b < nb; ++b) dx16w[b] = dx16[b] * kWide;
  }
  if (need8) {
    // the group sums of the rounded x, as avx2's quantize_x8: the min term then sees the x the codes do
    x8.resize(cols), dx8.resize(nb), xsum8.resize(cols / gs);
    const uint32_t bpg = gs / kChunk;
    for (uint32_t g = 0; g < cols / gs; ++g) {
      float s = 0;
      for (uint32_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        int32x4_t q[8];
        dx8[b] = round_block(x + b * kChunk, 127.0f, q);
        for (int k = 0; k < 4; ++k) {
          const int16x8_t v = vcombine_s16(vmovn_s32(q[2 * k]), vmovn_s32(q[2 * k + 1]));
          vst1_s8(&x8[b * kChunk + 8 * uint32_t(k)], vmovn_s16(v));
        }
        const int32x4_t qs = vaddq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])),
                                       vaddq_s32(vaddq_s32(q[4], q[5]), vaddq_s32(q[6], q[7])));
        s += dx8[b] * float(vaddvq_s32(qs));  // |sum| <= 32 * 127: exact in f32
      }
      xsum8[g] = s;
    }
    dx8w.resize(nb);
    for (uint32_t b = 0; b < nb; ++b) dx8w[b] = dx8[b] * kWide;
  }
}

void qmatvec_at(Level level, const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  // in: x [cols] rounded -> y[r], r in [r0, r1)
  switch (level) {
    case Level::kI8mm: return qmatvec_i8mm(w, r0, r1, in, y);
    case Level::kDotprod: return qmatvec_dotprod(w, r0, r1, in, y);
    case Level::kNeon: return qmatvec_with<DotNeon>(w, r0, r1, in, y);
  }
}

void qmatvec(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  qmatvec_at(cpu_level(), w, r0, r1, in, y);
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
      case 3: gemm_tokens<3>(wr, x, T, cols, y + r, w.rows); break;
      default: gemm_tokens<4>(wr, x, T, cols, y + r, w.rows); break;
    }
  }
}

uint64_t byte_sum(const uint8_t* p, uint64_t n) {
  uint64_t i = 0;
  uint64x2_t a0 = vdupq_n_u64(0), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 64 <= n; i += 64) {
    a0 = vaddq_u64(a0, vreinterpretq_u64_u8(vld1q_u8(p + i)));
    a1 = vaddq_u64(a1, vreinterpretq_u64_u8(vld1q_u8(p + i + 16)));
    a2 = vaddq_u64(a2, vreinterpretq_u64_u8(vld1q_u8(p + i + 32)));
    a3 = vaddq_u64(a3, vreinterpretq_u64_u8(vld1q_u8(p + i + 48)));
  }
  return vaddvq_u64(vaddq_u64(vaddq_u64(a0, a1), vaddq_u64(a2, a3))) +
         portable::byte_sum(p + i, n - i);  // the tail, 8 bytes a step
}

}  // namespace edgemoe::kernels::neon

#endif  // EDGEMOE_NEON
