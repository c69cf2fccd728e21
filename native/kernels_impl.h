// Internal to the matmul kernels: what the instruction-set files share and
// export to the driver (kernels.cpp). Not part of the native core's API.
//
// One file per instruction set, as ggml does:
//   kernels_portable.cpp  plain C++ (always compiled; the path of any build
//                         without a SIMD file for its CPU, e.g. a non-native x86
//                         build or an ARM board, where it auto-vectorizes);
//   kernels_avx2.cpp      AVX2+FMA+F16C (compiled to nothing without them);
//   kernels_avx512.cpp    AVX-512 F+BW+VL+VNNI (every x86-64 build, with its own
//                         target; used when CPUID and the OS's XSAVE state say
//                         the CPU we run on has them): the 4-bit decode and the
//                         int8 prefill;
//   kernels_neon.cpp      AArch64 NEON (compiled to nothing elsewhere), with
//                         dot-product (sdot/udot) and i8mm (usdot) variants of
//                         the decode kernel chosen at run time from the CPU's
//                         hwcaps, so one aarch64 build serves a Pi 4 and an Orin.
// The driver picks the instruction-set file at build time (x86: AVX2 only with
// EDGEMOE_NATIVE_ARCH, see CMakeLists.txt; aarch64: always NEON, it is baseline).
// The SIMD files share one contract: rows() as portable::rows, and a one-token
// decode (DecodeInput, qmatvec) and a prefill (gemm_rows) the driver calls.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EDGEMOE_AVX2 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define EDGEMOE_NEON 1
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EDGEMOE_X86 1
#endif

namespace edgemoe::kernels {

constexpr int kTokenBlock = 4;          // tokens that share one decode of a weight row
constexpr int64_t kGemmMinTokens = 12;  // from here on, dequantize rows to f32 once (SIMD paths)
constexpr uint32_t kChunk = 32;         // codes are packed per 32 values of a row

constexpr uint32_t chunk_bytes(uint32_t bits) { return bits * 4; }  // 32 values * bits / 8

// MXFP4 (kind 5): the e2m1 values of the 16 codes times two, so that they are integers
// (sign bit 3, then 2 exponent bits and 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, ...).
constexpr int8_t kE2m1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// kE2m1x2 + kMxOffset is unsigned (0..24), for the u8 x s8 multiplies of x86: a block's dot
// is then (codes' u8 . x) - kMxOffset * sum(x).
constexpr int32_t kMxOffset = 12;
// kE2m1x2 + kMxOffset, the x86 kernels' vpshufb table (16-byte aligned for one load).
alignas(16) inline constexpr int8_t kMxLutU8[16] = {
    kE2m1x2[0] + kMxOffset,  kE2m1x2[1] + kMxOffset,  kE2m1x2[2] + kMxOffset,  kE2m1x2[3] + kMxOffset,
    kE2m1x2[4] + kMxOffset,  kE2m1x2[5] + kMxOffset,  kE2m1x2[6] + kMxOffset,  kE2m1x2[7] + kMxOffset,
    kE2m1x2[8] + kMxOffset,  kE2m1x2[9] + kMxOffset,  kE2m1x2[10] + kMxOffset, kE2m1x2[11] + kMxOffset,
    kE2m1x2[12] + kMxOffset, kE2m1x2[13] + kMxOffset, kE2m1x2[14] + kMxOffset, kE2m1x2[15] + kMxOffset};

// An E8M0 scale byte e -> 2^(e - 128): the block's scale 2^(e - 127) with kE2m1x2's doubling
// undone. Exact for every e (e < 2 gives the subnormals 2^-128 and 2^-127); the parser refuses
// e = 255 (NaN).
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e >= 2 ? uint32_t(e - 1) << 23 : 0x00200000u << e;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// x [cols] float32 -> xsum [cols / gs]: the sum of each group of gs values, in order.
void group_sums(const float* x, uint32_t cols, uint32_t gs, float* xsum);

// x8 [cols] int8, rounded per block of 32 -> out [cols] in the x86 4-bit decode's pair layout:
// per pair of blocks (b, b+1) the first 16 values of each, then the last 16 of each; a last
// odd block as it is.
void pair_blocks(const int8_t* x8, uint32_t cols, int8_t* out);

namespace portable {

// Rows [r0, r1) of y = W x for nt <= kTokenBlock tokens.
// x[t] [cols] float32, W [rows, cols] any kind, xsum[t] [cols / group_size] (group
// sums of x[t]; quantized W only) -> y[t * ystride + r] for r in [r0, r1).
void rows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, int nt, float* y,
          uint32_t ystride);

// p [n] bytes -> their sum as little-endian u64 words (then the tail's bytes), mod 2^64.
uint64_t byte_sum(const uint8_t* p, uint64_t n);

// One token's x [cols] float32 -> q [cols] int8, dx and bsum [cols / 32]: per block of 32
// values amax / 127 and the nearest integers (ties to even), bsum = dx * sum q.
void quantize_row_q8(const float* x, uint32_t cols, int8_t* q, float* dx, float* bsum);

// As quantize_row_q8 to int16: amax / 32767 per block (the wide QuantizedActs of 8-bit codes).
void quantize_row_q16(const float* x, uint32_t cols, int16_t* q, float* dx, float* bsum);

// Rows [r0, r1) of y = x W^T for x's T tokens, W group-quantized with codes of 2, 3, 4 or 8
// bits: per row, token and block of 32, the exact integer dot of codes and x's integer values
// (int16 for 8-bit codes, x.wide; int8 otherwise), then y = sum over blocks of
// scale * dx * dot + min * bsum. y [T, rows].
void gemm_int8_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y);

}  // namespace portable

#if defined(EDGEMOE_AVX2)
namespace avx2 {

// As portable::rows: x[t] [cols] float32, W [rows, cols] any kind, xsum[t]
// [cols / group_size] -> y[t * ystride + r] for r in [r0, r1), nt <= kTokenBlock.
void rows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, int nt, float* y,
          uint32_t ystride);

// One token's x [cols] float32 rounded per block of 32 values for the decode
// kernels: to int8 for 4-bit codes (need8), to int16 for 2/3/8-bit ones (need16),
// with the per-block steps dx [cols / 32] and the group sums xsum [cols / gs] that
// go with each.
struct DecodeInput {
  std::vector<int16_t> x16;
  std::vector<int8_t> x8;
  std::vector<float> dx16, dx8, xsum16, xsum8;
  // x8 and dx8 as the 4-bit decode reads them: x8p per pair of blocks (b, b+1) their first
  // 16 values, then their last 16 (b in the low 16 bytes of each 32); dx8p per 8 blocks in
  // the order 0 2 4 6 1 3 5 7 (a last group of fewer than 8 in order)
  std::vector<int8_t> x8p;
  std::vector<float> dx8p;
  DecodeInput(const float* x, uint32_t cols, uint32_t gs, bool need16, bool need8);
};

// Rows [r0, r1) of y = W x for one token: W [rows, cols] group-quantized with the
// group size `in` was made for, or MXFP4 (`in` made for groups of 32), in = x [cols]
// rounded -> y[r] for r in [r0, r1).
void qmatvec(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y);

// Rows [r0, r1) of y = x W^T for T tokens (prefill): x [T, cols] float32, W [rows,
// cols] any kind, dequantized a few rows at a time to an f32 tile -> y [T, rows].
void gemm_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* x, int64_t T, float* y);

// As portable::byte_sum, 128 bytes a step.
uint64_t byte_sum(const uint8_t* p, uint64_t n);

// As portable::quantize_row_q8 and quantize_row_q16 (the same bits).
void quantize_row_q8(const float* x, uint32_t cols, int8_t* q, float* dx, float* bsum);
void quantize_row_q16(const float* x, uint32_t cols, int16_t* q, float* dx, float* bsum);

// As portable::gemm_int8_rows, r0 a multiple of 8: 8 rows' codes are unpacked to bytes
// interleaved per 4 columns (one 32-byte vector holds 4 values of each of the 8 rows), and
// vpmaddubsw multiplies them with 4 of a token's int8 values broadcast; 8-bit codes become
// 16-bit values less 128, interleaved per 2 columns, times 2 of a token's int16 values (vpmaddwd).
void gemm_int8_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y);

}  // namespace avx2
#endif

#if defined(EDGEMOE_X86)
namespace avx512 {

// The CPU has AVX-512 F, BW, VL and VNNI and the OS saves the zmm state (CPUID, XGETBV;
// read once). EDGEMOE_NO_AVX512=1 in the environment turns it off (benchmarks).
bool cpu_ok();
// The sets missing, named ("avx512f avx512vnni", ...), or "" when cpu_ok().
const char* cpu_missing();

// As avx2::qmatvec for 4-bit codes: x8 [cols] int8, x8p the same in pair_blocks' layout,
// dx [cols / 32] and xsum [cols / gs] as avx2::DecodeInput's x8, x8p, dx8, xsum8 -> y[r] for
// r in [r0, r1).
void qmatvec_q4(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const int8_t* x8p, const float* dx,
                const float* xsum, float* y);

// The same for MXFP4 (kind 5): codes looked up (vpshufb) as kE2m1x2 + kMxOffset, dotted with
// vpdpbusd; xsum [cols / 32] the block sums of the rounded x (avx2::DecodeInput's xsum8 for groups of 32).
void qmatvec_mxfp4(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const int8_t* x8p, const float* dx,
                   const float* xsum, float* y);

// As portable::gemm_int8_rows, codes of 2, 3, 4 or 8 bits, r0 a multiple of 16: panels of
// 16 rows unpacked to bytes, vpdpbusd per 4 values of a token broadcast; 8-bit codes as
// 16-bit values less 128, vpdpwssd per 2 of a token's int16 values.
void gemm_int8_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y);

}  // namespace avx512

// The same source built against SIMDe for the native tests only (no cpu_ok: it runs anywhere).
namespace avx512_simde {
void qmatvec_q4(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const int8_t* x8p, const float* dx,
                const float* xsum, float* y);
void qmatvec_mxfp4(const QMatrix& w, uint32_t r0, uint32_t r1, const int8_t* x8, const int8_t* x8p, const float* dx,
                   const float* xsum, float* y);
void gemm_int8_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y);
}  // namespace avx512_simde
#endif

#if defined(EDGEMOE_NEON)
namespace neon {

// What the CPU adds to baseline NEON, in the order each level implies the ones before.
enum class Level : int { kNeon = 0, kDotprod = 1, kI8mm = 2 };

// The level of the CPU we run on (getauxval hwcaps, read once) and its name.
Level cpu_level();
const char* level_name(Level level);  // "neon", "neon+dotprod", "neon+dotprod+i8mm"

// As portable::rows: x[t] [cols] float32, W [rows, cols] any kind, xsum[t]
// [cols / group_size] -> y[t * ystride + r] for r in [r0, r1), nt <= kTokenBlock.
void rows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, int nt, float* y,
          uint32_t ystride);

// One token's x [cols] float32 rounded per block of 32 values, as avx2::DecodeInput:
// to int8 for 4-bit codes (need8), to int16 for 2/3/8-bit ones (need16), with the
// per-block steps dx and the group sums xsum that go with each. The dot-product
// kernels read the int16 values split into bytes, x16 = 256 * xh + xl.
struct DecodeInput {
  std::vector<int16_t> x16;
  std::vector<int8_t> x8, xh, xh2;
  std::vector<uint8_t> xl, xl2;  // xh2, xl2: xh, xl of block pairs interleaved per 8 values (2/3-bit sdot)
  std::vector<int32_t> hcorr;    // per block: 32768 * sum(xh), for 8-bit codes taken as c - 128 (sdot)
  std::vector<float> dx16, dx8, xsum16, xsum8;
  std::vector<float> dx16w, dx8w;  // dx16, dx8 times 2^56 (the decode loop's scaling, kernels_neon_decode.h)
  DecodeInput(const float* x, uint32_t cols, uint32_t gs, bool need16, bool need8);
};

// Rows [r0, r1) of y = W x for one token at the CPU's level: W [rows, cols]
// group-quantized with the group size `in` was made for, or MXFP4 -> y[r] for r in [r0, r1).
void qmatvec(const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y);

// The same at a given level (tests; level <= cpu_level()). Every level forms the
// same integer dot of each block, then the same float operations (up to exact powers of
// two): the same bits.
void qmatvec_at(Level level, const QMatrix& w, uint32_t r0, uint32_t r1, const DecodeInput& in, float* y);

// Rows [r0, r1) of y = x W^T for T tokens (prefill): x [T, cols] float32, W [rows,
// cols] any kind, dequantized a few rows at a time to an f32 tile -> y [T, rows].
void gemm_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* x, int64_t T, float* y);

// As portable::byte_sum, 64 bytes a step.
uint64_t byte_sum(const uint8_t* p, uint64_t n);

}  // namespace neon
#endif

}  // namespace edgemoe::kernels
