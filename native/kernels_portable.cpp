// The portable kernels: plain C++ loops written so the compiler can
// auto-vectorize them (NEON on aarch64). Always compiled; the driver
// (kernels.cpp) runs them when the build has no SIMD file for its CPU.
// A row's codes are decoded to f32 once per chunk of 32 and dotted with up to
// kTokenBlock tokens; the group min term uses the per-group sums of x.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "kernels_impl.h"

namespace edgemoe::kernels {

namespace {

// Unpacks one chunk of 32 codes (docs/format.md "Codes are packed per chunk").
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
void qrow_portable(const QMatrix& w, uint32_t r, const float* const* x, const float* const* xsum, int nt, float* out) {
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
    const float s = f16_to_f32(load_u16(sc + 2 * g)), m = w.min_mult * f16_to_f32(load_u16(mn + 2 * g));
    for (int t = 0; t < nt; ++t) acc[t] += s * dot[t] + m * xsum[t][g];
  }
  for (int t = 0; t < nt; ++t) out[t] = acc[t];
}

// y[t] = W[r] . x[t] for nt tokens, MXFP4 row r: per block of 32, the codes' e2m1 values
// (doubled, kE2m1x2) dotted with x, times 2^(e - 128).
void mxrow_portable(const QMatrix& w, uint32_t r, const float* const* x, int nt, float* out) {
  const uint32_t nb = w.cols / kChunk;
  const uint8_t* codes = w.data + uint64_t(r) * w.row_bytes();
  const uint8_t* sc = w.scales + uint64_t(r) * nb;
  float acc[kTokenBlock] = {0, 0, 0, 0};
  uint8_t q[kChunk];
  float wf[kChunk];
  for (uint32_t b = 0; b < nb; ++b, codes += chunk_bytes(4)) {
    unpack_chunk<4>(codes, q);
    for (uint32_t j = 0; j < kChunk; ++j) wf[j] = float(kE2m1x2[q[j]]);
    const float s = e8m0_half(sc[b]);
    for (int t = 0; t < nt; ++t) acc[t] += s * dot_portable(wf, x[t] + b * kChunk, kChunk);
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

void row_dispatch(const QMatrix& w, uint32_t r, const float* const* x, const float* const* xsum, int nt, float* out) {
  if (w.mxfp4()) return mxrow_portable(w, r, x, nt, out);
  if (!w.quantized()) return frow_portable(w, r, x, nt, out);
  switch (w.bits) {
    case 2: return qrow_portable<2>(w, r, x, xsum, nt, out);
    case 3: return qrow_portable<3>(w, r, x, xsum, nt, out);
    case 4: return qrow_portable<4>(w, r, x, xsum, nt, out);
    default: return qrow_portable<8>(w, r, x, xsum, nt, out);
  }
}

// x [cols] -> q [cols] rounded to +-levels per block of 32, dx (amax / levels) and bsum
// (dx * the block's sum of q) [cols / 32]: int8 (127) and int16 (32767) activations alike.
template <class Q>
void quantize_row(const float* x, uint32_t cols, float levels, Q* q, float* dx, float* bsum) {
  for (uint32_t b = 0; b < cols / kChunk; ++b) {
    const float* xb = x + b * kChunk;
    float amax = 0;
    for (uint32_t j = 0; j < kChunk; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float inv = amax > 0 ? levels / amax : 0.0f;
    int32_t s = 0;
    for (uint32_t j = 0; j < kChunk; ++j) {
      const auto v = int32_t(std::nearbyint(xb[j] * inv));
      q[b * kChunk + j] = Q(v);
      s += v;
    }
    dx[b] = amax / levels;
    bsum[b] = dx[b] * float(s);
  }
}

}  // namespace

namespace portable {

void rows(const QMatrix& w, uint32_t r0, uint32_t r1, const float* const* x, const float* const* xsum, int nt, float* y,
          uint32_t ystride) {
  // x[t] [cols], xsum[t] [cols / group_size] -> y[t * ystride + r], r in [r0, r1)
  for (uint32_t r = r0; r < r1; ++r) {
    float out[kTokenBlock];
    row_dispatch(w, r, x, xsum, nt, out);
    for (int t = 0; t < nt; ++t) y[uint64_t(t) * ystride + r] = out[t];
  }
}

void quantize_row_q8(const float* x, uint32_t cols, int8_t* q, float* dx, float* bsum) {
  quantize_row(x, cols, 127.0f, q, dx, bsum);
}

void quantize_row_q16(const float* x, uint32_t cols, int16_t* q, float* dx, float* bsum) {
  quantize_row(x, cols, 32767.0f, q, dx, bsum);  // |sum| <= 32 * 32767 < 2^24: bsum exact
}

void gemm_int8_rows(const QMatrix& w, uint32_t r0, uint32_t r1, const QuantizedActs& x, float* y) {
  // x: T tokens rounded [T, cols] -> y [T, rows], rows [r0, r1)
  const uint32_t cols = w.cols, nb = cols / kChunk, cpg = w.group_size / kChunk, ng = cols / w.group_size;
  std::vector<uint8_t> v(cols);
  if (w.mxfp4()) {  // the codes' doubled e2m1 values, signed, times x: no min term
    std::vector<int8_t> e(cols);
    for (uint32_t r = r0; r < r1; ++r) {
      const uint8_t* codes = w.data + uint64_t(r) * w.row_bytes();
      for (uint32_t b = 0; b < nb; ++b) unpack_chunk<4>(codes + b * chunk_bytes(4), &v[b * kChunk]);
      for (uint32_t c = 0; c < cols; ++c) e[c] = kE2m1x2[v[c]];
      const uint8_t* sc = w.scales + uint64_t(r) * nb;
      for (int64_t t = 0; t < x.T; ++t) {
        const int8_t* xq = x.q.data() + t * cols;
        const float* dx = x.dx.data() + t * nb;
        float acc = 0;
        for (uint32_t b = 0; b < nb; ++b) {
          int32_t dot = 0;
          for (uint32_t j = 0; j < kChunk; ++j) dot += int32_t(e[b * kChunk + j]) * xq[b * kChunk + j];
          acc += float(dot) * (e8m0_half(sc[b]) * dx[b]);
        }
        y[uint64_t(t) * w.rows + r] = acc;
      }
    }
    return;
  }
  for (uint32_t r = r0; r < r1; ++r) {
    const uint8_t* codes = w.data + uint64_t(r) * w.row_bytes();
    for (uint32_t b = 0; b < nb; ++b, codes += chunk_bytes(w.bits)) switch (w.bits) {
        case 2: unpack_chunk<2>(codes, &v[b * kChunk]); break;
        case 3: unpack_chunk<3>(codes, &v[b * kChunk]); break;
        case 4: unpack_chunk<4>(codes, &v[b * kChunk]); break;
        default: unpack_chunk<8>(codes, &v[b * kChunk]); break;
      }
    const uint8_t* sc = w.scales + uint64_t(r) * ng * 2;
    const uint8_t* mn = w.mins + uint64_t(r) * ng * 2;
    for (int64_t t = 0; t < x.T; ++t) {
      const int8_t* xq = x.wide ? nullptr : x.q.data() + t * cols;
      const int16_t* xw = x.wide ? x.q16.data() + t * cols : nullptr;
      const float* dx = x.dx.data() + t * nb;
      const float* bs = x.bsum.data() + t * nb;
      float acc = 0;
      for (uint32_t b = 0; b < nb; ++b) {
        int32_t dot = 0;  // |dot| <= 32 * 255 * 32767 < 2^31
        for (uint32_t j = 0; j < kChunk; ++j)
          dot += int32_t(v[b * kChunk + j]) * (xw ? int32_t(xw[b * kChunk + j]) : int32_t(xq[b * kChunk + j]));
        const float s = f16_to_f32(load_u16(sc + 2 * (b / cpg))), m = w.min_mult * f16_to_f32(load_u16(mn + 2 * (b / cpg)));
        acc += float(dot) * (s * dx[b]);
        acc += m * bs[b];
      }
      y[uint64_t(t) * w.rows + r] = acc;
    }
  }
}

uint64_t byte_sum(const uint8_t* p, uint64_t n) {
  uint64_t i = 0, acc = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    acc += v;
  }
  for (; i < n; ++i) acc += p[i];
  return acc;
}

}  // namespace portable

}  // namespace edgemoe::kernels
