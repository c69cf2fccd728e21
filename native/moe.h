// One MoE layer over the expert cache: each distinct routed expert is pinned
// once for all the tokens that chose it, and the reads of the missing ones
// overlap the compute of the resident ones.
#pragma once

#include <cstdint>

#include "cache.h"

namespace edgemoe {

// x [T, H] float32, ids int32 / weights float32 [T, K] (C-contiguous) -> y [T, H]
// float32 = sum_k weights[t, k] * expert[ids[t, k]](x[t]) for layer `layer`.
// Each distinct expert is pinned once for all its tokens; the missing ones are
// read while the resident ones compute. The sum runs in slot order, so y does not depend on what was cached.
// With the cache's fallback threshold > 0, an expert whose |weights| in the
// call are all below it is served by its low-bit copy on a miss (cache.h).
// Throws std::invalid_argument on a bad id or shape.
void moe_forward(ExpertCache& cache, uint32_t layer, const float* x, int64_t T, int64_t H, const int32_t* ids,
                 const float* weights, int64_t K, float* y);

}  // namespace edgemoe
