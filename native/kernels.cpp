// Matmul kernels for every QMatrix kind, and the SwiGLU expert: parsing, the
// driver that splits the work over the threads, and the choice of code path.
//
// The inner loops live in one file per instruction set (kernels_impl.h lists
// them), the file chosen at build time:
//   - AVX2+FMA+F16C (kernels_avx2.cpp; x86-64 built with -march=native on a CPU
//     that has them);
//   - NEON (kernels_neon*.cpp; every aarch64 build), whose decode kernel picks
//     plain NEON, dotprod or i8mm at run time from the CPU's hwcaps;
//   - portable C++ (kernels_portable.cpp; any other CPU): plain loops written so
//     the compiler can auto-vectorize them.
// Every path streams each weight byte once per call; the group `min` term uses
// per-group sums of x: y = sum_g scale_g*dot(q_g, x_g) + min_g*sum(x_g), where
// kind 4 (symmetric) has min_g = -2^(bits-1)*scale_g, read from the scales again.
//   - decode (T=1): the SIMD paths round x per 32 values, to int8 for 4-bit codes
//     (AVX2: vpmaddubsw, as llama.cpp's Q4_0 x Q8_0; NEON: sdot or smull) and to
//     int16 for 2/3/8-bit ones (AVX2: vpmaddwd on widened codes; NEON: smlal, or
//     sdot/udot on x's two bytes), a few rows per pass, prefetching ahead;
//   - 2..11 tokens: a row's codes are decoded to f32 once for 4 tokens;
//   - prefill (T >= 12) of 4-bit and 8-bit codes (AVX2, AVX-512): x rounded per 32 values
//     once per token (int8; int16 for 8-bit codes), 8 rows (AVX-512: 16) unpacked for all
//     the tokens (matmul_int8);
//   - AVX-512 (kernels_avx512.cpp) is compiled into every x86-64 build and chosen at run
//     time (CPUID and XGETBV, once): vpdpbusd for the 4-bit decode and the int8 prefill;
//   - other prefill (T >= 12, SIMD paths): a few rows at a time are dequantized to an
//     f32 tile and a register-blocked FMA kernel runs every token over it.
// MXFP4 matrices (kind 5) take the 4-bit paths: their codes are looked up as doubled e2m1
// integers (kE2m1x2; vpshufb, tbl) and each block's integer dot is scaled by dx * 2^(e - 128).
// Threads split the output rows (ThreadPool).
#include "kernels.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "kernels_impl.h"
#include "threadpool.h"

namespace edgemoe {

using namespace kernels;

// The instruction set whose kernels the driver runs. The SIMD ones also have the
// one-token decode (DecodeInput, qmatvec) and the prefill (gemm_rows).
#if defined(EDGEMOE_AVX2)
namespace isa = kernels::avx2;
#define EDGEMOE_SIMD_DECODE 1
#elif defined(EDGEMOE_NEON)
namespace isa = kernels::neon;
#define EDGEMOE_SIMD_DECODE 1
#else
namespace isa = kernels::portable;
#endif

namespace {

// Whether this x86 CPU runs the AVX-512 kernels (kernels_avx512.cpp), decided once.
bool use_avx512() {
#if defined(EDGEMOE_X86)
  static const bool ok = avx512::cpu_ok();
  return ok;
#else
  return false;
#endif
}

}  // namespace

const char* simd_name() {
#if defined(EDGEMOE_AVX2)
  return use_avx512() ? "avx2+fma+f16c+avx512vnni" : "avx2+fma+f16c";
#elif defined(EDGEMOE_NEON)
  return neon::level_name(neon::cpu_level());
#else
  return use_avx512() ? "portable+avx512vnni" : "portable";
#endif
}

void kernels::group_sums(const float* x, uint32_t cols, uint32_t gs, float* xsum) {
  for (uint32_t g = 0; g < cols / gs; ++g) {
    const float* xg = x + uint64_t(g) * gs;
    float s = 0;
    for (uint32_t j = 0; j < gs; ++j) s += xg[j];
    xsum[g] = s;
  }
}

void kernels::pair_blocks(const int8_t* x8, uint32_t cols, int8_t* out) {
  const uint32_t nb = cols / kChunk;
  uint32_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const int8_t* a = x8 + b * kChunk;
    const int8_t* c = a + kChunk;
    int8_t* o = out + b * kChunk;
    std::memcpy(o, a, 16), std::memcpy(o + 16, c, 16), std::memcpy(o + 32, a + 16, 16), std::memcpy(o + 48, c + 16, 16);
  }
  if (b < nb) std::memcpy(out + b * kChunk, x8 + b * kChunk, kChunk);
}

namespace {

// off + rows * row_bytes <= total, without overflow (each factor may be near 2^32).
bool fits(uint64_t off, uint64_t rows, uint64_t row_bytes, uint64_t total) {
  if (off > total) return false;
  return rows == 0 || row_bytes <= (total - off) / rows;
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

// How many blocks of rows a matmul over `rows` rows and `work` multiply-adds is cut into.
int64_t decode_tasks(uint32_t rows, uint64_t work, uint32_t blocks_per_thread) {
  const int threads = ThreadPool::instance().num_threads();
  if (work < (1u << 16) || threads == 1) return 1;  // too small to be worth waking threads
  const uint32_t row_block = std::max<uint32_t>(8, rows / (blocks_per_thread * uint32_t(threads)));
  return (rows + row_block - 1) / row_block;
}

// Row blocks per thread. Several tokens: ~16, each one a long sequential weight stream, yet a
// thread the OS preempts mid-block holds the others up only a little. One token: 2, since each
// block's stream starts cold (the hardware prefetchers ramp up again), and a backbone matrix of
// a few hundred KB cut into 32 blocks spent about as long ramping up as streaming.
constexpr uint32_t kBlocksPerThread = 16;
constexpr uint32_t kOneTokenBlocksPerThread = 2;

}  // namespace

uint64_t QMatrix::row_bytes() const {
  switch (kind) {
    case kF32: return uint64_t(cols) * 4;
    case kF16:
    case kBF16: return uint64_t(cols) * 2;
    case kQuant:
    case kQuantSym:
    case kMxfp4: return uint64_t(cols) / kChunk * chunk_bytes(bits);
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
  const uint64_t codes_off = load_u32(buf + 16), scales_off = load_u32(buf + 20), mins_off = load_u32(buf + 24);
  m.total_bytes = load_u32(buf + 28);
  if (kind > kMxfp4) bad("unknown QMatrix kind " + std::to_string(kind));
  m.kind = Kind(kind);
  if (m.total_bytes > avail)
    bad("QMatrix claims " + std::to_string(m.total_bytes) + " bytes, only " + std::to_string(avail) + " available");
  const std::string shape = "[" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "]";
  if (m.quantized()) {
    if (m.bits != 2 && m.bits != 3 && m.bits != 4 && m.bits != 8)
      bad("QMatrix " + shape + " has unsupported bits " + std::to_string(m.bits));
    if ((m.group_size != 32 && m.group_size != 64 && m.group_size != 128) || m.cols % m.group_size)
      bad("QMatrix " + shape + " has group_size " + std::to_string(m.group_size) +
          " (must be 32, 64 or 128 and divide cols)");
    const uint64_t ng = uint64_t(m.rows) * (m.cols / m.group_size);
    const bool sym = m.kind == kQuantSym;
    if (!fits(codes_off, m.rows, m.row_bytes(), m.total_bytes) || scales_off + 2 * ng > m.total_bytes ||
        (!sym && mins_off + 2 * ng > m.total_bytes))
      bad("QMatrix " + shape + " sections overrun its " + std::to_string(m.total_bytes) + " bytes");
    if (sym && mins_off != 0)
      bad("symmetric QMatrix " + shape + " has a mins offset (" + std::to_string(mins_off) + "), must be 0");
    m.scales = buf + scales_off;
    m.mins = sym ? m.scales : buf + mins_off;
    m.min_mult = sym ? -float(1u << (m.bits - 1)) : 1.0f;
  } else if (m.mxfp4()) {
    if (m.bits != 4 || m.group_size != kChunk || m.cols % kChunk)
      bad("MXFP4 QMatrix " + shape + " has bits " + std::to_string(m.bits) + " and group_size " +
          std::to_string(m.group_size) + " (must be 4 and 32, and 32 must divide cols)");
    const uint64_t nb = uint64_t(m.rows) * (m.cols / kChunk);
    if (mins_off != 0) bad("MXFP4 QMatrix " + shape + " has a mins offset (" + std::to_string(mins_off) + "), must be 0");
    if (!fits(codes_off, m.rows, m.row_bytes(), m.total_bytes) || scales_off > m.total_bytes ||
        nb > m.total_bytes - scales_off)
      bad("MXFP4 QMatrix " + shape + " sections overrun its " + std::to_string(m.total_bytes) + " bytes");
    m.scales = buf + scales_off;
    // E8M0 255 is NaN: no weight of a finite model has it, so it is damage (one memchr per parse)
    if (const void* nan = std::memchr(m.scales, 0xFF, size_t(nb)))
      bad("MXFP4 QMatrix " + shape + " has a NaN scale (E8M0 255) for block " +
          std::to_string(static_cast<const uint8_t*>(nan) - m.scales));
  } else {
    const uint32_t want = m.kind == kF32 ? 32 : 16;
    if (m.bits != want) bad("float QMatrix " + shape + " has bits " + std::to_string(m.bits));
    if (!fits(codes_off, m.rows, m.row_bytes(), m.total_bytes))
      bad("QMatrix " + shape + " data overruns its " + std::to_string(m.total_bytes) + " bytes");
  }
  m.data = buf + codes_off;
  return m;
}

QMatrix float_view(const void* data, uint32_t rows, uint32_t cols, Kind kind) {
  if (kind != kF32 && kind != kF16 && kind != kBF16) bad("float_view needs a float kind");
  QMatrix m;
  m.rows = rows;
  m.cols = cols;
  m.kind = kind;
  m.bits = kind == kF32 ? 32 : 16;
  m.data = static_cast<const uint8_t*>(data);
  m.total_bytes = uint64_t(rows) * m.row_bytes();
  return m;
}

// ---------------------------------------------------------------- int8 prefill

#if defined(EDGEMOE_AVX2)
namespace int8isa = kernels::avx2;
#else
namespace int8isa = kernels::portable;  // the reference; the driver routes no matmul here
#endif

namespace {
bool int8_kernels() {
#if defined(EDGEMOE_AVX2)
  return true;
#else
  return use_avx512();
#endif
}
}  // namespace

bool prefill_int8(const QMatrix& w) {
  // 4-bit codes and MXFP4 with int8 x, 8-bit ones with int16 x (int8 x cost them about a
  // hundred times their own error: a tiny Phi-MoE's 8-bit logits left their bound). 2- and
  // 3-bit models amplify int8 x's rounding (a tiny 2-bit Mixtral's logits moved by a third),
  // so their prefill keeps float x. The wide panels have no portable build: AVX2 only.
#if defined(EDGEMOE_AVX2)
  return int8_kernels() && ((w.quantized() && (w.bits == 4 || w.bits == 8)) || w.mxfp4());
#else
  return int8_kernels() && ((w.quantized() && w.bits == 4) || w.mxfp4());
#endif
}

bool prefill_int8_expert(const QMatrix& w) { return prefill_int8(w); }

void quantize_acts(const float* x, int64_t T, uint32_t cols, QuantizedActs& out, bool wide) {
  // x [T, cols] -> q or q16 [T, cols], dx and bsum [T, cols / 32]
  if (cols % kChunk) bad("quantize_acts: cols " + std::to_string(cols) + " is not a multiple of 32");
  const uint32_t nb = cols / kChunk;
  out.T = T;
  out.cols = cols;
  out.wide = wide;
  out.q.resize(wide ? 0 : size_t(T) * cols);
  out.q16.resize(wide ? size_t(T) * cols : 0);
  out.dx.resize(size_t(T) * nb);
  out.bsum.resize(size_t(T) * nb);
  const int64_t per_task = std::max<int64_t>(1, (1 << 16) / int64_t(cols));  // ~64K values a task
  const int64_t tasks = (T + per_task - 1) / per_task;
  ThreadPool::instance().parallel_for(tasks, [&](int64_t ti) {
    for (int64_t t = ti * per_task; t < std::min(T, (ti + 1) * per_task); ++t) {
      float* dx = &out.dx[size_t(t) * nb];
      float* bs = &out.bsum[size_t(t) * nb];
      if (wide) int8isa::quantize_row_q16(x + t * cols, cols, &out.q16[size_t(t) * cols], dx, bs);
      else int8isa::quantize_row_q8(x + t * cols, cols, &out.q[size_t(t) * cols], dx, bs);
    }
  });
}

void matmul_int8(const QMatrix& w, const QuantizedActs& x, float* y) {
  // x [T, cols] rounded, W [rows, cols] codes of <= 4 bits -> y [T, rows]
  if (!w.coded() || x.cols != w.cols)
    bad("matmul_int8 needs group-quantized or MXFP4 codes and x of the matrix's " + std::to_string(w.cols) +
        " columns");
  if (x.wide != wide_acts(w))
    bad("matmul_int8: " + std::to_string(w.bits) + "-bit codes need x rounded to " + (wide_acts(w) ? "int16" : "int8") +
        " (quantize_acts with wide = " + (wide_acts(w) ? "true)" : "false)"));
  if (x.T == 0 || w.rows == 0) return;
  const uint32_t rows = w.rows;
  const bool zmm = use_avx512();
  const int64_t tasks = decode_tasks(rows, uint64_t(rows) * w.cols * uint64_t(x.T), kBlocksPerThread);
  const uint32_t row_block = uint32_t(round_up(uint64_t((rows + tasks - 1) / tasks), zmm ? 16 : 8));  // whole panels
  const int64_t n = (rows + row_block - 1) / row_block;
  ThreadPool::instance().parallel_for(n, [&](int64_t ti) {
    const uint32_t r0 = uint32_t(ti) * row_block, r1 = std::min(rows, r0 + row_block);
#if defined(EDGEMOE_X86)
    if (zmm) return avx512::gemm_int8_rows(w, r0, r1, x, y);
#endif
    int8isa::gemm_int8_rows(w, r0, r1, x, y);
  });
}

// ---------------------------------------------------------------- driver

#if defined(EDGEMOE_SIMD_DECODE)
namespace {
// Rows [r0, r1) of one token's y = W x: 4-bit codes on AVX-512 when the CPU has it.
void decode_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const isa::DecodeInput& in, float* y) {
#if defined(EDGEMOE_AVX2)
  if (w.mxfp4() && use_avx512())
    return avx512::qmatvec_mxfp4(w, r0, r1, in.x8.data(), in.x8p.data(), in.dx8.data(), in.xsum8.data(), y);
  if (w.bits == 4 && use_avx512())
    return avx512::qmatvec_q4(w, r0, r1, in.x8.data(), in.x8p.data(), in.dx8.data(), in.xsum8.data(), y);
#endif
  isa::qmatvec(w, r0, r1, in, y);
}
}  // namespace
#endif

void matmul(const QMatrix& w, const float* x, int64_t T, float* y) {
  // x [T, cols] float32, W [rows, cols] any kind -> y [T, rows] float32
  assert(T >= 0 && x != nullptr && y != nullptr);
  if (T == 0 || w.rows == 0) return;
  const uint32_t rows = w.rows, cols = w.cols;
  const bool quant = w.quantized();
  const uint32_t ng = quant ? cols / w.group_size : 0;  // MXFP4 rows need no group sums of x

  if (T >= kGemmMinTokens && prefill_int8(w)) {
    QuantizedActs qx;
    quantize_acts(x, T, cols, qx, wide_acts(w));
    matmul_int8(w, qx, y);
    return;
  }
#if defined(EDGEMOE_SIMD_DECODE)
  if (T == 1 && w.coded()) {
    const isa::DecodeInput in(x, cols, w.group_size, w.bits != 4, w.bits == 4);
    const int64_t tasks = decode_tasks(rows, uint64_t(rows) * cols, kOneTokenBlocksPerThread);
    const uint32_t row_block = uint32_t((rows + tasks - 1) / tasks);
    ThreadPool::instance().parallel_for(tasks, [&](int64_t ti) {
      const uint32_t r0 = uint32_t(ti) * row_block, r1 = std::min(rows, r0 + row_block);
      decode_rows(w, r0, r1, in, y);
    });
    return;
  }
#endif

  // Per-group sums of x for the min term: xsum [T, ng] (not needed by the tile path).
#if defined(EDGEMOE_SIMD_DECODE)
  const bool need_xsum = quant && T < kGemmMinTokens;
#else
  const bool need_xsum = quant;
#endif
  std::vector<float> xsum(need_xsum ? size_t(T) * ng : 0);
  for (int64_t t = 0; t < T && need_xsum; ++t) group_sums(x + t * cols, cols, w.group_size, &xsum[size_t(t) * ng]);

  // Tasks are blocks of rows; each task walks all token blocks so its rows'
  // weights stay in cache across tokens.
  const int64_t tasks = decode_tasks(rows, uint64_t(rows) * cols * uint64_t(T),
                                     T == 1 ? kOneTokenBlocksPerThread : kBlocksPerThread);
  const uint32_t row_block = uint32_t((rows + tasks - 1) / tasks);

#if defined(EDGEMOE_SIMD_DECODE)
  if (T >= kGemmMinTokens) {
    ThreadPool::instance().parallel_for(tasks, [&](int64_t ti) {
      const uint32_t r0 = uint32_t(ti) * row_block, r1 = std::min(rows, r0 + row_block);
      isa::gemm_rows(w, r0, r1, x, T, y);
    });
    return;
  }
#endif
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
      isa::rows(w, r0, r1, xp, sp, nt, y + t0 * rows, rows);
    }
  };
  ThreadPool::instance().parallel_for(tasks, task);
}

void matmul_many(const QMatrix* ws, size_t n, const float* x, int64_t T, float* const* ys) {
  // x [T, cols] float32, ws[i] [rows_i, cols] any kind -> ys[i] [T, rows_i] float32
#if defined(EDGEMOE_SIMD_DECODE)
  bool shared = n > 1 && T == 1;
  for (size_t i = 0; i < n && shared; ++i)
    shared = ws[i].coded() && ws[i].cols == ws[0].cols && ws[i].group_size == ws[0].group_size;
  if (shared) {
    // One token through matrices that read the same x: round x (int8 for 4-bit
    // codes, int16 for the others) and sum its groups once, then every matrix's
    // row blocks in one parallel_for.
    const uint32_t cols = ws[0].cols, gs = ws[0].group_size;
    bool need16 = false, need8 = false;
    for (size_t i = 0; i < n; ++i) (ws[i].bits == 4 ? need8 : need16) = true;
    const isa::DecodeInput in(x, cols, gs, need16, need8);
    std::vector<int64_t> first(n + 1, 0);  // task index where matrix i starts
    std::vector<uint32_t> block(n);
    for (size_t i = 0; i < n; ++i) {
      const int64_t tasks = decode_tasks(ws[i].rows, uint64_t(ws[i].rows) * cols, kOneTokenBlocksPerThread);
      block[i] = uint32_t((ws[i].rows + tasks - 1) / tasks);
      first[i + 1] = first[i] + tasks;
    }
    ThreadPool::instance().parallel_for(first[n], [&](int64_t ti) {
      const size_t i = size_t(std::upper_bound(first.begin(), first.end(), ti) - first.begin()) - 1;
      const uint32_t r0 = uint32_t(ti - first[i]) * block[i], r1 = std::min(ws[i].rows, r0 + block[i]);
      decode_rows(ws[i], r0, r1, in, ys[i]);
    });
    return;
  }
#endif
  bool int8 = n > 1 && T >= kGemmMinTokens;
  for (size_t i = 0; i < n && int8; ++i)
    int8 = prefill_int8(ws[i]) && ws[i].cols == ws[0].cols && wide_acts(ws[i]) == wide_acts(ws[0]);
  if (int8) {  // prefill: x rounded once for all of them
    QuantizedActs qx;
    quantize_acts(x, T, ws[0].cols, qx, wide_acts(ws[0]));
    for (size_t i = 0; i < n; ++i) matmul_int8(ws[i], qx, ys[i]);
    return;
  }
  for (size_t i = 0; i < n; ++i) matmul(ws[i], x, T, ys[i]);
}

uint64_t stream_read(const uint8_t* p, uint64_t n) {
  // p [n] bytes -> a checksum of them (their u64 words summed per 1 MiB block)
  constexpr uint64_t kBlock = 1 << 20;
  const int64_t tasks = int64_t((n + kBlock - 1) / kBlock);
  std::vector<uint64_t> partial(size_t(tasks), 0);
  ThreadPool::instance().parallel_for(tasks, [&](int64_t t) {
    const uint64_t len = std::min(kBlock, n - uint64_t(t) * kBlock);
    partial[size_t(t)] = isa::byte_sum(p + uint64_t(t) * kBlock, len);
  });
  uint64_t sum = 0;
  for (uint64_t v : partial) sum += v;
  return sum;
}

// ---------------------------------------------------------------- experts

Expert parse_expert(const uint8_t* blob, uint64_t size) {
  // blob [size] bytes (header, gate, up, down QMatrix; or up, down) -> views into it
  if (size < 64 || std::memcmp(blob, "EXPB", 4) != 0) bad("not an expert blob (bad magic or too short)");
  Expert e;
  e.layer = load_u32(blob + 4);
  e.expert = load_u32(blob + 8);
  const std::string who = "expert " + std::to_string(e.expert) + " of layer " + std::to_string(e.layer);
  const uint32_t n = load_u32(blob + 12);
  if (n != 3 && n != 2) bad(who + " has " + std::to_string(n) + " matrices, expected 3 (SwiGLU) or 2 (ReLU)");
  e.gated = n == 3;
  QMatrix* gated[3] = {&e.gate, &e.up, &e.down};
  QMatrix* relu[2] = {&e.up, &e.down};
  QMatrix** mats = e.gated ? gated : relu;
  for (uint32_t i = 0; i < n; ++i) {
    const uint64_t off = load_u32(blob + 16 + 4 * i), len = load_u32(blob + 28 + 4 * i);
    if (off + len > size) bad(who + ": matrix " + std::to_string(i) + " lies outside the blob");
    *mats[i] = parse_qmatrix(blob + off, len);
  }
  const uint32_t H = e.up.cols, I = e.up.rows;
  if (e.gated && (e.gate.rows != I || e.gate.cols != H))
    bad(who + ": gate/up/down shapes do not form a SwiGLU expert");
  if (e.down.rows != H || e.down.cols != I)
    bad(who + ": the down projection's shape does not match the up projection's");
  // bytes 40..63: biases (offset, size), activation, alpha, limit; all zero in a plain SwiGLU
  // expert and in a two-matrix (ReLU) one
  const uint64_t boff = load_u32(blob + 40), blen = load_u32(blob + 44);
  const uint32_t act = load_u32(blob + 48);
  if (!e.gated && (boff != 0 || blen != 0 || act != 0))
    bad(who + ": a two-matrix (ReLU) expert carries no biases and no activation");
  if (boff != 0 || blen != 0) {
    if (blen != 4 * (uint64_t(2) * I + H) || boff < 64 || boff + blen > size)
      bad(who + ": its biases are " + std::to_string(blen) + " bytes at " + std::to_string(boff) + ", expected " +
          std::to_string(4 * (uint64_t(2) * I + H)) + " inside the blob");
    e.bias = blob + boff;
  }
  if (act > kClampedSwiGLU) bad(who + " has activation " + std::to_string(act) + ", which this build does not know");
  e.act = Activation(act);
  std::memcpy(&e.alpha, blob + 52, 4);
  std::memcpy(&e.limit, blob + 56, 4);
  if (e.act == kClampedSwiGLU && !(std::isfinite(e.alpha) && std::isfinite(e.limit) && e.limit > 0))
    bad(who + ": its clamped SwiGLU needs a finite alpha and a limit > 0");
  return e;
}

namespace {

// b [n] little-endian f32 at an unaligned address -> added to each of the T rows of y [T, n]
void add_bias(const uint8_t* b, int64_t T, uint32_t n, float* y) {
  std::vector<float> v(n);
  std::memcpy(v.data(), b, size_t(n) * 4);
  for (int64_t t = 0; t < T; ++t)
    for (uint32_t i = 0; i < n; ++i) y[t * n + i] += v[i];
}

}  // namespace

void expert_forward(const Expert& e, const float* x, int64_t T, float* y) {
  // x [T, H] float32 -> g, u [T, I] -> h [T, I] -> y [T, H] float32
  const uint32_t I = e.intermediate();
  if (!e.gated) {  // x [T, H] -> h [T, I] = relu(up x) -> y [T, H]
    std::vector<float> h(size_t(T) * I);
    matmul(e.up, x, T, h.data());
    for (float& v : h) v = std::max(v, 0.0f);
    matmul(e.down, h.data(), T, y);
    return;
  }
#if defined(EDGEMOE_SIMD_DECODE)
  if (T == 1 && e.gate.coded() && e.up.coded() && e.gate.group_size == e.up.group_size) {
    // Decode: gate and up in one pass over the pool (x rounded once), each task
    // finishing its rows' silu(g) * u; the same numbers as two matmul calls.
    const uint32_t H = e.hidden(), gs = e.gate.group_size;
    const bool four = e.gate.bits == 4 || e.up.bits == 4, other = e.gate.bits != 4 || e.up.bits != 4;
    const isa::DecodeInput in(x, H, gs, other, four);
    std::vector<float> h(I), u(I);
    const int64_t tasks = decode_tasks(I, uint64_t(2) * I * H, kOneTokenBlocksPerThread);
    const uint32_t row_block = uint32_t((I + tasks - 1) / tasks);
    ThreadPool::instance().parallel_for(tasks, [&](int64_t ti) {
      const uint32_t r0 = uint32_t(ti) * row_block, r1 = std::min(I, r0 + row_block);
      decode_rows(e.gate, r0, r1, in, h.data());
      decode_rows(e.up, r0, r1, in, u.data());
      if (e.bias) {
        float bg, bu;
        for (uint32_t r = r0; r < r1; ++r) {
          std::memcpy(&bg, e.bias + 4 * size_t(r), 4);
          std::memcpy(&bu, e.bias + 4 * (size_t(I) + r), 4);
          h[r] += bg;
          u[r] += bu;
        }
      }
      for (uint32_t r = r0; r < r1; ++r) h[r] = e.glu(h[r], u[r]);
    });
    matmul(e.down, h.data(), 1, y);
    if (e.bias) add_bias(e.bias + 8 * size_t(I), 1, H, y);
    return;
  }
#endif
  std::vector<float> g(size_t(T) * I), u(size_t(T) * I);
  const bool int8 = T >= kGemmMinTokens;
  QuantizedActs qx;
  if (int8 && prefill_int8_expert(e.gate) && prefill_int8_expert(e.up) &&
      wide_acts(e.gate) == wide_acts(e.up)) {  // x rounded once for both
    quantize_acts(x, T, e.hidden(), qx, wide_acts(e.gate));
    matmul_int8(e.gate, qx, g.data());
    matmul_int8(e.up, qx, u.data());
  } else {
    matmul(e.gate, x, T, g.data());
    matmul(e.up, x, T, u.data());
  }
  if (e.bias) {  // g, u [T, I] += bg, bu
    add_bias(e.bias, T, I, g.data());
    add_bias(e.bias + 4 * size_t(I), T, I, u.data());
  }
  for (size_t i = 0; i < g.size(); ++i) g[i] = e.glu(g[i], u[i]);
  if (int8 && prefill_int8_expert(e.down)) {
    quantize_acts(g.data(), T, I, qx, wide_acts(e.down));
    matmul_int8(e.down, qx, y);
  } else {
    matmul(e.down, g.data(), T, y);
  }
  if (e.bias) add_bias(e.bias + 8 * size_t(I), T, e.hidden(), y);
}

bool round_rows_x8(const float* x, int64_t T, uint32_t H, float min_amax, int8_t* q, float* amax) {
  if (H % kChunk) return false;
  const uint32_t nb = H / kChunk;
  for (int64_t b = 0; b < T * nb; ++b) {  // what the rounding cannot undo, and each block's maximum
    float m = 0;
    for (uint32_t i = 0; i < kChunk; ++i) {
      if (!std::isfinite(x[b * kChunk + i])) return false;
      m = std::max(m, std::fabs(x[b * kChunk + i]));
    }
    if (m > 0 && m < min_amax) return false;
    amax[b] = m;
  }
  std::vector<float> dx(nb), bsum(nb);
  for (int64_t t = 0; t < T; ++t)  // the rounding every instruction set's decode and prefill is checked against
    portable::quantize_row_q8(x + t * H, H, q + t * H, dx.data(), bsum.data());
  return true;
}

void unround_rows_x8(const int8_t* q, const float* amax, int64_t T, uint32_t H, float* x) {
  const int64_t n = T * H;
  for (int64_t b = 0; b < n; b += kChunk) {
    const float m = amax[b / kChunk], step = m / 127.0f;
    for (uint32_t i = 0; i < kChunk; ++i) {
      const int8_t v = q[b + i];
      x[b + i] = v == 127 ? m : v == -127 ? -m : float(v) * step;
    }
  }
}

}  // namespace edgemoe
