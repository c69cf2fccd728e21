// Internal to kernels_neon.cpp, kernels_neon_dotprod.cpp and kernels_neon_i8mm.cpp: the
// one-token decode kernel, written once over a `Dot` policy (how a block of 32 codes
// meets the rounded x) and compiled once per instruction-set level. Each including file
// sets its level's target (a pragma region) before including this header, so everything
// here is in an unnamed namespace: every file keeps its own copy, compiled for its
// level, and none can be linked in place of another's (no sdot reaching a Cortex-A72).
// The including file has already included <arm_neon.h> and <cstdint>.
#pragma once

#include "kernels_impl.h"

namespace edgemoe::kernels::neon {
namespace {

#define EDGEMOE_INLINE inline __attribute__((always_inline))

// tools/mca_kernels.py builds with EDGEMOE_MCA to mark each kernel's inner loop for
// llvm-mca, one region per template instance (the immediates name it). Empty otherwise.
#if defined(EDGEMOE_MCA)
#define EDGEMOE_MCA_MARK(what, name, a, b, c, d) \
  asm volatile("// LLVM-MCA-" what " " name ::"i"(a), "i"(b), "i"(c), "i"(d))
#else
#define EDGEMOE_MCA_MARK(what, name, a, b, c, d)
#endif

constexpr uint32_t kPrefetchBytes = 1024;  // how far decode runs ahead of each row's weight stream

// Little-endian loads at any alignment, defined here so that they are compiled for the
// including file's level: GCC does not inline a function compiled for another target
// (common.h's, under -mcpu=cortex-a76, say) into the dot-product code.
EDGEMOE_INLINE uint32_t ld_u32(const uint8_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}
EDGEMOE_INLINE uint64_t ld_u64(const uint8_t* p) {
  uint64_t v;
  __builtin_memcpy(&v, p, 8);
  return v;
}
EDGEMOE_INLINE float ld_f16(const uint8_t* p) {
  __fp16 h;  // IEEE half on AArch64
  __builtin_memcpy(&h, p, 2);
  return float(h);
}

// [lo's 8 bytes, hi's 8 bytes] as a vector of 4 floats, moved by the integer unit (fmov;
// an `ins` takes a vector pipe too).
EDGEMOE_INLINE float32x4_t f32x4_bits(uint64_t lo, uint64_t hi) {
  float32x4_t r;
  asm("fmov %d0, %x1\n\tfmov %0.d[1], %x2" : "=w"(r) : "r"(lo), "r"(hi));
  return r;
}

// One chunk of 32 codes (docs/format.md) -> lo = values 0..15, hi = values 16..31, one byte each.
template <int BITS>
EDGEMOE_INLINE void unpack(const uint8_t* p, uint8x16_t& lo, uint8x16_t& hi) {
  if constexpr (BITS == 8) {
    lo = vld1q_u8(p);
    hi = vld1q_u8(p + 16);
  } else if constexpr (BITS == 4) {
    const uint8x16_t b = vld1q_u8(p);
    lo = vandq_u8(b, vdupq_n_u8(0x0F));
    hi = vshrq_n_u8(b, 4);
  } else {
    static_assert(BITS == 2 || BITS == 3, "bits");
    // byte j holds values j, j+8, j+16, j+24 in its bit pairs 0-1, 2-3, 4-5, 6-7
    const uint8x8_t b = vld1_u8(p), three = vdup_n_u8(3);
    lo = vcombine_u8(vand_u8(b, three), vand_u8(vshr_n_u8(b, 2), three));
    hi = vcombine_u8(vand_u8(vshr_n_u8(b, 4), three), vshr_n_u8(b, 6));
    if constexpr (BITS == 3) {
      // bit 2 of value j is bit j of the u32 after the 2-bit part: byte j/8 of it to lane j, then test bit j%8
      static constexpr uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
      static constexpr uint8_t kLo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
      static constexpr uint8_t kHi[16] = {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
      const uint8x16_t word = vreinterpretq_u8_u32(vdupq_n_u32(ld_u32(p + 8))), bit = vld1q_u8(kBit);
      const uint8x16_t four = vdupq_n_u8(4);
      lo = vbslq_u8(four, vtstq_u8(vqtbl1q_u8(word, vld1q_u8(kLo)), bit), lo);  // bit 2 from the test
      hi = vbslq_u8(four, vtstq_u8(vqtbl1q_u8(word, vld1q_u8(kHi)), bit), hi);
    }
  }
}

// Two blocks b, b+1 of 2/3-bit codes at p -> f[k] = field k (values 8k..8k+7) of block b
// in bytes 0-7 and of block b+1 in bytes 8-15: one 16-byte load of 2-bit codes holds both,
// so one shift and mask per field serves two blocks. DecodeInput's xh2/xl2 match the layout.
template <int BITS>
EDGEMOE_INLINE void unpack_pair(const uint8_t* p, uint8x16_t f[4]) {
  static_assert(BITS == 2 || BITS == 3, "2/3-bit codes");
  constexpr uint32_t cb = chunk_bytes(BITS);
  // 3-bit: the blocks' 2-bit parts are 12 bytes apart, joined by the integer unit (an
  // ld1 to the upper half would take a vector pipe)
  const uint8x16_t q = BITS == 2 ? vld1q_u8(p) : vreinterpretq_u8_f32(f32x4_bits(ld_u64(p), ld_u64(p + cb)));
  const uint8x16_t three = vdupq_n_u8(3);
  f[0] = vandq_u8(q, three);
  f[1] = vandq_u8(vshrq_n_u8(q, 2), three);
  f[2] = vandq_u8(vshrq_n_u8(q, 4), three);
  f[3] = vshrq_n_u8(q, 6);
  if constexpr (BITS == 3) {
    // bit 2 of value j is bit j of the block's u32 after its 2-bit part: byte k of each
    // block's word to its 8 lanes of field k, test each lane's bit, insert the test's bit 2
    // into the field (one bit/bsl instead of an and and an orr)
    static constexpr uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    static constexpr uint8_t kSel[4][16] = {{0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4},
                                            {1, 1, 1, 1, 1, 1, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5},
                                            {2, 2, 2, 2, 2, 2, 2, 2, 6, 6, 6, 6, 6, 6, 6, 6},
                                            {3, 3, 3, 3, 3, 3, 3, 3, 7, 7, 7, 7, 7, 7, 7, 7}};
    const uint64_t words = uint64_t(ld_u32(p + 8)) | uint64_t(ld_u32(p + cb + 8)) << 32;
    const uint8x16_t w = vreinterpretq_u8_u64(vdupq_n_u64(words)), bit = vld1q_u8(kBit), four = vdupq_n_u8(4);
    for (int k = 0; k < 4; ++k) f[k] = vbslq_u8(four, vtstq_u8(vqtbl1q_u8(w, vld1q_u8(kSel[k])), bit), f[k]);
  }
}

// The part of a DecodeInput that a matrix of `bits`-bit codes reads.
struct DecodeX {
  const int8_t* x8 = nullptr;      // [cols] 4-bit codes
  const int16_t* x16 = nullptr;    // [cols] 2/3/8-bit codes, plain NEON
  const int8_t* xh = nullptr;      // [cols] x16 >> 8, dot-product levels
  const uint8_t* xl = nullptr;     // [cols] x16 & 255, dot-product levels
  const int8_t* xh2 = nullptr;     // [cols] xh, block pairs interleaved (DecodeInput)
  const uint8_t* xl2 = nullptr;    // [cols] xl, block pairs interleaved
  const int32_t* hcorr = nullptr;  // [cols / 32]
  const float* dx;                 // [cols / 32]
  const float* dxw;                // [cols / 32] dx * kWide
  const float* xsum;               // [cols / gs]
  DecodeX(const DecodeInput& in, int bits) {
    if (bits == 4) {
      x8 = in.x8.data(), dx = in.dx8.data(), dxw = in.dx8w.data(), xsum = in.xsum8.data();
    } else {
      x16 = in.x16.data(), xh = in.xh.data(), xl = in.xl.data(), hcorr = in.hcorr.data();
      xh2 = in.xh2.data(), xl2 = in.xl2.data();
      dx = in.dx16.data(), dxw = in.dx16w.data(), xsum = in.xsum16.data();
    }
  }
};

// At the dot-product levels the main loop's floats are scaled by powers of two so that
// the f16 group scales need no vector conversion (fcvtl: two micro-ops of one vector pipe
// per 4 scales, Neoverse N1 / Cortex-A76 and A78 tables): a scale's bits moved into f32
// place on the integer unit (scaled_f16x2) are the scale times 2^-112 exactly, for every
// finite f16, subnormal or not; dx comes times kWide = 2^56 (DecodeInput::dx8w, dx16w); a
// row's sum is multiplied by kWide at the end. Powers of two change no rounding while every
// value stays a normal float (a row's terms above 2^-70 in magnitude, x below 2^50): then
// these are the bits of the unscaled loop that plain NEON and the i8mm level run (fcvtl;
// the Cortex-A72 decodes three instructions a cycle, which the integer work would fill).
// With flush-to-zero (FPCR.FZ, off unless a program sets it) a scale below 2^-14 would
// count as 0 here.
constexpr float kWide = 0x1p56f;

// Two f16 at p (little-endian, any alignment) -> their f32 bits times 2^-112 in one u64,
// the first in the low half: each value's bits shifted 13 places up, sign back to bit 31.
EDGEMOE_INLINE uint64_t scaled_f16x2(const uint8_t* p) {
  const uint32_t w = ld_u32(p);
  const uint32_t lo = uint32_t(int32_t(int16_t(uint16_t(w)))) << 13;  // sign in bits 28..31
  const uint64_t hi = uint64_t(uint32_t(int32_t(w) >> 16)) << 45;     // sign in bits 60..63
  return (uint64_t(lo) | hi) & 0x8FFFFFFF8FFFFFFFull;                 // drop bits 28..30, 60..62
}

// One f16 at p -> its f32 bits times 2^-112.
EDGEMOE_INLINE uint32_t scaled_f16(const uint8_t* p) {
  int16_t h;
  __builtin_memcpy(&h, p, 2);
  return (uint32_t(int32_t(h)) << 13) & 0x8FFFFFFFu;
}

// 4 f16 at p (any alignment) -> f32.
EDGEMOE_INLINE float32x4_t f16x4(const uint8_t* p) { return vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p))); }

// What most levels do with four blocks' integer totals: convert them. (DotSdot's 4-bit
// blocks start their sums at kMagicBits instead of 0, see there.)
struct PlainTotals {
  template <int BITS>
  static constexpr int32_t kSeed = 0;  // what a block's dot adds to its total
  template <int BITS>
  static EDGEMOE_INLINE float32x4_t totals(int32x4_t t) {
    return vcvtq_f32_s32(t);
  }
};

// 1.5 * 2^23 as f32 bits: for |t| < 2^22 the bits kMagicBits + t are the f32 1.5 * 2^23 + t
// exactly, so subtracting 1.5 * 2^23 gives float(t) with one single-cycle fsub where scvtf
// takes two micro-ops of one vector pipe (Neoverse N1 / Cortex-A76 and A78 tables).
constexpr int32_t kMagicBits = 0x4B400000;
EDGEMOE_INLINE float32x4_t magic_to_f32(int32x4_t biased) {
  return vsubq_f32(vreinterpretq_f32_s32(biased), vdupq_n_f32(12582912.0f));
}

// A vector [v, 0, 0, 0] made by the integer unit (fmov from a general register), not by
// a vector pipe as movi or a register copy would be: each block's dot chain needs a fresh
// accumulator, and the vector pipes are what the decode loop is short of.
EDGEMOE_INLINE int32x4_t seed(int32_t v) {
  int32x4_t r;
  asm volatile("fmov %s0, %w1" : "=w"(r) : "r"(v));
  return r;
}
// [v, 0, v, 0] the same way (dup from a general register), for a pair of blocks in one vector.
EDGEMOE_INLINE int32x4_t seed_pair(int32_t v) {
  int32x4_t r;
  asm volatile("dup %0.2d, %x1" : "=w"(r) : "r"(uint64_t(uint32_t(v))));
  return r;
}

// What a block's dot returns when it is one vector of 4 partial sums (most kinds): the
// sums of blocks are added pairwise (two blocks -> one vector) and in the end summed.
struct OneVector {
  using Part = int32x4_t;
  static EDGEMOE_INLINE Part padd(Part a, Part b) { return vpaddq_s32(a, b); }
  static EDGEMOE_INLINE int32x4_t total(Part p) { return p; }
  static EDGEMOE_INLINE int32_t sum(Part p) { return vaddvq_s32(p); }
};

// 8-bit codes at the dot-product levels: a block is 256 * (c . xh) + (c . xl); the two
// dots stay apart through the pairwise sums and are joined once per four blocks.
struct HighLow {
  struct Part {
    int32x4_t s;  // c . xh
    int32x4_t u;  // c . xl (at most 32 * 255 * 255: fits int32 as unsigned and signed)
  };
  static EDGEMOE_INLINE Part padd(Part a, Part b) { return {vpaddq_s32(a.s, b.s), vpaddq_s32(a.u, b.u)}; }
  static EDGEMOE_INLINE int32x4_t total(Part p) { return vaddq_s32(p.u, vshlq_n_s32(p.s, 8)); }
  static EDGEMOE_INLINE int32_t sum(Part p) { return vaddvq_s32(p.u) + 256 * vaddvq_s32(p.s); }
};

// sum_g min_g * xsum[g] for one row, before the factor min_mult (a power of two).
EDGEMOE_INLINE float min_term(const uint8_t* mn, const float* xsum, uint32_t ng) {
  float32x4_t acc = vdupq_n_f32(0);
  uint32_t g = 0;
  for (; g + 4 <= ng; g += 4) acc = vfmaq_f32(acc, f16x4(mn + 2 * g), vld1q_f32(xsum + g));
  float v = vaddvq_f32(acc);
  for (; g < ng; ++g) v += ld_f16(mn + 2 * g) * xsum[g];
  return v;
}

// The scales of the 4 chunks b..b+3 of a row (b a multiple of 4) whose f16 group scales
// start at sc, CPG chunks per group; WIDE: times 2^-112 (kWide), built on the integer unit.
template <uint32_t CPG, bool WIDE>
EDGEMOE_INLINE float32x4_t chunk_scales4(const uint8_t* sc, uint32_t b) {
  static_assert(CPG == 1 || CPG == 4, "chunks per group (groups of 64 take two rows at once)");
  if constexpr (CPG == 1) {
    if constexpr (WIDE) return f32x4_bits(scaled_f16x2(sc + 2 * b), scaled_f16x2(sc + 2 * b + 4));
    return f16x4(sc + 2 * b);
  } else {
    if constexpr (WIDE)
      return vreinterpretq_f32_u32(vdupq_n_u32(scaled_f16(sc + b / 2)));  // dup from a general register
    return vdupq_n_f32(ld_f16(sc + b / 2));
  }
}

// The scales of groups b/2, b/2 + 1 of rows i and j (b a multiple of 4, groups of 64):
// [i: b/2, b/2 + 1, j: b/2, b/2 + 1], from the rows' two 4-byte runs; WIDE as above.
template <bool WIDE>
EDGEMOE_INLINE float32x4_t pair_scales4(const uint8_t* sci, const uint8_t* scj, uint32_t b) {
  if constexpr (WIDE) return f32x4_bits(scaled_f16x2(sci + b), scaled_f16x2(scj + b));
  const uint64_t s4 = uint64_t(ld_u32(sci + b)) | uint64_t(ld_u32(scj + b)) << 32;
  return vcvt_f32_f16(vreinterpret_f16_u64(vcreate_u64(s4)));
}

// RR rows from row r: y[r + i] = sum_b scale(b) dx[b] (codes_b . xq_b) + min_mult * min . xsum.
// A block's dot (Dot::Block<BITS>::dot) is an exact integer spread over 4 lanes; four
// blocks' lanes are added pairwise into one vector of their totals, converted once and
// scaled by those blocks' dx * scale. The totals are the same integers at every level,
// and so is every float operation after them, up to powers of two (kWide): all levels
// give the same bits.
template <class Dot, int BITS, int RR, uint32_t CPG>
EDGEMOE_INLINE void qmatvec_rows(const QMatrix& w, uint32_t r, const DecodeX& x, float* y) {
  using Block = typename Dot::template Block<BITS>;
  constexpr uint32_t cb = chunk_bytes(BITS);
  constexpr bool kRowPairs = CPG == 2;        // acc[i / 2] holds rows i, i + 1 (a last odd row: twice)
  constexpr bool kScaled = Dot::kWideScales;  // scaled floats, scales on the integer unit (see kWide)
  const uint32_t nb = w.cols / kChunk, ng = nb / CPG;
  const float* dx = x.dx;
  const uint8_t* codes[RR];
  const uint8_t* sc[RR];
  float32x4_t acc[RR];
  float tail[RR];
  for (int i = 0; i < RR; ++i) {
    codes[i] = w.data + uint64_t(r + uint32_t(i)) * w.row_bytes();
    sc[i] = w.scales + uint64_t(r + uint32_t(i)) * ng * 2;
    acc[i] = vdupq_n_f32(0);
    tail[i] = 0;
  }
  uint32_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    EDGEMOE_MCA_MARK("BEGIN", "decode_b%c0_rows%c1_cpg%c2_level%c3", BITS, RR, CPG, Dot::kLevel);
    int32x4_t t[RR];  // the totals of blocks b..b+3, one per lane
    if constexpr (Dot::template kPaired<BITS>) {
      int32x4_t t01[RR], t23[RR];  // pairwise lane sums of blocks b, b+1 and b+2, b+3
      // two blocks' sums in one vector, lanes [b, b, b+1, b+1] (Dot::Pair)
      using Pair = typename Dot::template Pair<BITS>;
      {
        const Pair xp(x, b);
        for (int i = 0; i < RR; ++i) t01[i] = xp.dot(codes[i]);
      }
      {
        const Pair xp(x, b + 2);
        for (int i = 0; i < RR; ++i) t23[i] = xp.dot(codes[i] + 2 * cb);
      }
      for (int i = 0; i < RR; ++i) t[i] = vpaddq_s32(t01[i], t23[i]);
    } else {
      typename Block::Part t01[RR], t23[RR];
      {
        const Block xb(x, b);  // one block's x live at a time: the rows' partial sums stay in registers
        for (int i = 0; i < RR; ++i) t01[i] = xb.dot(codes[i]);
      }
      {
        const Block xb(x, b + 1);
        for (int i = 0; i < RR; ++i) t01[i] = Block::padd(t01[i], xb.dot(codes[i] + cb));
      }
      {
        const Block xb(x, b + 2);
        for (int i = 0; i < RR; ++i) t23[i] = xb.dot(codes[i] + 2 * cb);
      }
      {
        const Block xb(x, b + 3);
        for (int i = 0; i < RR; ++i) t23[i] = Block::padd(t23[i], xb.dot(codes[i] + 3 * cb));
      }
      for (int i = 0; i < RR; ++i) t[i] = Block::total(Block::padd(t01[i], t23[i]));
    }
    const float32x4_t dx4 = vld1q_f32((kScaled ? x.dxw : dx) + b);  // kScaled: times kWide, the scales times kWide^-2
    for (int i = 0; i < RR; ++i) {
      __builtin_prefetch(codes[i] + kPrefetchBytes);
      codes[i] += 4 * cb;
    }
    if constexpr (kRowPairs) {
      // two rows at once: their blocks' dx * total summed per group of two blocks, lanes
      // [row i: group b/2, b/2 + 1, row i + 1: the same], times those four scales, in one
      // accumulator
      for (int i = 0; i < RR; i += 2) {
        const int j = i + 1 < RR ? i + 1 : i;
        const float32x4_t s4 = pair_scales4<kScaled>(sc[i], sc[j], b);
        const float32x4_t w0 = vmulq_f32(Dot::template totals<BITS>(t[i]), dx4);
        const float32x4_t w1 = i == j ? w0 : vmulq_f32(Dot::template totals<BITS>(t[j]), dx4);
        acc[i / 2] = vfmaq_f32(acc[i / 2], vpaddq_f32(w0, w1), s4);
      }
    } else {
      for (int i = 0; i < RR; ++i) {
        const float32x4_t m = vmulq_f32(chunk_scales4<CPG, kScaled>(sc[i], b), dx4);
        acc[i] = vfmaq_f32(acc[i], Dot::template totals<BITS>(t[i]), m);
      }
    }
    EDGEMOE_MCA_MARK("END", "decode_b%c0_rows%c1_cpg%c2_level%c3", BITS, RR, CPG, Dot::kLevel);
  }
  for (; b < nb; ++b) {  // the last < 4 blocks of a row
    const Block xb(x, b);
#pragma GCC unroll 4
    for (int i = 0; i < RR; ++i) {
      const int32_t t = Block::sum(xb.dot(codes[i])) - Dot::template kSeed<BITS>;
      tail[i] += float(t) * (dx[b] * ld_f16(sc[i] + 2 * (b / CPG)));
      codes[i] += cb;
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < RR; ++i) {
    float main;
    if constexpr (kRowPairs) {
      main = i % 2 ? vgetq_lane_f32(acc[i / 2], 2) + vgetq_lane_f32(acc[i / 2], 3)
                   : vgetq_lane_f32(acc[i / 2], 0) + vgetq_lane_f32(acc[i / 2], 1);
    } else {
      main = vaddvq_f32(acc[i]);
    }
    if constexpr (kScaled) main *= kWide;
    y[r + uint32_t(i)] =
        (main + tail[i]) + w.min_mult * min_term(w.mins + uint64_t(r + uint32_t(i)) * ng * 2, x.xsum, ng);
  }
}

template <class Dot, int BITS, uint32_t CPG>
EDGEMOE_INLINE void qmatvec_cpg(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeX& x, float* y) {
  // rows per pass: 4 for 4-bit codes with sdot, whose block x is two registers; 2 for the
  // int16 ones, whose x (four registers, eight for a 2/3-bit pair) and unpacked codes made
  // four rows spill (llvm-mca, Neoverse N1 model: 8-bit 3.9 -> 4.5 bytes per cycle), and
  // for plain NEON, whose int16 products spill four rows too. Every row's result is the
  // same whichever pass it is in.
  constexpr int kRows = BITS == 4 && Dot::kLevel > 0 ? 4 : 2;
  uint32_t r = r0;
  for (; r + kRows <= r1; r += kRows) qmatvec_rows<Dot, BITS, kRows, CPG>(w, r, x, y);
  for (; r < r1; ++r) qmatvec_rows<Dot, BITS, 1, CPG>(w, r, x, y);
}

template <class Dot, int BITS>
EDGEMOE_INLINE void qmatvec_bits(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  const DecodeX x(in, BITS);
  switch (w.group_size) {
    case 32: return qmatvec_cpg<Dot, BITS, 1>(w, r0, r1, x, y);
    case 64: return qmatvec_cpg<Dot, BITS, 2>(w, r0, r1, x, y);
    default: return qmatvec_cpg<Dot, BITS, 4>(w, r0, r1, x, y);
  }
}

// 4 E8M0 bytes at e -> 2^(e[i] - 128) (e8m0_half: exponent bits; the subnormals below e = 2).
EDGEMOE_INLINE float32x4_t e8m0_half4(const uint8_t* e) {
  const uint32x4_t v = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(ld_u32(e))))));
  const uint32x4_t normal = vshlq_n_u32(vsubq_u32(v, vdupq_n_u32(1)), 23);
  const uint32x4_t subnormal = vshlq_u32(vdupq_n_u32(0x00200000u), vreinterpretq_s32_u32(v));  // counts >= 32: 0
  return vreinterpretq_f32_u32(vbslq_u32(vcgtq_u32(v, vdupq_n_u32(1)), normal, subnormal));
}

// MXFP4 rows (kind 5), RR from row r: each block's codes looked up (tbl) as kE2m1x2, signed,
// and dotted with the int8 x by Dot::mx_dot (an exact integer spread over 4 lanes); four
// blocks' totals in one vector, converted once and scaled by dx_b * 2^(e_b - 128). Every
// level forms the same integers, then the same float operations: the same bits.
template <class Dot, int RR>
EDGEMOE_INLINE void mx_rows(const QMatrix& w, uint32_t r, const DecodeX& x, float* y) {
  const int8x16_t lut = vld1q_s8(kE2m1x2);
  const uint32_t nb = w.cols / kChunk;
  const uint8_t* codes[RR];
  const uint8_t* sc[RR];
  float32x4_t acc[RR];
  float tail[RR];
  for (int i = 0; i < RR; ++i) {
    codes[i] = w.data + uint64_t(r + uint32_t(i)) * w.row_bytes();
    sc[i] = w.scales + uint64_t(r + uint32_t(i)) * nb;
    acc[i] = vdupq_n_f32(0);
    tail[i] = 0;
  }
  uint32_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    int32x4_t t[RR][4];
    for (uint32_t k = 0; k < 4; ++k) {
      const int8x16_t x0 = vld1q_s8(x.x8 + (b + k) * kChunk), x1 = vld1q_s8(x.x8 + (b + k) * kChunk + 16);
      for (int i = 0; i < RR; ++i) t[i][k] = Dot::mx_dot(lut, codes[i] + k * chunk_bytes(4), x0, x1);
    }
    const float32x4_t dx4 = vld1q_f32(x.dx + b);
    for (int i = 0; i < RR; ++i) {
      __builtin_prefetch(codes[i] + kPrefetchBytes);
      codes[i] += 4 * chunk_bytes(4);
      const int32x4_t tot = vpaddq_s32(vpaddq_s32(t[i][0], t[i][1]), vpaddq_s32(t[i][2], t[i][3]));
      acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(tot), vmulq_f32(e8m0_half4(sc[i] + b), dx4));
    }
  }
  for (; b < nb; ++b) {  // the last < 4 blocks of a row
    const int8x16_t x0 = vld1q_s8(x.x8 + b * kChunk), x1 = vld1q_s8(x.x8 + b * kChunk + 16);
    for (int i = 0; i < RR; ++i) {
      const int32_t tot = vaddvq_s32(Dot::mx_dot(lut, codes[i], x0, x1));
      tail[i] += float(tot) * (x.dx[b] * e8m0_half(sc[i][b]));
      codes[i] += chunk_bytes(4);
    }
  }
  for (int i = 0; i < RR; ++i) y[r + uint32_t(i)] = vaddvq_f32(acc[i]) + tail[i];
}

template <class Dot>
EDGEMOE_INLINE void mx_with(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  const DecodeX x(in, 4);
  uint32_t r = r0;
  for (; r + 2 <= r1; r += 2) mx_rows<Dot, 2>(w, r, x, y);
  for (; r < r1; ++r) mx_rows<Dot, 1>(w, r, x, y);
}

// Rows [r0, r1) of y = W x for one token, the block dots formed by Dot.
template <class Dot>
EDGEMOE_INLINE void qmatvec_with(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y) {
  if (w.mxfp4()) return mx_with<Dot>(w, r0, r1, in, y);
  switch (w.bits) {
    case 2: return qmatvec_bits<Dot, 2>(w, r0, r1, in, y);
    case 3: return qmatvec_bits<Dot, 3>(w, r0, r1, in, y);
    case 4: return qmatvec_bits<Dot, 4>(w, r0, r1, in, y);
    default: return qmatvec_bits<Dot, 8>(w, r0, r1, in, y);
  }
}

}  // namespace

// The decode kernel at the dot-product levels (kernels_neon_dotprod.cpp); the i8mm level
// runs its 2/3/4-bit and MXFP4 codes through qmatvec_dotprod_unscaled.
void qmatvec_dotprod(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y);
void qmatvec_dotprod_unscaled(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y);
void qmatvec_i8mm(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y);

}  // namespace edgemoe::kernels::neon
