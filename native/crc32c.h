#pragma once

#include <cstddef>
#include <cstdint>

namespace edgemoe {

// CRC-32C (Castagnoli), as stored in the manifest. Chainable:
// crc32c(b, nb, crc32c(a, na)) == crc32c(a+b).
uint32_t crc32c(const void* data, size_t n, uint32_t seed = 0);

// The table-driven fallback, always compiled so tests can compare it.
uint32_t crc32c_portable(const void* data, size_t n, uint32_t seed = 0);

// "sse4.2", "armv8-crc" or "table".
const char* crc32c_impl();

}  // namespace edgemoe
