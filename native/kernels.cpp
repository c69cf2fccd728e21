// Matmul kernels for every QMatrix kind, and the SwiGLU expert.
//
// Two code paths, chosen at build time (no runtime dispatch: the wheel is built
// for the device, see EDGEMOE_NATIVE_ARCH in CMakeLists.txt):
//   - AVX2+FMA+F16C (x86-64 built with -march=native on a CPU that has them);
//   - portable C++ (ARM Jetson/phone, or any other CPU): plain loops written so
//     the compiler can auto-vectorize them (NEON on aarch64).
// Decode (T=1) is memory-bound: each weight byte is read once, and the group
// `min` term uses per-group sums of x: y = sum_g scale_g*dot(q_g, x_g) + min_g*sum(x_g).
// Prefill (T>1) decodes a row once for up to kTokenBlock tokens.
#include "kernels.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "threadpool.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EDGEMOE_AVX2 1
#include <immintrin.h>
#endif

namespace edgemoe {

const char* simd_name() {
#if defined(EDGEMOE_AVX2)
  return "avx2+fma+f16c";
#else
  return "portable";
#endif
}

namespace {

constexpr int kTokenBlock = 4;  // tokens that share one decode of a weight row
constexpr uint32_t kChunk = 32;  // codes are packed per 32 values of a row

uint32_t chunk_bytes(uint32_t bits) { return bits * 4; }  // 32 values * bits / 8

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

}  // namespace

uint64_t QMatrix::row_bytes() const {
  switch (kind) {
    case kF32: return uint64_t(cols) * 4;
    case kF16:
    case kBF16: return uint64_t(cols) * 2;
    case kQuant: return uint64_t(cols) / kChunk * chunk_bytes(bits);
  }
  return 0;
}

QMatrix parse_qmatrix(const uint8_t* buf, uint64_t avail) {
  if (avail < 32) bad("QMatrix header does not fit: " + std::to_string(avail) + " bytes left");
  QMatrix m;
  m.rows = load_u32(buf);
  m.cols = load_u32(buf + 4);
  const uint8_t kind = buf[8];
  m.bits = buf[9];
  m.group_size = load_u32(buf + 12);
  const uint64_t codes_off = load_u32(buf + 16), scales_off = load_u32(buf + 20),
                 mins_off = load_u32(buf + 24);
  m.total_bytes = load_u32(buf + 28);
  if (kind > 3) bad("unknown QMatrix kind " + std::to_string(kind));
  m.kind = Kind(kind);
  if (m.total_bytes > avail)
    bad("QMatrix claims " + std::to_string(m.total_bytes) + " bytes, only " + std::to_string(avail) + " available");
  const std::string shape = "[" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "]";
  if (m.kind == kQuant) {
    if (m.bits != 2 && m.bits != 3 && m.bits != 4 && m.bits != 8)
      bad("QMatrix " + shape + " has unsupported bits " + std::to_string(m.bits));
    if (m.group_size == 0 || m.group_size % kChunk || m.cols % m.group_size)
      bad("QMatrix " + shape + " has group_size " + std::to_string(m.group_size) +
          " (must be a multiple of 32 dividing cols)");
    const uint64_t ng = uint64_t(m.rows) * (m.cols / m.group_size);
    if (codes_off + uint64_t(m.rows) * m.row_bytes() > m.total_bytes || scales_off + 2 * ng > m.total_bytes ||
        mins_off + 2 * ng > m.total_bytes)
      bad("QMatrix " + shape + " sections overrun its " + std::to_string(m.total_bytes) + " bytes");
    m.scales = buf + scales_off;
    m.mins = buf + mins_off;
  } else {
    const uint32_t want = m.kind == kF32 ? 32 : 16;
    if (m.bits != want) bad("float QMatrix " + shape + " has bits " + std::to_string(m.bits));
    if (codes_off + uint64_t(m.rows) * m.row_bytes() > m.total_bytes)
      bad("QMatrix " + shape + " data overruns its " + std::to_string(m.total_bytes) + " bytes");
  }
  m.data = buf + codes_off;
  return m;
}

QMatrix float_view(const void* data, uint32_t rows, uint32_t cols, Kind kind) {
  if (kind == kQuant) bad("float_view needs a float kind");
  QMatrix m;
  m.rows = rows;
  m.cols = cols;
  m.kind = kind;
  m.bits = kind == kF32 ? 32 : 16;
  m.data = static_cast<const uint8_t*>(data);
  m.total_bytes = uint64_t(rows) * m.row_bytes();
  return m;
}

// ---------------------------------------------------------------- portable path

namespace {

// Unpacks one chunk of 32 codes (FORMAT.md "Codes are packed per chunk").
template <int BITS>
inline void unpack_chunk(const uint8_t* p, uint8_t* v) {
  if constexpr (BITS == 8) {
    for (int j = 0; j < 32; ++j) v[j] = p[j];
  } else if constexpr (BITS == 4) {
    for (int j = 0; j < 16; ++j) {
      v[j] = p[j] & 0xF;
      v[j + 16] = uint8_t(p[j] >> 4);
    }
  } else if constexpr (BITS == 2) {
    for (int j = 0; j < 8; ++j) {
      v[j] = p[j] & 3;
      v[j + 8] = (p[j] >> 2) & 3;
      v[j + 16] = (p[j] >> 4) & 3;
      v[j + 24] = uint8_t(p[j] >> 6);
    }
  } else {
    static_assert(BITS == 3, "bits");
    unpack_chunk<2>(p, v);
    const uint32_t hi = load_u32(p + 8);
    for (int j = 0; j < 32; ++j) v[j] = uint8_t(v[j] | (((hi >> j) & 1u) << 2));
  }
}

inline float dot_portable(const float* a, const float* b, uint32_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[t] = W[r] . x[t] for nt tokens, group-quantized row r.
// xsum: [nt][ngroups] per-group sums of x.
template <int BITS>
void qrow_portable(const QMatrix& w, uint32_t r, const float* const* x, const float* const* xsum, int nt,
                   float* out) {
  const uint32_t gs = w.group_size, ng = w.cols / gs, cpg = gs / kChunk;
  const uint8_t* codes = w.data + uint64_t(r) * w.row_bytes();
  const uint8_t* sc = w.scales + uint64_t(r) * ng * 2;
  const uint8_t* mn = w.mins + uint64_t(r) * ng * 2;
  float acc[kTokenBlock] = {0, 0, 0, 0};
  uint8_t q[kChunk];
  float wf[kChunk];
  for (uint32_t g = 0; g < ng; ++g) {
    float dot[kTokenBlock] = {0, 0, 0, 0};
    for (uint32_t c = 0; c < cpg; ++c) {
      unpack_chunk<BITS>(codes, q);
      codes += chunk_bytes(BITS);
      for (uint32_t j = 0; j < kChunk; ++j) wf[j] = float(q[j]);
      const uint32_t col = g * gs + c * kChunk;
      for (int t = 0; t < nt; ++t) dot[t] += dot_portable(wf, x[t] + col, kChunk);
    }
    const float s = f16_to_f32(load_u16(sc + 2 * g)), m = f16_to_f32(load_u16(mn + 2 * g));
    for (int t = 0; t < nt; ++t) acc[t] += s * dot[t] + m * xsum[t][g];
  }
  for (int t = 0; t < nt; ++t) out[t] = acc[t];
}

// Float rows: converted to f32 in pieces of kPiece columns, then dotted per token.
void frow_portable(const QMatrix& w, uint32_t r, const float* const* x, int nt, float* out) {
  constexpr uint32_t kPiece = 256;
  const uint8_t* row = w.data + uint64_t(r) * w.row_bytes();
  float acc[kTokenBlock] = {0, 0, 0, 0};
  float buf[kPiece];
  for (uint32_t c0 = 0; c0 < w.cols; c0 += kPiece) {
    const uint32_t n = std::min(kPiece, w.cols - c0);
    for (uint32_t j = 0; j < n; ++j) {
      const uint32_t c = c0 + j;
      switch (w.kind) {
        case kF32: buf[j] = load_f32(row + 4 * uint64_t(c)); break;
        case kF16: buf[j] = f16_to_f32(load_u16(row + 2 * uint64_t(c))); break;
        default: buf[j] = bf16_to_f32(load_u16(row + 2 * uint64_t(c))); break;
      }
    }
    for (int t = 0; t < nt; ++t) acc[t] += dot_portable(buf, x[t] + c0, n);
  }
  for (int t = 0; t < nt; ++t) out[t] = acc[t];
}

void row_dispatch(const QMatrix& w, uint32_t r, const float* const* x, const float* const* xsum, int nt,
                  float* out) {
  if (w.kind != kQuant) return frow_portable(w, r, x, nt, out);
  switch (w.bits) {
    case 2: return qrow_portable<2>(w, r, x, xsum, nt, out);
    case 3: return qrow_portable<3>(w, r, x, xsum, nt, out);
    case 4: return qrow_portable<4>(w, r, x, xsum, nt, out);
    default: return qrow_portable<8>(w, r, x, xsum, nt, out);
  }
}

}  // namespace

// ---------------------------------------------------------------- driver

void matmul(const QMatrix& w, const float* x, int64_t T, float* y) {
  // x [T, cols] -> y [T, rows]
  assert(T >= 0 && x != nullptr && y != nullptr);
  if (T == 0 || w.rows == 0) return;
  const uint32_t rows = w.rows, cols = w.cols;
  const bool quant = w.kind == kQuant;
  const uint32_t ng = quant ? cols / w.group_size : 0;

  // Per-group sums of x for the min term: xsum [T, ng].
  std::vector<float> xsum(quant ? size_t(T) * ng : 0);
  for (int64_t t = 0; t < T && quant; ++t)
    for (uint32_t g = 0; g < ng; ++g) {
      const float* xg = x + t * cols + uint64_t(g) * w.group_size;
      float s = 0;
      for (uint32_t j = 0; j < w.group_size; ++j) s += xg[j];
      xsum[size_t(t) * ng + g] = s;
    }

  // Tasks are blocks of rows; each task walks all token blocks so its rows'
  // weights stay in cache across tokens.
  const uint64_t work = uint64_t(rows) * cols * uint64_t(T);
  const int threads = ThreadPool::instance().num_threads();
  uint32_t row_block = 16;
  if (work < (1u << 16) || threads == 1) row_block = rows;  // too small to be worth waking threads
  const int64_t tasks = (rows + row_block - 1) / row_block;

  auto task = [&](int64_t ti) {
    const uint32_t r0 = uint32_t(ti) * row_block, r1 = std::min(rows, r0 + row_block);
    for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock) {
      const int nt = int(std::min<int64_t>(kTokenBlock, T - t0));
      const float* xp[kTokenBlock];
      const float* sp[kTokenBlock];
      for (int t = 0; t < nt; ++t) {
        xp[t] = x + (t0 + t) * cols;
        sp[t] = quant ? xsum.data() + (t0 + t) * ng : nullptr;
      }
      for (uint32_t r = r0; r < r1; ++r) {
        float out[kTokenBlock];
        row_dispatch(w, r, xp, sp, nt, out);
        for (int t = 0; t < nt; ++t) y[(t0 + t) * rows + r] = out[t];
      }
    }
  };
  ThreadPool::instance().parallel_for(tasks, task);
}

// ---------------------------------------------------------------- experts

Expert parse_expert(const uint8_t* blob, uint64_t size) {
  if (size < 64 || std::memcmp(blob, "EXPB", 4) != 0) bad("not an expert blob (bad magic or too short)");
  Expert e;
  e.layer = load_u32(blob + 4);
  e.expert = load_u32(blob + 8);
  const std::string who = "expert " + std::to_string(e.expert) + " of layer " + std::to_string(e.layer);
  if (load_u32(blob + 12) != 3) bad(who + " has " + std::to_string(load_u32(blob + 12)) + " matrices, expected 3");
  QMatrix* mats[3] = {&e.gate, &e.up, &e.down};
  for (int i = 0; i < 3; ++i) {
    const uint64_t off = load_u32(blob + 16 + 4 * i), len = load_u32(blob + 28 + 4 * i);
    if (off + len > size) bad(who + ": matrix " + std::to_string(i) + " lies outside the blob");
    *mats[i] = parse_qmatrix(blob + off, len);
  }
  const uint32_t H = e.gate.cols, I = e.gate.rows;
  if (e.up.rows != I || e.up.cols != H || e.down.rows != H || e.down.cols != I)
    bad(who + ": gate/up/down shapes do not form a SwiGLU expert");
  return e;
}

void expert_forward(const Expert& e, const float* x, int64_t T, float* y) {
  // x [T, H] -> g, u [T, I] -> h [T, I] -> y [T, H]
  const uint32_t I = e.intermediate();
  std::vector<float> g(size_t(T) * I), u(size_t(T) * I);
  matmul(e.gate, x, T, g.data());
  matmul(e.up, x, T, u.data());
  for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  matmul(e.down, g.data(), T, y);
}

}  // namespace edgemoe
