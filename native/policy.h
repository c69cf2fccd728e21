// Eviction policies of the expert cache as plain scoring functions: the cache
// evicts the unpinned resident expert with the lowest score first. Kept apart
// from the cache so each policy is a few lines that a test can script.
#pragma once

#include <cstdint>
#include <string>

namespace edgemoe {

// kStructure is the structure-aware policy: it scores an expert by its decayed activation
// rate divided by the MoE layers until its layer runs again (the model's layer order).
enum class Policy : uint8_t { kLru, kLfu, kStructure };

// "lru", "lfu" or "structure"; std::invalid_argument naming the choices otherwise.
Policy policy_from_name(const std::string& name);
const char* policy_name(Policy p);

// Per token, the structure policy's activation rate decays by this factor (half-life
// ~14 tokens). Bound as edgemoe._core.EVICTION_DECAY, which edgemoe/simulate.py reads.
constexpr double kEvictionDecay = 0.95;

// What the policies know about one expert. Kept across evictions.
struct Usage {
  uint64_t last_use = 0;  // cache tick of the last demand use or prefetch landing
  uint64_t uses = 0;      // demand uses since the cache was made
  double rate = 0;        // decayed uses per token, as of token `rate_token`
  uint64_t rate_token = 0;
};

// A demand use at `tick` during token `token`.
void record_use(Usage& u, uint64_t tick, uint64_t token, double decay = kEvictionDecay);

// Lower is evicted first: `value` decides, `last_use` breaks ties (older first).
struct Score {
  double value = 0;
  uint64_t last_use = 0;
  bool operator<(const Score& o) const { return value < o.value || (value == o.value && last_use < o.last_use); }
};

// `distance`: MoE layers that run, counting the expert's own, before its layer
// runs again (1 = the next layer; the layer computing now is the farthest, M).
// lru: last use. lfu: uses, ties by recency. structure: decayed rate / distance.
Score policy_score(Policy p, const Usage& u, uint32_t distance, uint64_t token, double decay = kEvictionDecay);

}  // namespace edgemoe
