// Small helpers shared by the native core: errors, f16/bf16 conversion, alignment, timing.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace edgemoe {

// Errors a user can act on; bindings.cpp maps them to edgemoe.errors classes.
// Invalid arguments are std::invalid_argument (Python ValueError).
struct ModelDirectoryError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct CorruptExpertError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Reading an expert failed: an I/O error, or the experts file shrank under the running model.
struct ExpertReadError : ModelDirectoryError {
  using ModelDirectoryError::ModelDirectoryError;
};
struct BudgetError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr uint64_t kPage = 4096;

inline uint64_t round_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Unaligned little-endian loads (buffers come from numpy at any offset).
inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline float load_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)
  __fp16 v;  // IEEE half on AArch64: one fcvt, exact like the bit path below
  std::memcpy(&v, &h, 2);
  return float(v);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  const uint32_t man = h & 0x3FF;
  if (exp == 0) {
    // zero or subnormal: man * 2^-24, exact in float
    const float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7F800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
#endif
}

}  // namespace edgemoe
