// CRC-32C: the CPU's crc32 instruction when the build targets it (SSE4.2 on
// x86-64, the CRC extension on ARMv8), else slicing-by-8 tables.
#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__SSE4_2__)
#include <nmmintrin.h>
#elif defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#endif

namespace edgemoe {

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1) ? kPoly : 0);
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};
const Tables& tables() {
  static const Tables tb;
  return tb;
}

}  // namespace

const char* crc32c_impl() {
#if defined(__SSE4_2__)
  return "sse4.2";
#elif defined(__ARM_FEATURE_CRC32)
  return "armv8-crc";
#else
  return "table";
#endif
}

#if defined(__SSE4_2__)
namespace {

// The crc32 instruction has a latency of 3 cycles and a throughput of 1, so
// three independent streams over consecutive blocks of kStream bytes run ~3x
// faster than one. Their CRCs are joined with shift(c) = the CRC register after
// feeding kStream zero bytes into register c, a linear map kept as byte tables.
constexpr size_t kStream = 4096;

struct Shift {
  uint32_t t[4][256];
  Shift() {
    uint32_t basis[32];
    for (int i = 0; i < 32; ++i) {
      uint64_t c = uint32_t(1) << i;
      for (size_t k = 0; k < kStream; k += 8) c = _mm_crc32_u64(c, 0);
      basis[i] = uint32_t(c);
    }
    for (int b = 0; b < 4; ++b)
      for (uint32_t v = 0; v < 256; ++v) {
        uint32_t r = 0;
        for (int i = 0; i < 8; ++i)
          if (v >> i & 1) r ^= basis[8 * b + i];
        t[b][v] = r;
      }
  }
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
  }
};

const Shift& shift() {
  static const Shift s;
  return s;
}

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

}  // namespace
#endif

uint32_t crc32c(const void* data, size_t n, uint32_t seed) {
#if defined(__SSE4_2__)
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t c = ~seed;
  if (n >= 3 * kStream) {
    const Shift& sh = shift();
    for (; n >= 3 * kStream; n -= 3 * kStream, p += 3 * kStream) {
      uint64_t c1 = 0, c2 = 0;
      for (size_t i = 0; i < kStream; i += 8) {
        c = _mm_crc32_u64(c, load64(p + i));
        c1 = _mm_crc32_u64(c1, load64(p + kStream + i));
        c2 = _mm_crc32_u64(c2, load64(p + 2 * kStream + i));
      }
      c = sh(sh(uint32_t(c)) ^ uint32_t(c1)) ^ uint32_t(c2);
    }
  }
  for (; n >= 8; n -= 8, p += 8) c = _mm_crc32_u64(c, load64(p));
  auto c32 = uint32_t(c);
  for (; n > 0; --n, ++p) c32 = _mm_crc32_u8(c32, *p);
  return ~c32;
#elif defined(__ARM_FEATURE_CRC32)
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~seed;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = __crc32cd(c, v);
  }
  for (; n > 0; --n, ++p) c = __crc32cb(c, *p);
  return ~c;
#else
  return crc32c_portable(data, n, seed);
#endif
}

uint32_t crc32c_portable(const void* data, size_t n, uint32_t seed) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~seed;
  const auto& t = tables().t;
  for (; n >= 8; n -= 8, p += 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^ t[3][hi & 0xFF] ^
        t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
  }
  for (; n > 0; --n, ++p) c = (c >> 8) ^ t[0][(c ^ *p) & 0xFF];
  return ~c;
}

}  // namespace edgemoe
