// Matmul kernels over docs/format.md's QMatrix layout, and the SwiGLU expert.
// kernels.cpp drives them; the inner loops are per instruction set (kernels_impl.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace edgemoe {

// The kernels' instruction sets: the build's ("avx2+fma+f16c", "portable", "neon..."), and
// "+avx512vnni" when this x86 CPU has AVX-512 F/BW/VL/VNNI (chosen at run time).
const char* simd_name();

// kQuant: w = scale * q + min; kQuantSym: w = scale * (q - 2^(bits-1)), no mins stored;
// kMxfp4: OCP MXFP4, w = e2m1(q) * 2^(e - 127) per block of 32 (one E8M0 byte e per block).
enum Kind : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kQuant = 3, kQuantSym = 4, kMxfp4 = 5 };

// A parsed, validated view of one QMatrix (W[rows, cols], y = W x). No ownership.
struct QMatrix {
  uint32_t rows = 0, cols = 0;
  Kind kind = kF32;
  uint32_t bits = 32;
  uint32_t group_size = 0;          // kinds 3 and 4; 32 for kind 5
  const uint8_t* data = nullptr;    // codes (kinds 3, 4, 5) or float data, row-major
  // f16 [rows, cols/group_size] (kinds 3 and 4), or E8M0 bytes [rows, cols/32] (kind 5)
  const uint8_t* scales = nullptr;
  // A group's min is min_mult * the f16 at mins: kind 3 stores them (min_mult 1); kind 4
  // reads the scales again (mins == scales, min_mult -2^(bits-1)), no extra bytes.
  const uint8_t* mins = nullptr;  // f16 [rows, cols/group_size], kinds 3 and 4 only
  float min_mult = 1.0f;
  uint64_t total_bytes = 0;

  bool quantized() const { return kind == kQuant || kind == kQuantSym; }  // group-quantized, f16 scales
  bool mxfp4() const { return kind == kMxfp4; }
  bool coded() const { return quantized() || mxfp4(); }  // codes per block of 32: the int8-x decode
  uint64_t row_bytes() const;  // bytes of one row of codes/data
};

// buf [avail] bytes (a QMatrix header, then its sections) -> a view into buf. Throws
// std::invalid_argument when the header is inconsistent or overruns avail.
QMatrix parse_qmatrix(const uint8_t* buf, uint64_t avail);

// data [rows, cols] of `kind` (f32, f16 or bf16), held elsewhere (e.g. a numpy array)
// -> a view of it, no copy.
QMatrix float_view(const void* data, uint32_t rows, uint32_t cols, Kind kind);

// x [T, cols] float32, W [rows, cols] any kind -> y [T, rows] float32 = x @ W^T.
// x and y are C-contiguous; y is overwritten.
void matmul(const QMatrix& w, const float* x, int64_t T, float* y);

// x [T, cols] float32, ws[i] [rows_i, cols] any kind -> ys[i] [T, rows_i] float32 = x @ ws[i]^T
// for n matrices of the same cols (q, k and v of one layer): for one token, x is prepared
// once and one parallel_for covers them all. The same numbers as n matmul() calls.
void matmul_many(const QMatrix* ws, size_t n, const float* x, int64_t T, float* const* ys);

// T tokens' activations rounded for the integer prefill kernels, per block of 32 values: to
// int8 as the one-token decode rounds 4-bit codes' x, or (wide) to int16 for 8-bit codes, whose
// own error int8 x would exceed many times over: x ~= q * dx per block, bsum the block's sum of
// that rounded x (dx * sum q) for the group min terms.
struct QuantizedActs {
  int64_t T = 0;
  uint32_t cols = 0;          // a multiple of 32
  bool wide = false;          // q16 holds the values (|q| <= 32767), else q (|q| <= 127)
  std::vector<int8_t> q;      // [T, cols], or empty when wide
  std::vector<int16_t> q16;   // [T, cols] when wide, else empty
  std::vector<float> dx;      // [T, cols / 32]
  std::vector<float> bsum;    // [T, cols / 32]
  uint32_t blocks() const { return cols / 32; }
};

// x [T, cols] float32 (cols % 32 == 0) -> out, rounded per block of 32 values to int8, or to
// int16 when wide (threads split tokens).
void quantize_acts(const float* x, int64_t T, uint32_t cols, QuantizedActs& out, bool wide = false);

// Whether matmul_int8 wants W's x rounded to int16 (wide): 8-bit codes.
inline bool wide_acts(const QMatrix& w) { return w.bits == 8; }

// Whether this build, on this CPU, multiplies W with integer activations for several tokens
// at once in matmul (matmul_int8 below): 4-bit group-quantized codes (int8 x) and 8-bit ones
// (int16 x), on the AVX2 and AVX-512 paths.
bool prefill_int8(const QMatrix& w);

// The same for an expert's matrices in expert_forward (the same choice as prefill_int8).
bool prefill_int8_expert(const QMatrix& w);

// x [T, cols] rounded (quantize_acts, wide exactly when wide_acts(w)), W [rows, cols] with codes
// of 2, 3, 4 or 8 bits -> y [T, rows] float32 = x @ W^T: W's rows are unpacked a panel at a time
// (8 rows on AVX2, 16 on AVX-512; bytes, or 16-bit values for 8-bit codes) and every token runs
// over them. Throws std::invalid_argument when x's width does not match W's codes.
void matmul_int8(const QMatrix& w, const QuantizedActs& x, float* y);

// How an expert joins its gate and up projections (docs/format.md, the blob header's activation).
// kSwiGLU: silu(g) * u. kClampedSwiGLU (gpt-oss): g' = min(g, limit), u' = clamp(u, -limit, limit),
// (u' + 1) * g' * sigmoid(alpha * g'). A two-matrix expert (Switch Transformers' wi, wo) has no
// gate: down(relu(up x)).
enum Activation : uint32_t { kSwiGLU = 0, kClampedSwiGLU = 1 };

// One expert blob: gate [I, H], up [I, H], down [H, I] (a gated expert) and optionally biases,
// or, with two matrices, up [I, H] and down [H, I] of a ReLU expert; gate is then empty.
struct Expert {
  uint32_t layer = 0, expert = 0;
  QMatrix gate, up, down;
  bool gated = true;  // false: down(relu(up x))
  const uint8_t* bias = nullptr;  // f32 [I] gate, [I] up, [H] down (little-endian, unaligned), or none
  Activation act = kSwiGLU;
  float alpha = 1.0f, limit = 0.0f;  // kClampedSwiGLU only
  uint32_t hidden() const { return up.cols; }
  uint32_t intermediate() const { return up.rows; }
  // h = act(g, u) for one intermediate value of a gated expert
  float glu(float g, float u) const {
    if (act == kSwiGLU) return g / (1.0f + std::exp(-g)) * u;
    g = std::min(g, limit);
    u = std::max(-limit, std::min(u, limit));
    return (u + 1.0f) * (g / (1.0f + std::exp(-alpha * g)));
  }
};

// blob [size] bytes -> an Expert viewing it. Checks the magic, the 3 (gated) or 2 (ReLU)
// matrices inside it and their shapes, the biases' size and the activation; throws
// std::invalid_argument.
Expert parse_expert(const uint8_t* blob, uint64_t size);

// x [T, H] float32 -> y [T, H] float32 = down act(gate x + bg, up x + bu) + bd, the expert's
// gate, up [I, H] and down [H, I] of any kind, the biases 0 when the blob has none;
// down(relu(up x)) for a two-matrix expert.
void expert_forward(const Expert& e, const float* x, int64_t T, float* y);

// x [T, H] float32 -> q [T, H] int8 and amax [T, H / 32]: each block of 32 values rounded as
// the one-token decode kernels (AVX2, NEON) round a 4-bit matrix's input: step amax / 127,
// q = x * (127 / amax) to nearest, ties to even. False (outputs unspecified) where that cannot
// be undone exactly: H not a multiple of 32, a value that is not finite, or a block maximum
// below min_amax.
bool round_rows_x8(const float* x, int64_t T, uint32_t H, float min_amax, int8_t* q, float* amax);

// round_rows_x8's (q, amax) -> x [T, H] that those kernels round to the same q and step again:
// q * (amax / 127), and exactly +-amax where |q| is 127, so each block's maximum is amax.
void unround_rows_x8(const int8_t* q, const float* amax, int64_t T, uint32_t H, float* x);

// p [n] bytes -> a checksum of them, every byte read once on the kernel threads:
// the memory bandwidth the matmul kernels can hope for (benchmarks).
uint64_t stream_read(const uint8_t* p, uint64_t n);

}  // namespace edgemoe
