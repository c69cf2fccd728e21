#include "policy.h"

#include <cmath>
#include <stdexcept>

namespace edgemoe {

Policy policy_from_name(const std::string& name) {
  if (name == "lru") return Policy::kLru;
  if (name == "lfu") return Policy::kLfu;
  if (name == "structure") return Policy::kStructure;
  throw std::invalid_argument("unknown cache policy '" + name + "': choose 'lru', 'lfu' or 'structure'");
}

const char* policy_name(Policy p) {
  switch (p) {
    case Policy::kLru: return "lru";
    case Policy::kLfu: return "lfu";
    case Policy::kStructure: return "structure";
  }
  return "?";
}

void record_use(Usage& u, uint64_t tick, uint64_t token, double decay) {
  u.last_use = tick;
  u.uses += 1;
  // Several uses in one token (prefill) count once per call, like the simulator's per-step use.
  u.rate = u.rate * std::pow(decay, double(token - u.rate_token)) + (1.0 - decay);
  u.rate_token = token;
}

Score policy_score(Policy p, const Usage& u, uint32_t distance, uint64_t token, double decay) {
  switch (p) {
    case Policy::kLru: return {double(u.last_use), u.last_use};
    case Policy::kLfu: return {double(u.uses), u.last_use};
    case Policy::kStructure: {
      const double rate = u.rate * std::pow(decay, double(token - u.rate_token));
      return {rate / double(distance == 0 ? 1 : distance), u.last_use};
    }
  }
  return {};
}

}  // namespace edgemoe
