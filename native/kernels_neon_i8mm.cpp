// The NEON decode kernel for 8-bit codes with i8mm's usdot (unsigned codes times
// signed int8 x), compiled for it whatever the build's -march/-mcpu; kernels_neon.cpp
// calls it only on a CPU whose hwcaps have i8mm. With x16 = 256 * xh + xl, a block is
// 256 * usdot(c, xh) + udot(c, xl): no c - 128 correction as with sdot. Other
// bitwidths gain nothing from usdot and take the dotprod kernel.
#include "kernels_impl.h"

#if defined(EDGEMOE_NEON)

#include <arm_neon.h>

#include <cstdint>
#include <vector>

#include "common.h"

// Everything defined from here on is compiled with dotprod and i8mm: added to the
// build's architecture when it has dotprod already (a v9 -mcpu keeps its __ARM_ARCH),
// else as armv8.2-a+dotprod+i8mm, the least GCC's intrinsics are declared for.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("dotprod,i8mm"))), apply_to = function)
#elif !defined(__ARM_FEATURE_MATMUL_INT8)
#define EDGEMOE_I8MM_REGION 1
#pragma GCC push_options
#if defined(__ARM_FEATURE_DOTPROD)
#pragma GCC target("+i8mm")
#else
#pragma GCC target("arch=armv8.2-a+dotprod+i8mm")
#endif
#endif

#include "kernels_neon_decode.h"

namespace edgemoe::kernels::neon {

namespace {

struct DotI8mm : PlainTotals {
  static constexpr int kLevel = int(Level::kI8mm);
  static constexpr bool kWideScales = false;  // unscaled: these cores move general registers to vectors on one pipe
  template <int BITS>
  static constexpr bool kPaired = false;
  template <int BITS>
  struct Block : HighLow {
    static_assert(BITS == 8, "usdot pays off for 8-bit codes only");
    int8x16_t h0, h1;   // xh, values 0..15 and 16..31
    uint8x16_t l0, l1;  // xl
    Block(const DecodeX& x, uint32_t b) {
      const uint32_t at = b * kChunk;
      h0 = vld1q_s8(x.xh + at);
      h1 = vld1q_s8(x.xh + at + 16);
      l0 = vld1q_u8(x.xl + at);
      l1 = vld1q_u8(x.xl + at + 16);
    }
    Part dot(const uint8_t* p) const {
      const uint8x16_t lo = vld1q_u8(p), hi = vld1q_u8(p + 16);
      // zeros from movi here, not seed(): the cores with i8mm (Neoverse N2 class: X2..X4,
      // A710, A720) move general registers to vectors on one pipe (M0), which 16 seeds
      // per pass saturate (llvm-mca, Cortex-X4 model: 5.0 against 6.9 bytes per cycle)
      const uint32x4_t u = vdotq_u32(vdotq_u32(vdupq_n_u32(0), lo, l0), hi, l1);
      const int32x4_t s = vusdotq_s32(vusdotq_s32(vdupq_n_s32(0), lo, h0), hi, h1);
      return {s, vreinterpretq_s32_u32(u)};
    }
  };
};

}  // namespace

void qmatvec_i8mm(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  if (w.bits != 8) return qmatvec_dotprod_unscaled(w, r0, r1, in, y);
  qmatvec_bits<DotI8mm, 8>(w, r0, r1, in, y);
}

}  // namespace edgemoe::kernels::neon

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(EDGEMOE_I8MM_REGION)
#pragma GCC pop_options
#endif

#endif  // EDGEMOE_NEON
