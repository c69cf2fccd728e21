// The NEON decode kernel with the dot-product instructions (sdot/udot), compiled
// for them whatever the build's -march/-mcpu; kernels_neon.cpp calls it only on a
// CPU whose hwcaps have them. x16 = 256 * xh + xl (xh int8, xl uint8), so a block of
// codes c times the int16 x is 256 * (c . xh) + (c . xl), both exact 8-bit dots:
// sdot for 2/3/4-bit codes (< 16, they fit int8) with xh or the int8 x, udot for
// c . xl. 8-bit codes (0..255) do not fit int8: sdot takes c - 128 and the block
// adds back 128 * 256 * sum(xh) (DecodeInput::hcorr); kernels_neon_i8mm.cpp's
// usdot takes them as they are.
#include "kernels_impl.h"

#if defined(EDGEMOE_NEON)

#include <arm_neon.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

// Everything defined from here on is compiled with dotprod. GCC declares the intrinsics
// for armv8.2-a+dotprod, so a caller must be at least that: below it (armv8-a, a Pi 4's
// -mcpu) the region says so; a build that has dotprod already needs no region.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#elif !defined(__ARM_FEATURE_DOTPROD)
#define EDGEMOE_DOTPROD_REGION 1
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif

#include "kernels_neon_decode.h"

namespace edgemoe::kernels::neon {

namespace {

// Block dots with sdot/udot. 2/3-bit codes are < 8, so they fit int8 for sdot. WIDE: the
// scaled float loop (kWide), for the dotprod level (Neoverse N1 class: A76, A78AE); the
// i8mm level (Neoverse N2 class: X2..X4, A710, A720) runs them unscaled, its cores
// moving general registers to vectors on one pipe, which the seeds already keep busy.
template <bool WIDE>
struct DotSdot {
  static constexpr int kLevel = int(WIDE ? Level::kDotprod : Level::kI8mm);
  static constexpr bool kWideScales = WIDE;

  // An MXFP4 block: its codes looked up in lut (kE2m1x2, signed), sdot with the int8 x.
  static EDGEMOE_INLINE int32x4_t mx_dot(int8x16_t lut, const uint8_t* p, int8x16_t x0, int8x16_t x1) {
    const uint8x16_t b = vld1q_u8(p);
    const int8x16_t a = vqtbl1q_s8(lut, vandq_u8(b, vdupq_n_u8(0x0F))), c = vqtbl1q_s8(lut, vshrq_n_u8(b, 4));
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), a, x0), c, x1);
  }
  // 4-bit blocks start their sdot chain at [kMagicBits, 0, 0, 0] (seed), so four blocks'
  // totals arrive as f32 bits and one fsub converts them, exactly: |total| <= 32 * 15 *
  // 127 < 2^22. 2-bit blocks too, their udot chain (|total| <= 32 * 3 * 32767 < 2^22; a
  // pair of blocks starts at [kMagicBits, 0, kMagicBits, 0], seed_pair). 3- and 8-bit
  // totals can reach 2^22: converted by scvtf.
  template <int BITS>
  static constexpr int32_t kSeed = BITS == 4 || BITS == 2 ? kMagicBits : 0;
  template <int BITS>
  static EDGEMOE_INLINE float32x4_t totals(int32x4_t t) {
    if constexpr (kSeed<BITS> != 0) return magic_to_f32(t);
    return vcvtq_f32_s32(t);
  }
  template <int BITS>
  static constexpr bool kPaired = BITS == 2 || BITS == 3;

  // 2/3-bit codes, two blocks at once (unpack_pair), dotted with xh2/xl2: four sdot and
  // four udot per pair of blocks, not per block.
  template <int BITS>
  struct Pair {
    static_assert(BITS == 2 || BITS == 3, "2/3-bit codes");
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
      int32x4_t s = vdotq_s32(seed(0), vreinterpretq_s8_u8(f[0]), h[0]);
      uint32x4_t u = vdotq_u32(vreinterpretq_u32_s32(seed_pair(kSeed<BITS>)), f[0], l[0]);
      for (int k = 1; k < 4; ++k) {
        s = vdotq_s32(s, vreinterpretq_s8_u8(f[k]), h[k]);
        u = vdotq_u32(u, f[k], l[k]);
      }
      return vmlaq_n_s32(vreinterpretq_s32_u32(u), s, 256);
    }
  };

  template <int BITS>
  struct Block : std::conditional_t<BITS == 8, HighLow, OneVector> {
    using Part = typename std::conditional_t<BITS == 8, HighLow, OneVector>::Part;
    int8x16_t h0, h1;   // 4-bit: the int8 x; others: xh, values 0..15 and 16..31
    uint8x16_t l0, l1;  // xl (not 4-bit)
    int32_t corr = 0;   // 8-bit codes: 128 * sum(xh), where c . xh starts (c - 128 . xh + it)
    Block(const DecodeX& x, uint32_t b) {
      const uint32_t at = b * kChunk;
      if constexpr (BITS == 4) {
        h0 = vld1q_s8(x.x8 + at);
        h1 = vld1q_s8(x.x8 + at + 16);
      } else {
        h0 = vld1q_s8(x.xh + at);
        h1 = vld1q_s8(x.xh + at + 16);
        l0 = vld1q_u8(x.xl + at);
        l1 = vld1q_u8(x.xl + at + 16);
        if constexpr (BITS == 8) corr = x.hcorr[b] / 256;  // hcorr = 32768 * sum(xh)
      }
    }
    Part dot(const uint8_t* p) const {
      uint8x16_t lo, hi;
      unpack<BITS>(p, lo, hi);
      if constexpr (BITS == 4) {
        return vdotq_s32(vdotq_s32(seed(kMagicBits), vreinterpretq_s8_u8(lo), h0), vreinterpretq_s8_u8(hi), h1);
      } else if constexpr (BITS == 8) {
        const uint32x4_t u = vdotq_u32(vdotq_u32(vreinterpretq_u32_s32(seed(0)), lo, l0), hi, l1);
        const uint8x16_t flip = vdupq_n_u8(0x80);
        const int32x4_t s = vdotq_s32(vdotq_s32(seed(corr), vreinterpretq_s8_u8(veorq_u8(lo, flip)), h0),
                                      vreinterpretq_s8_u8(veorq_u8(hi, flip)), h1);
        return {s, vreinterpretq_s32_u32(u)};
      } else {
        const uint32x4_t u = vdotq_u32(vdotq_u32(vreinterpretq_u32_s32(seed(kSeed<BITS>)), lo, l0), hi, l1);
        const int32x4_t s =
            vdotq_s32(vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(lo), h0), vreinterpretq_s8_u8(hi), h1);
        return vmlaq_n_s32(vreinterpretq_s32_u32(u), s, 256);
      }
    }
  };
};

}  // namespace

void qmatvec_dotprod(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  qmatvec_with<DotSdot<true>>(w, r0, r1, in, y);
}

void qmatvec_dotprod_unscaled(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  if (w.mxfp4()) return mx_with<DotSdot<false>>(w, r0, r1, in, y);
  switch (w.bits) {  // 8-bit codes have usdot there (kernels_neon_i8mm.cpp)
    case 2: return qmatvec_bits<DotSdot<false>, 2>(w, r0, r1, in, y);
    case 3: return qmatvec_bits<DotSdot<false>, 3>(w, r0, r1, in, y);
    default: return qmatvec_bits<DotSdot<false>, 4>(w, r0, r1, in, y);
  }
}

}  // namespace edgemoe::kernels::neon

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(EDGEMOE_DOTPROD_REGION)
#pragma GCC pop_options
#endif

#endif  // EDGEMOE_NEON
