// The small dense ops of a decoder layer around the matmuls: RMSNorm, RoPE,
// causal grouped-query attention over the KV cache, softmax + top-k routing.
// In numpy each is a chain of ~10 array ops costing tens of microseconds per
// decode token and layer; here each is one pass over a few KB.
#pragma once

#include <cstdint>

namespace edgemoe {

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for rows x n values. y may be x.
void rms_norm(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* y);

// In place, the rotate-half convention (transformers): x [T, heads, hd] at positions
// start..start+T-1; inv_freq [hd/2]. For each pair (i, i+hd/2) with f = pos * inv_freq[i]:
// (x1, x2) -> (x1 cos f - x2 sin f, x2 cos f + x1 sin f).
void rope(float* x, int64_t T, int64_t heads, int64_t hd, int64_t start, const float* inv_freq);

// Where a KV cache's rows are: key (or value) j of kv head g starts at base + j * pos +
// g * head floats, its hd floats contiguous. pos == 0: [S, kv_heads, hd] packed (pos =
// kv_heads * hd, head = hd). The decode cache is kv head major, [kv_heads, capacity, hd]
// (pos = hd, head = capacity * hd): each head's keys one contiguous stream.
// half: the keys and values are IEEE float16 (uint16_t bits), else float32.
struct KVLayout {
  int64_t pos = 0, head = 0;
  bool half = false;
};

// IEEE float16 <-> float32: to half rounds to nearest, ties to even (as numpy's astype
// does), overflowing to infinity; NaN stays NaN.
uint16_t float_to_half(float x);
float half_to_float(uint16_t h);
// y[i] = float_to_half(x[i]) over n values.
void floats_to_halves(const float* x, int64_t n, uint16_t* y);

// Causal grouped-query attention of T new queries q [T, heads, hd] at positions
// start..start+T-1 against k, v [S, kv_heads, hd] (S = start + T) laid out as `kv` says;
// query head h reads kv head h / (heads / kv_heads). window > 0: key j is visible from
// query i only if i - window < j <= i. out [T, heads * hd]. sinks [heads] (gpt-oss's
// attention sinks, or nullptr): one more logit per head in each softmax's denominator,
// attending to nothing.
void attention(const float* q, int64_t T, int64_t heads, int64_t hd, const void* k, const void* v, int64_t S,
               int64_t kv_heads, int64_t start, int64_t window, float* out, const float* sinks = nullptr,
               KVLayout kv = {});

// Per row of logits [T, E]: softmax, the K largest probabilities (largest first, the
// lower expert id first on a tie), renormalized to sum 1 when normalize.
// ids [T, K], weights [T, K].
void softmax_topk(const float* logits, int64_t T, int64_t E, int64_t K, bool normalize, int32_t* ids, float* weights);

// The next token drawn from logits [n]: z = logits / temperature; with top_k > 0 only
// the top_k largest z stay (ties at the cut: the lower token id); w = e^(z - max z) in
// float (the attention's exp, relative error < 3e-7); with top_p < 1 only the nucleus
// stays: tokens by descending w (ties by token id) up to the first whose running share
// of the summed w (in double) reaches top_p. Then, over the kept tokens in token-id
// order with running sums c, the first whose c exceeds u * c_last. The nucleus needs no
// sort of the vocabulary: a histogram of w by its float's top bits gives the mass above
// each bucket, and only the bucket the cut falls in is sorted.
// temperature > 0, top_k >= 0, 0 < top_p <= 1, u in [0, 1), n > 0; a logit of -inf
// (a masked token) is never drawn, NaN and +inf are refused.
int64_t sample_logits(const float* logits, int64_t n, double temperature, int64_t top_k, double top_p, double u);

}  // namespace edgemoe
