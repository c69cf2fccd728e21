#include "cache.h"

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cmath>

#include "common.h"

namespace edgemoe {

namespace {

std::string who(uint32_t layer, uint32_t expert) {
  return "expert " + std::to_string(expert) + " of layer " + std::to_string(layer);
}

}  // namespace

LayerStats& LayerStats::operator+=(const LayerStats& o) {
  hits += o.hits;
  misses += o.misses;
  loads += o.loads;
  bytes_read += o.bytes_read;
  demand_bytes += o.demand_bytes;
  prefetch_issued += o.prefetch_issued;
  prefetch_loads += o.prefetch_loads;
  prefetch_bytes += o.prefetch_bytes;
  prefetch_hits += o.prefetch_hits;
  prefetch_cancelled += o.prefetch_cancelled;
  prefetch_dropped += o.prefetch_dropped;
  wasted_prefetch_bytes += o.wasted_prefetch_bytes;
  evictions += o.evictions;
  fallback_uses += o.fallback_uses;
  fallback_loads += o.fallback_loads;
  fallback_bytes += o.fallback_bytes;
  fallback_bytes_saved += o.fallback_bytes_saved;
  read_seconds += o.read_seconds;
  stall_seconds += o.stall_seconds;
  compute_seconds += o.compute_seconds;
  return *this;
}

// ---------------------------------------------------------------- PinnedExpert

PinnedExpert::PinnedExpert(PinnedExpert&& o) noexcept
    : cache_(o.cache_), key_(o.key_), expert_(o.expert_), low_bit_(o.low_bit_), blob_(std::move(o.blob_)) {
  o.cache_ = nullptr;
}

PinnedExpert& PinnedExpert::operator=(PinnedExpert&& o) noexcept {
  if (this != &o) {
    release();
    cache_ = o.cache_;
    key_ = o.key_;
    expert_ = o.expert_;
    low_bit_ = o.low_bit_;
    blob_ = std::move(o.blob_);
    o.cache_ = nullptr;
  }
  return *this;
}

PinnedExpert::~PinnedExpert() { release(); }

void PinnedExpert::release() {
  // Drop our reference before unpinning: once unpinned the buffer may be evicted and reused.
  blob_.reset();
  if (cache_ != nullptr) cache_->unpin(key_);
  cache_ = nullptr;
}

// ---------------------------------------------------------------- LayerRequest

LayerRequest::LayerRequest(LayerRequest&& o) noexcept
    : cache_(o.cache_), layer_(o.layer_), waiting_(std::move(o.waiting_)), deferred_(std::move(o.deferred_)) {
  o.cache_ = nullptr;
  o.waiting_.clear();
  o.deferred_.clear();
}

LayerRequest::~LayerRequest() {
  if (cache_ != nullptr) cache_->finish(*this);
}

PinnedExpert LayerRequest::next() { return cache_->next_of(*this); }

size_t LayerRequest::ready() const { return cache_->ready_of(*this); }

// ---------------------------------------------------------------- ExpertCache

ExpertCache::ExpertCache(std::shared_ptr<ExpertStore> store, uint64_t budget_bytes, Policy policy, int io_threads,
                         std::shared_ptr<ExpertStore> fallback)
    : store_(std::move(store)), fallback_(std::move(fallback)), budget_(budget_bytes), policy_(policy) {
  if (io_threads < 0 || io_threads > 64)
    throw std::invalid_argument("io_threads must be between 0 and 64, got " + std::to_string(io_threads));
  const uint32_t L = store_->num_layers(), E = store_->num_experts();
  keys_ = size_t(L) * E;
  if (fallback_) {
    if (fallback_->num_layers() != L || fallback_->num_experts() != E)
      throw std::invalid_argument("the fallback store has " + std::to_string(fallback_->num_layers()) + " layers x " +
                                  std::to_string(fallback_->num_experts()) + " experts, the experts store " +
                                  std::to_string(L) + " x " + std::to_string(E) + ": they must match");
    for (uint32_t l = 0; l < L; ++l)
      for (uint32_t e = 0; e < E; ++e)
        if (fallback_->blob_size(l, e) != 0 && store_->blob_size(l, e) == 0)
          throw std::invalid_argument("the fallback store has a copy of " + who(l, e) +
                                      ", which the experts store does not have");
  }
  entries_.resize(fallback_ ? 2 * keys_ : keys_);
  in_state_[size_t(State::kAbsent)] = entries_.size();
  layer_stats_.resize(L);
  moe_index_.assign(L, -1);
  for (uint32_t l = 0; l < L; ++l)
    for (uint32_t e = 0; e < E; ++e)
      if (store_->blob_size(l, e) != 0) {
        moe_index_[l] = int32_t(num_moe_layers_++);
        break;
      }
  direct_io_ = store_->direct();
  for (int i = 0; i < io_threads; ++i) threads_.emplace_back([this] { io_loop(); });
}

ExpertCache::~ExpertCache() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
  }
  work_.notify_all();
  for (auto& t : threads_) t.join();
}

std::string ExpertCache::describe(size_t key) const {
  return who(layer_of(key), expert_of(key)) + (low_bit(key) ? " (low-bit copy)" : "");
}

void ExpertCache::set_state(Entry& en, State s) {
  in_state_[size_t(en.state)] -= 1;
  in_state_[size_t(s)] += 1;
  en.state = s;
}

uint32_t ExpertCache::distance(uint32_t layer) const {
  const int64_t M = num_moe_layers_;
  const int64_t mi = moe_index_[layer];
  const int64_t cur = current_layer_ >= 0 ? moe_index_[size_t(current_layer_)] : M - 1;
  return uint32_t(((mi - cur - 1) % M + M) % M + 1);
}

Score ExpertCache::score_of(const Entry& en, uint32_t layer) const {
  if (!en.prefetched) return policy_score(policy_, en.usage, distance(layer), token_);
  // A guess not used yet is worth what it was admitted for: as if used when it
  // landed. Else (rate 0) the current layer's misses would evict the next layer's guesses.
  Usage u = en.usage;
  record_use(u, u.last_use, token_);
  return policy_score(policy_, u, distance(layer), token_);
}

void ExpertCache::charge(Entry& en, uint64_t bytes) {
  en.bytes = bytes;
  resident_bytes_ += bytes;
  peak_resident_bytes_ = std::max(peak_resident_bytes_, resident_bytes_);
}

bool ExpertCache::make_room(uint64_t need, int64_t prefetch_key, Buffers& evicted) {
  if (budget_ == 0 || resident_bytes_ + need <= budget_) return true;
  Score incoming;
  uint32_t target_distance = 0;
  if (prefetch_key >= 0) {
    // What the guess is worth if it is right: scored as if used now.
    const uint32_t layer = layer_of(size_t(prefetch_key));
    Usage u = entries_[size_t(prefetch_key)].usage;
    record_use(u, tick_ + 1, token_);
    target_distance = distance(layer);
    incoming = policy_score(policy_, u, target_distance, token_);
  }
  std::vector<std::pair<Score, size_t>> victims;
  uint64_t freeable = 0;
  for (size_t k : resident_) {
    const Entry& en = entries_[k];
    if (en.pins != 0) continue;
    const uint32_t layer = layer_of(k);
    const Score s = score_of(en, layer);
    if (prefetch_key >= 0) {
      // Never an expert needed before the guess: the current layer's, or one of
      // a layer between it and the guess's (the guess's own layer included).
      if (int64_t(layer) == current_layer_ || distance(layer) <= target_distance) continue;
      if (!(s.value < incoming.value)) continue;  // never one worth as much as the guess
    }
    victims.emplace_back(s, k);
    freeable += en.bytes;
  }
  if (resident_bytes_ + need > budget_ + freeable) return false;
  std::sort(victims.begin(), victims.end(),
            [](const std::pair<Score, size_t>& a, const std::pair<Score, size_t>& b) { return a.first < b.first; });
  for (const auto& v : victims) {
    if (resident_bytes_ + need <= budget_) break;
    evict(v.second, evicted);
  }
  return true;
}

void ExpertCache::evict(size_t key, Buffers& evicted) {
  Entry& en = entries_[key];
  assert(en.state == State::kReady && en.pins == 0);
  const size_t last = resident_.back();
  resident_[en.slot] = last;
  entries_[last].slot = en.slot;
  resident_.pop_back();
  resident_bytes_ -= en.bytes;
  en.bytes = 0;
  set_state(en, State::kAbsent);
  LayerStats& ls = layer_stats_[layer_of(key)];
  ls.evictions += 1;
  if (en.prefetched) {
    ls.wasted_prefetch_bytes += en.blob->size;
    en.prefetched = false;
  }
  evicted.push_back(std::move(en.blob));
}

std::shared_ptr<Blob> ExpertCache::take_reusable(Buffers& evicted, uint64_t capacity) {
  for (auto& b : evicted)
    if (b && b->capacity == capacity && b.use_count() == 1) {
      std::shared_ptr<Blob> out = std::move(b);
      b = std::move(evicted.back());
      evicted.pop_back();
      return out;
    }
  return nullptr;
}

bool ExpertCache::reserve_demand(size_t key, Buffers& evicted) {
  Entry& en = entries_[key];
  const uint64_t need = capacity_of(key);
  if (!make_room(need, -1, evicted)) return false;
  charge(en, need);
  en.error = nullptr;
  en.blob = take_reusable(evicted, need);
  set_state(en, State::kQueuedDemand);
  demand_q_.push_back(key);
  work_.notify_one();
  return true;
}

void ExpertCache::read_entry(std::unique_lock<std::mutex>& lk, size_t key, bool prefetch, Buffers& evicted) {
  Entry& en = entries_[key];  // entries_ never resizes: the reference stays valid
  assert(en.state == State::kLoading);
  const uint32_t layer = layer_of(key), expert = expert_of(key);
  std::shared_ptr<Blob> reuse = std::move(en.blob);
  lk.unlock();
  evicted.clear();  // free the buffers nobody reuses outside the lock
  const auto t0 = std::chrono::steady_clock::now();
  std::shared_ptr<Blob> blob;
  std::exception_ptr error;
  try {
    blob = store_of(key).read(layer, expert, std::move(reuse));
  } catch (...) {
    error = std::current_exception();
  }
  const double dt = seconds_since(t0);
  lk.lock();

  LayerStats& ls = layer_stats_[layer];
  ls.read_seconds += dt;
  if (error) {
    resident_bytes_ -= en.bytes;
    en.bytes = 0;
    en.prefetched = false;
    if (en.pins > 0) en.error = error;  // a failed prefetch nobody waits for is forgotten
    set_state(en, State::kAbsent);
  } else {
    ls.loads += 1;
    ls.bytes_read += blob->size;
    (prefetch ? ls.prefetch_bytes : ls.demand_bytes) += blob->size;
    if (prefetch) ls.prefetch_loads += 1;
    if (low_bit(key)) {
      ls.fallback_loads += 1;
      ls.fallback_bytes += blob->size;
    }
    en.blob = std::move(blob);
    en.usage.last_use = ++tick_;  // a landing counts as a use for recency
    en.slot = uint32_t(resident_.size());
    resident_.push_back(key);
    set_state(en, State::kReady);
    direct_io_ = store_->direct();
  }
  changed_.notify_all();
}

void ExpertCache::io_loop() {
  Buffers evicted;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    work_.wait(lk, [&] { return stopping_ || !demand_q_.empty() || (deferred_ == 0 && !prefetch_q_.empty()); });
    if (stopping_) return;
    if (!demand_q_.empty()) {
      const size_t key = demand_q_.front();
      demand_q_.pop_front();
      if (entries_[key].state != State::kQueuedDemand) continue;  // a waiting request read it
      set_state(entries_[key], State::kLoading);
      read_entry(lk, key, false, evicted);
      continue;
    }
    const size_t key = prefetch_q_.front();
    prefetch_q_.pop_front();
    Entry& en = entries_[key];
    if (en.state != State::kQueuedPrefetch) continue;  // stale: demanded or cancelled since
    const uint64_t need = capacity_of(key);
    if (!make_room(need, int64_t(key), evicted)) {
      layer_stats_[layer_of(key)].prefetch_dropped += 1;
      set_state(en, State::kAbsent);
      changed_.notify_all();
      continue;
    }
    charge(en, need);
    en.blob = take_reusable(evicted, need);
    en.prefetched = true;
    set_state(en, State::kLoading);
    read_entry(lk, key, true, evicted);
  }
}

LayerRequest ExpertCache::request(uint32_t layer, const std::vector<uint32_t>& experts, bool count,
                                  const std::vector<uint8_t>* low_ok) {
  if (low_ok != nullptr && low_ok->size() != experts.size())
    throw std::invalid_argument("request: low_ok has " + std::to_string(low_ok->size()) + " flags for " +
                                std::to_string(experts.size()) + " experts");
  for (uint32_t e : experts) {
    const uint64_t size = store_->blob_size(layer, e);  // throws on a bad index
    if (size == 0)
      throw std::invalid_argument("layer " + std::to_string(layer) + " has no expert " + std::to_string(e));
    const uint64_t need = store_->read_capacity(layer, e);
    if (budget_ != 0 && need > budget_)
      throw BudgetError("the expert cache budget of " + std::to_string(budget_) + " bytes cannot hold " +
                        who(layer, e) + " (" + std::to_string(need) + " bytes): raise the budget to at least " +
                        std::to_string(need) + " bytes");
  }
  LayerRequest r(this, layer);
  r.waiting_.reserve(experts.size());
  Buffers evicted;  // declared before the lock: freed after it is released
  std::lock_guard<std::mutex> lk(mu_);
  LayerStats& ls = layer_stats_[layer];
  for (size_t i = 0; i < experts.size(); ++i) {  // pin them all first: reading one must not evict another
    const uint32_t e = experts[i];
    size_t key = size_t(layer) * store_->num_experts() + e;
    const State full = entries_[key].state;
    if (low_ok != nullptr && (*low_ok)[i] && (full == State::kAbsent || full == State::kQueuedPrefetch) &&
        has_fallback(layer, e)) {
      key += keys_;  // a miss on an unimportant expert: its low-bit copy (a queued prefetch of the full one stays)
      if (count) {
        ls.fallback_uses += 1;
        const uint64_t read = entries_[key].state == State::kAbsent ? fallback_->blob_size(layer, e) : 0;
        ls.fallback_bytes_saved += store_->blob_size(layer, e) - read;
      }
    }
    Entry& en = entries_[key];
    en.pins += 1;
    r.waiting_.push_back(key);
    if (count) {
      record_use(en.usage, ++tick_, token_);
      (en.state == State::kReady ? ls.hits : ls.misses) += 1;
      if (en.prefetched) {  // resident or being read thanks to a prefetch
        ls.prefetch_hits += 1;
        en.prefetched = false;
      }
    }
    if (en.state == State::kQueuedPrefetch) set_state(en, State::kAbsent);  // not started: read it as a demand
  }
  for (size_t key : r.waiting_) {
    if (entries_[key].state == State::kAbsent && !reserve_demand(key, evicted)) {
      r.deferred_.push_back(key);
      deferred_ += 1;
    }
  }
  return r;
}

void ExpertCache::retry_deferred(LayerRequest& r, Buffers& evicted) {
  size_t kept = 0;
  bool blocked = false;
  for (size_t key : r.deferred_) {
    Entry& en = entries_[key];
    // Someone else queued it meanwhile, or there is room for it now: no longer deferred.
    if (en.state != State::kAbsent || (!blocked && reserve_demand(key, evicted))) {
      deferred_ -= 1;
      continue;
    }
    blocked = true;  // keep the order: later ones wait behind this one
    r.deferred_[kept++] = key;
  }
  r.deferred_.resize(kept);
  if (deferred_ == 0 && !prefetch_q_.empty()) work_.notify_all();
}

PinnedExpert ExpertCache::next_of(LayerRequest& r) {
  if (r.waiting_.empty()) throw std::logic_error("LayerRequest::next called after the last expert");
  Buffers evicted;
  std::unique_lock<std::mutex> lk(mu_);
  bool stalled = false;
  std::chrono::steady_clock::time_point t0;
  for (;;) {
    retry_deferred(r, evicted);
    for (size_t i = 0; i < r.waiting_.size(); ++i) {
      const size_t key = r.waiting_[i];
      Entry& en = entries_[key];
      if (en.state == State::kReady) {
        r.waiting_.erase(r.waiting_.begin() + ptrdiff_t(i));
        if (stalled) layer_stats_[r.layer_].stall_seconds += seconds_since(t0);
        return PinnedExpert(this, key, expert_of(key), low_bit(key), en.blob);
      }
      if (en.state == State::kAbsent) {
        if (en.error) std::rethrow_exception(en.error);  // its read failed
        if (std::find(r.deferred_.begin(), r.deferred_.end(), key) == r.deferred_.end()) {
          r.deferred_.push_back(key);  // not expected (pinned entries are never cancelled), but stay live
          deferred_ += 1;
        }
      }
    }
    if (!stalled) {
      stalled = true;
      t0 = std::chrono::steady_clock::now();
    }
    if (!demand_q_.empty()) {  // nothing to compute: read a queued demand ourselves
      const size_t key = demand_q_.front();
      demand_q_.pop_front();
      if (entries_[key].state == State::kQueuedDemand) {
        set_state(entries_[key], State::kLoading);
        read_entry(lk, key, false, evicted);
      }
      continue;
    }
    const size_t reads = in_state_[size_t(State::kQueuedDemand)] + in_state_[size_t(State::kLoading)];
    if (r.deferred_.size() == r.waiting_.size() && reads == 0) {
      // Nothing in flight will free room: the budget is held by pinned experts.
      const size_t key = r.deferred_.front();
      const uint64_t need = capacity_of(key);
      throw BudgetError("the expert cache budget of " + std::to_string(budget_) + " bytes cannot hold " +
                        describe(key) + " (" + std::to_string(need) + " bytes) next to the " +
                        std::to_string(resident_bytes_) +
                        " bytes of experts in use (pinned or being read): raise the budget to at least " +
                        std::to_string(resident_bytes_ + need) + " bytes");
    }
    changed_.wait(lk);
  }
}

size_t ExpertCache::ready_of(const LayerRequest& r) const {
  std::lock_guard<std::mutex> lk(mu_);
  return size_t(std::count_if(r.waiting_.begin(), r.waiting_.end(),
                              [&](size_t key) { return entries_[key].state == State::kReady; }));
}

void ExpertCache::finish(LayerRequest& r) {
  std::lock_guard<std::mutex> lk(mu_);
  for (size_t key : r.waiting_) {
    assert(entries_[key].pins > 0);
    entries_[key].pins -= 1;
  }
  deferred_ -= r.deferred_.size();
  if (!r.waiting_.empty()) changed_.notify_all();
  if (deferred_ == 0 && !prefetch_q_.empty()) work_.notify_all();
  r.waiting_.clear();
  r.deferred_.clear();
}

void ExpertCache::unpin(size_t key) {
  std::lock_guard<std::mutex> lk(mu_);
  assert(entries_[key].pins > 0);
  if (--entries_[key].pins == 0) changed_.notify_all();  // room for a deferred read, maybe
}

PinnedExpert ExpertCache::acquire(uint32_t layer, uint32_t expert) {
  LayerRequest r = request(layer, {expert});
  return r.next();
}

bool ExpertCache::load(uint32_t layer, uint32_t expert) {
  const bool was_resident = contains(layer, expert);
  LayerRequest r = request(layer, {expert}, false);
  r.next().release();
  return !was_resident;
}

size_t ExpertCache::prefetch(uint32_t layer, const std::vector<uint32_t>& experts, uint64_t max_bytes) {
  for (uint32_t e : experts) store_->check_index(layer, e);
  if (threads_.empty()) return 0;
  size_t queued = 0;
  uint64_t bytes = 0;
  std::lock_guard<std::mutex> lk(mu_);
  LayerStats& ls = layer_stats_[layer];
  for (uint32_t e : experts) {
    if (store_->blob_size(layer, e) == 0) continue;
    const size_t key = size_t(layer) * store_->num_experts() + e;
    Entry& en = entries_[key];
    if (en.state == State::kReady) en.usage.last_use = ++tick_;  // predicted again: keep it fresh
    if (en.state != State::kAbsent || en.pins > 0) continue;     // resident, queued, read or demanded
    const uint64_t need = store_->read_capacity(layer, e);
    if (budget_ != 0 && need > budget_) continue;
    if (max_bytes != 0 && bytes + need > max_bytes) break;
    bytes += need;
    set_state(en, State::kQueuedPrefetch);
    prefetch_q_.push_back(key);
    ls.prefetch_issued += 1;
    queued += 1;
  }
  if (queued != 0) work_.notify_all();
  return queued;
}

size_t ExpertCache::cancel_prefetches(int64_t layer) {
  std::lock_guard<std::mutex> lk(mu_);
  size_t n = 0;
  std::deque<size_t> keep;
  for (size_t key : prefetch_q_) {
    Entry& en = entries_[key];
    if (en.state != State::kQueuedPrefetch) continue;  // stale
    if (layer >= 0 && int64_t(layer_of(key)) != layer) {
      keep.push_back(key);
      continue;
    }
    set_state(en, State::kAbsent);
    layer_stats_[layer_of(key)].prefetch_cancelled += 1;
    n += 1;
  }
  prefetch_q_.swap(keep);
  if (n != 0) changed_.notify_all();
  return n;
}

void ExpertCache::set_current_layer(uint32_t layer) {
  if (layer >= store_->num_layers())
    throw std::invalid_argument("layer " + std::to_string(layer) + " is out of range: the experts file has " +
                                std::to_string(store_->num_layers()) + " layers");
  std::lock_guard<std::mutex> lk(mu_);
  if (moe_index_[layer] < 0) return;  // no experts: nothing to order
  if (current_layer_ >= 0 && moe_index_[layer] <= moe_index_[size_t(current_layer_)]) token_ += 1;
  current_layer_ = layer;
}

void ExpertCache::wait_idle() {
  std::unique_lock<std::mutex> lk(mu_);
  changed_.wait(lk, [&] {
    return in_state_[size_t(State::kQueuedPrefetch)] + in_state_[size_t(State::kQueuedDemand)] +
               in_state_[size_t(State::kLoading)] ==
           0;
  });
}

void ExpertCache::record_compute(uint32_t layer, double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  layer_stats_[layer].compute_seconds += seconds;
}

bool ExpertCache::contains(uint32_t layer, uint32_t expert, bool low_bit) const {
  store_->check_index(layer, expert);
  if (low_bit && !fallback_) return false;
  std::lock_guard<std::mutex> lk(mu_);
  return entries_[size_t(layer) * store_->num_experts() + expert + (low_bit ? keys_ : 0)].state == State::kReady;
}

void ExpertCache::set_fallback_threshold(float threshold) {
  if (!(threshold >= 0) || std::isinf(threshold))
    throw std::invalid_argument("the fallback threshold must be a finite gate weight >= 0 (0 = off), got " +
                                std::to_string(threshold));
  if (threshold > 0 && !fallback_)
    throw std::invalid_argument(
        "this cache has no low-bit copies to fall back to: open the model with its "
        "fallback file (convert with --fallback-bits 2)");
  fallback_threshold_ = threshold;
}

void ExpertCache::clear() {
  cancel_prefetches(-1);
  Buffers evicted;  // freed after the lock is released
  std::lock_guard<std::mutex> lk(mu_);
  const std::vector<size_t> keys = resident_;
  for (size_t k : keys)
    if (entries_[k].pins == 0) evict(k, evicted);
}

CacheStats ExpertCache::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  CacheStats s;
  for (const LayerStats& ls : layer_stats_) s += ls;
  s.resident_bytes = resident_bytes_;
  s.peak_resident_bytes = peak_resident_bytes_;
  s.direct_io = direct_io_;
  return s;
}

std::vector<LayerStats> ExpertCache::layer_stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return layer_stats_;
}

void ExpertCache::reset_stats() {
  std::lock_guard<std::mutex> lk(mu_);
  std::fill(layer_stats_.begin(), layer_stats_.end(), LayerStats{});
  peak_resident_bytes_ = resident_bytes_;
  direct_io_ = store_->direct();
}

uint64_t ExpertCache::resident_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return resident_bytes_;
}

}  // namespace edgemoe
