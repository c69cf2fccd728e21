// One decode token through one MoE decoder layer in a single native call: the
// same ops, in the same order and with the same arithmetic, as the Python
// path in edgemoe/models/base.py (DecoderLM.block), whose per-op calls cost a
// small model more than its matmuls do.
#pragma once

#include <cstdint>

#include "cache.h"
#include "kernels.h"

namespace edgemoe {

// A layer's weights, viewed (the caller keeps them alive). Supported: no biases,
// no q/k norms, no qkv clipping, no shared expert, softmax + top-k routing.
struct DecodeLayer {
  uint32_t layer = 0;  // index into the experts file
  uint32_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, experts = 0, top_k = 0;
  int64_t window = 0;  // sliding window (0: none)
  float eps = 0;
  bool normalize = true;  // renormalize the top-k weights
  QMatrix q, k, v, o, router;
  const float* attn_norm = nullptr;  // [hidden]
  const float* ffn_norm = nullptr;   // [hidden]
  const float* inv_freq = nullptr;   // [head_dim / 2]
};

// One layer's KV cache: keys and values [kv_heads, capacity, head_dim] each (KVLayout in
// dense.h), float32, or float16 when half.
struct LayerKV {
  void* k = nullptr;
  void* v = nullptr;
  int64_t capacity = 0;
  bool half = false;
};

// Checks the shapes of a DecodeLayer against each other; std::invalid_argument.
void check_decode_layer(const DecodeLayer& L);

// decode_layer's part before the experts: h [hidden] -> h + attention, in place (kv as
// below); then x [hidden] = the MoE's input (the normed h) and the token's top_k experts,
// ids [top_k] and weights w [top_k], for a caller that computes them elsewhere (a cluster).
void decode_attend(const DecodeLayer& L, float* h, const LayerKV& kv, int64_t pos, float* x, int32_t* ids, float* w);

// h [hidden] -> h + attention + MoE, in place, for the token at position pos < kv.capacity:
// the token's key and value are written at position pos of the layer's KV cache (rounded to
// float16 in a half cache), positions 0..pos are attended to.
void decode_layer(const DecodeLayer& L, ExpertCache& cache, float* h, const LayerKV& kv, int64_t pos);

}  // namespace edgemoe
