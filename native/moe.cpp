#include "moe.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "threadpool.h"

namespace edgemoe {

namespace {

// A pinned blob's three matrices; a blob whose layout does not parse, or whose hidden
// size is not the model's, comes from a damaged file (or one read with verify off).
Expert parse_blob(const ExpertCache& cache, const PinnedExpert& pin, uint32_t layer, int64_t H) {
  const std::string who = "expert " + std::to_string(pin.expert()) + " of layer " + std::to_string(layer) +
                          (pin.low_bit() ? " (low-bit copy)" : "");
  const std::string file = pin.low_bit() && cache.fallback_store() ? cache.fallback_store()->path() : cache.store().path();
  Expert ex;
  try {
    ex = parse_expert(pin.blob().data, pin.blob().size);
  } catch (const std::invalid_argument& err) {
    throw CorruptExpertError(who + " in " + file + " is not a valid expert blob (" + err.what() +
                             "): the file is damaged, convert the model again");
  }
  if (int64_t(ex.hidden()) != H)
    throw CorruptExpertError(who + " in " + file + " has hidden size " + std::to_string(ex.hidden()) +
                             ", the model " + std::to_string(H) + ": the file is damaged, convert the model again");
  return ex;
}

// One token whose routed experts are all resident, with a pool of several threads: each
// expert whole on one thread (gate, up and down streamed by it alone, the nested matmuls
// run inline), one hand-over per layer instead of one per matrix and expert. The same
// numbers as the loop below: a row's dot product does not depend on the thread that takes
// it. Declines (false, nothing done) when whole experts would load one thread more than a
// quarter above an even share (three experts on two threads, a mix of bitwidths): those
// keep the row split.
bool one_token_experts_in_parallel(ExpertCache& cache, LayerRequest& req, uint32_t layer, const float* x, int64_t H,
                                   const std::vector<std::vector<int64_t>>& slots, float* ys) {
  ThreadPool& pool = ThreadPool::instance();
  if (pool.num_threads() < 2) return false;
  std::vector<uint64_t> sizes;
  for (uint32_t e = 0; e < uint32_t(slots.size()); ++e)
    if (!slots[e].empty()) sizes.push_back(cache.store().blob_size(layer, e));
  if (!pool.whole_jobs_even(sizes)) return false;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<PinnedExpert> pins;
  std::vector<Expert> experts;
  while (!req.done()) {
    pins.push_back(req.next());  // resident: no wait
    experts.push_back(parse_blob(cache, pins.back(), layer, H));
  }
  std::vector<std::exception_ptr> errors(pins.size());
  pool.parallel_for(int64_t(pins.size()), [&](int64_t i) {
    const auto& s = slots[pins[size_t(i)].expert()];
    float* y = ys + s[0] * H;
    try {
      expert_forward(experts[size_t(i)], x, 1, y);
    } catch (...) {
      errors[size_t(i)] = std::current_exception();
    }
    for (size_t j = 1; j < s.size(); ++j) std::memcpy(ys + s[j] * H, y, size_t(H) * 4);
  });
  for (auto& pin : pins) pin.release();
  for (const auto& err : errors)
    if (err) std::rethrow_exception(err);
  cache.record_compute(layer, seconds_since(t0));
  return true;
}

}  // namespace

void moe_forward_slots(ExpertCache& cache, uint32_t layer, const float* x, int64_t T, int64_t H, const int32_t* ids,
                       const float* weights, int64_t K, const uint8_t* mask, float* ys, bool per_token) {
  // x [T, H], ids/weights/mask [T, K] -> ys [T, K, H] (masked-in slots only)
  const ExpertStore& store = cache.store();
  if (layer >= store.num_layers())
    throw std::invalid_argument("layer " + std::to_string(layer) + " is out of range: the experts file has " +
                                std::to_string(store.num_layers()) + " layers");
  const uint32_t E = store.num_experts();
  // Which (token, slot) pairs each expert serves, in routing order.
  std::vector<std::vector<int64_t>> slots(E);
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t e = ids[i];
    if (e < 0 || uint32_t(e) >= E || store.blob_size(layer, uint32_t(e)) == 0)
      throw std::invalid_argument("expert id " + std::to_string(e) + " (token " + std::to_string(i / K) + ", slot " +
                                  std::to_string(i % K) + ") is out of range: layer " + std::to_string(layer) +
                                  " has experts 0.." + std::to_string(E - 1) +
                                  (e >= 0 && uint32_t(e) < E ? " but not this one" : ""));
    if (!mask || mask[i]) slots[size_t(e)].push_back(i);
  }
  std::vector<uint32_t> needed;
  for (uint32_t e = 0; e < E; ++e)
    if (!slots[e].empty()) needed.push_back(e);

  // Low-bit fallback: an expert may take its low-bit copy on a miss when every
  // token of the call gives it less than the threshold (prefill: all of them).
  std::vector<uint8_t> low_ok;
  const float threshold = cache.fallback_threshold();
  if (threshold > 0 && weights) {
    low_ok.reserve(needed.size());
    for (uint32_t e : needed) {
      float top = 0;  // ffn_moe_weights' largest |w| for this expert
      for (int64_t i : slots[e]) top = std::max(top, std::fabs(weights[i]));
      low_ok.push_back(top < threshold ? 1 : 0);
    }
  }
  cache.set_current_layer(layer);
  // the missing ones are being read from here on
  LayerRequest req = cache.request(layer, needed, true, low_ok.empty() ? nullptr : &low_ok);
  if (T == 1 && needed.size() > 1 && req.ready() == needed.size() &&
      one_token_experts_in_parallel(cache, req, layer, x, H, slots, ys))
    return;
  std::vector<float> xb, yb;
  double compute = 0;
  while (!req.done()) {
    PinnedExpert pin = req.next();  // resident ones first, then each missing one as it lands
    const auto t0 = std::chrono::steady_clock::now();
    const uint32_t e = pin.expert();
    const auto& s = slots[e];
    const auto n = int64_t(s.size());
    const Expert ex = parse_blob(cache, pin, layer, H);
    xb.resize(size_t(n * H));  // gathered tokens [n, H]
    yb.resize(size_t(n * H));  // their expert outputs [n, H]
    for (int64_t j = 0; j < n; ++j) std::memcpy(&xb[size_t(j * H)], x + (s[size_t(j)] / K) * H, size_t(H) * 4);
    if (per_token) {  // one read, each token through the one-token kernels
      for (int64_t j = 0; j < n; ++j) expert_forward(ex, &xb[size_t(j * H)], 1, &yb[size_t(j * H)]);
    } else {
      expert_forward(ex, xb.data(), n, yb.data());
    }
    pin.release();
    for (int64_t j = 0; j < n; ++j) std::memcpy(&ys[size_t(s[size_t(j)] * H)], &yb[size_t(j * H)], size_t(H) * 4);
    compute += seconds_since(t0);
  }
  cache.record_compute(layer, compute);
}

void combine_slots(const float* ys, const float* weights, int64_t T, int64_t K, int64_t H, float* y) {
  // ys [T, K, H], weights [T, K] -> y [T, H]; in slot order, whatever order the experts arrived in
  for (int64_t t = 0; t < T; ++t) {
    float* yt = y + t * H;
    std::fill(yt, yt + H, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float w = weights[t * K + k];
      const float* src = &ys[size_t((t * K + k) * H)];
      for (int64_t h = 0; h < H; ++h) yt[h] += w * src[h];
    }
  }
}

void moe_forward(ExpertCache& cache, uint32_t layer, const float* x, int64_t T, int64_t H, const int32_t* ids,
                 const float* weights, int64_t K, float* y, bool per_token) {
  // x [T, H], ids/weights [T, K] -> ys [T, K, H] (ffn_moe_out per slot) -> y [T, H]
  std::vector<float> ys(size_t(T * K * H));
  moe_forward_slots(cache, layer, x, T, H, ids, weights, K, nullptr, ys.data(), per_token);
  const auto t0 = std::chrono::steady_clock::now();
  combine_slots(ys.data(), weights, T, K, H, y);
  cache.record_compute(layer, seconds_since(t0));
}

}  // namespace edgemoe
