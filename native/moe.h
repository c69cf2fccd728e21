// One MoE layer over the expert cache: each distinct routed expert is pinned
// once for all the tokens that chose it, and the reads of the missing ones
// overlap the compute of the resident ones.
//
// The layer is two steps: every (token, slot)'s expert output (moe_forward_slots),
// then their weighted sum (combine_slots). Apart, they let some slots be computed
// elsewhere (another device) and summed with the same arithmetic.
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
// The same numbers as moe_forward_slots (every slot) followed by combine_slots.
// per_token: each expert still pinned once for all its tokens, but computed one
// token at a time with the one-token kernels, so every row gets the numbers it
// gets alone (a batch of decode steps: the multi-token kernels round x otherwise).
void moe_forward(ExpertCache& cache, uint32_t layer, const float* x, int64_t T, int64_t H, const int32_t* ids,
                 const float* weights, int64_t K, float* y, bool per_token = false);

// ys [T, K, H] float32: ys[t, k] = expert[ids[t, k]](x[t]) for every slot with
// mask[t * K + k] != 0 (mask nullptr: every slot); the other slots of ys are
// neither read nor written. An expert computes all its masked-in rows in one
// call, in slot order, as moe_forward does. weights (nullptr: none) only decide
// the low-bit fallback, as in moe_forward; without them no slot falls back.
// Every id is checked, masked out or not. Throws std::invalid_argument.
void moe_forward_slots(ExpertCache& cache, uint32_t layer, const float* x, int64_t T, int64_t H, const int32_t* ids,
                       const float* weights, int64_t K, const uint8_t* mask, float* ys, bool per_token = false);

// ys [T, K, H], weights [T, K] -> y [T, H] = sum_k weights[t, k] * ys[t, k],
// summed in slot order starting from 0.
void combine_slots(const float* ys, const float* weights, int64_t T, int64_t K, int64_t H, float* y);

}  // namespace edgemoe
