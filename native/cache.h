// The expert cache: blobs resident in RAM under a byte budget, read from the
// ExpertStore by a small pool of I/O threads (demand reads before prefetches),
// evicted by a policy (policy.h). moe_forward (moe.h) runs an MoE layer over it,
// overlapping the reads of the layer's missing experts with the compute of its
// resident ones.
//
// Low-bit fallback (HOBBIT). Given a second store holding low-bit copies of the
// experts (docs/format.md, experts.fallback.bin) and a threshold > 0, a miss on an
// expert whose |gate weight| is below the threshold for every token of the call
// reads the low-bit copy instead of the full one. The copy is its own entry:
// its own bytes under the same budget, its own usage for the policy. A use
// above the threshold always takes the full copy (reading it on a miss); a
// resident (or in-flight) full copy is always preferred to the low-bit one.
//
// Memory. The budget bounds every blob buffer the cache holds: resident,
// being read (demand or prefetch), or reserved for a queued demand read. A
// buffer is charged its whole pages (Blob::capacity) before it is allocated,
// so resident_bytes <= budget at all times. An evicted buffer is either reused
// by the read that evicted it or unmapped just after the lock is released (one
// eviction batch per thread may be in that window). Beyond the budget the cache
// has a fixed overhead:
//   - one Entry per (layer, expert) of the experts file, resident or not:
//     sizeof(Entry) = kEntryBytes (80 bytes on x86-64 / aarch64);
//   - per resident or in-flight expert, one heap block holding the Blob (32
//     bytes) and its shared_ptr control block: a 64-byte malloc chunk; plus the
//     kernel's page tables for its mapping (8 bytes per 4 KiB page, ~0.2%);
//   - one LayerStats per layer (sizeof(LayerStats) = 128 bytes), 8 bytes per
//     queued read, and io_threads threads (their stacks are virtual memory; a
//     few KiB of each is touched).
// moe_forward's scratch is per call and scales with its tokens: gathered x and
// expert outputs ([n, H] floats for the largest expert's n tokens) and the
// per-slot outputs it sums in a fixed order ([T, K, H] floats).
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "policy.h"
#include "store.h"

namespace edgemoe {

// Counters of one layer; summed over layers they are the cache's totals.
// Byte counts are blob bytes (not rounded up to pages).
struct LayerStats {
  uint64_t hits = 0;                   // demanded experts found resident
  uint64_t misses = 0;                 // demanded experts not resident (read, or waited for)
  uint64_t loads = 0;                  // reads from the file, demand and prefetch
  uint64_t bytes_read = 0;             // bytes of those reads
  uint64_t demand_bytes = 0;           // bytes read because a moe_forward (or load) needed them
  uint64_t prefetch_issued = 0;        // reads queued by prefetch()
  uint64_t prefetch_loads = 0;         // of those, read
  uint64_t prefetch_bytes = 0;         // bytes of those reads
  uint64_t prefetch_hits = 0;          // demanded experts resident or in flight because of a prefetch
  uint64_t prefetch_cancelled = 0;     // queued, then cancelled before the read started
  uint64_t prefetch_dropped = 0;       // not admitted: no room without evicting a more valuable expert
  uint64_t wasted_prefetch_bytes = 0;  // prefetched, then evicted before any use
  uint64_t evictions = 0;
  uint64_t fallback_uses = 0;         // demands served by a low-bit copy (counted in hits/misses too)
  uint64_t fallback_loads = 0;        // reads of low-bit copies (counted in loads too)
  uint64_t fallback_bytes = 0;        // bytes of those reads (counted in bytes_read too)
  uint64_t fallback_bytes_saved = 0;  // per fallback use: full copy's bytes - bytes read for the use
  double read_seconds = 0;            // inside reads, summed over threads
  double stall_seconds = 0;           // moe_forward waiting for (or doing) reads
  double compute_seconds = 0;         // moe_forward computing experts
  LayerStats& operator+=(const LayerStats& o);
};

struct CacheStats : LayerStats {
  uint64_t resident_bytes = 0;       // charged now: resident, in flight, reserved
  uint64_t peak_resident_bytes = 0;  // the most ever charged at once (<= budget)
  bool direct_io = false;
};

class ExpertCache;

// An expert pinned in the cache; unpins when destroyed.
class PinnedExpert {
 public:
  PinnedExpert() = default;
  PinnedExpert(ExpertCache* cache, size_t key, uint32_t expert, bool low_bit, std::shared_ptr<Blob> blob)
      : cache_(cache), key_(key), expert_(expert), low_bit_(low_bit), blob_(std::move(blob)) {}
  PinnedExpert(PinnedExpert&& o) noexcept;
  PinnedExpert& operator=(PinnedExpert&& o) noexcept;
  ~PinnedExpert();
  const Blob& blob() const { return *blob_; }
  uint32_t expert() const { return expert_; }
  bool low_bit() const { return low_bit_; }  // the expert's low-bit fallback copy
  void release();

 private:
  ExpertCache* cache_ = nullptr;
  size_t key_ = 0;
  uint32_t expert_ = 0;
  bool low_bit_ = false;
  std::shared_ptr<Blob> blob_;
};

// The experts one call needs from one layer, all pinned for the call: the
// resident ones are handed out at once, the others as their reads land. Made by
// ExpertCache::request, which sends the missing ones to the I/O threads. Unpins
// whatever it has not handed out when destroyed. Not thread-safe itself.
class LayerRequest {
 public:
  LayerRequest(LayerRequest&& o) noexcept;
  LayerRequest& operator=(LayerRequest&&) = delete;
  LayerRequest(const LayerRequest&) = delete;
  ~LayerRequest();

  bool done() const { return waiting_.empty(); }
  // How many of the experts not handed out yet are resident now (next() would not wait for them).
  size_t ready() const;
  // A resident expert of the request, pinned; waits (as stall time) until one
  // is, reading queued demand reads itself meanwhile. Throws the read's error,
  // or BudgetError when the rest can never fit (the budget is held by pins).
  PinnedExpert next();

 private:
  friend class ExpertCache;
  LayerRequest(ExpertCache* cache, uint32_t layer) : cache_(cache), layer_(layer) {}
  ExpertCache* cache_;
  uint32_t layer_;
  std::vector<size_t> waiting_;   // keys pinned by this request, not yet handed out
  std::vector<size_t> deferred_;  // of those, absent with no room reserved yet
};

// Resident blobs under a byte budget (0 = unbounded). Thread-safe: one mutex,
// never held during a read or a computation.
class ExpertCache {
 public:
  // io_threads: threads reading blobs (0: the calling thread reads, and
  // prefetch() queues nothing). fallback: low-bit copies of (some of) the
  // store's experts, same layers and experts (null: none). Throws
  // std::invalid_argument when its shape differs or it has an expert the store lacks.
  ExpertCache(std::shared_ptr<ExpertStore> store, uint64_t budget_bytes, Policy policy = Policy::kLru,
              int io_threads = 2, std::shared_ptr<ExpertStore> fallback = nullptr);
  ~ExpertCache();
  ExpertCache(const ExpertCache&) = delete;
  ExpertCache& operator=(const ExpertCache&) = delete;

  // Pins `experts` of `layer` (distinct) for one call and queues the reads of
  // the missing ones ahead of any prefetch. count: counts hits and misses and
  // records the uses for the policy (false for load()). low_ok (one flag per
  // expert, or null): the expert may be served by its low-bit copy; it is when
  // it has one and its full copy is neither resident nor being read (absent or
  // only queued as a prefetch). Throws std::invalid_argument (no such expert)
  // and BudgetError (one expert is larger than the budget) before pinning anything.
  LayerRequest request(uint32_t layer, const std::vector<uint32_t>& experts, bool count = true,
                       const std::vector<uint8_t>* low_ok = nullptr);
  // One expert, pinned, read on a miss (a request of one).
  PinnedExpert acquire(uint32_t layer, uint32_t expert);
  // Makes the expert resident now without pinning it (may evict). True if it
  // was not resident. Not counted as a hit or miss; counted in loads.
  bool load(uint32_t layer, uint32_t expert);

  // Queues reads of `experts` of `layer` in the given order (most likely first)
  // and returns at once: skips experts resident, queued or being read, stops
  // before the bytes queued by this call would pass max_bytes (0: no cap).
  // Returns how many were queued. When its read starts, a prefetch evicts only
  // unpinned experts that are less valuable than it by the policy's score and
  // are not of a layer that runs before it (from the current layer on);
  // otherwise it is dropped. A wrong guess costs bandwidth, never correctness.
  size_t prefetch(uint32_t layer, const std::vector<uint32_t>& experts, uint64_t max_bytes = 0);
  // Drops queued prefetches that have not started (all, or those of `layer`).
  size_t cancel_prefetches(int64_t layer = -1);
  // The layer computing now: distances for the structure policy, the layers a
  // prefetch may not evict from, and token boundaries (a layer at or before the
  // current one starts a token). moe_forward sets it.
  void set_current_layer(uint32_t layer);
  // Waits until no read is queued or in flight (tests, benchmarks).
  void wait_idle();
  void record_compute(uint32_t layer, double seconds);

  bool contains(uint32_t layer, uint32_t expert, bool low_bit = false) const;
  // The low-bit fallback: moe_forward serves a miss from the low-bit copy when
  // every |gate weight| of the expert in the call is below the threshold.
  // 0 turns it off. Throws std::invalid_argument if negative / not finite, or
  // > 0 without a fallback store.
  void set_fallback_threshold(float threshold);
  float fallback_threshold() const { return fallback_threshold_.load(); }
  bool has_fallback() const { return fallback_ != nullptr; }
  bool has_fallback(uint32_t layer, uint32_t expert) const {
    return fallback_ != nullptr && fallback_->blob_size(layer, expert) != 0;
  }
  void clear();  // cancels queued prefetches and evicts every unpinned expert
  CacheStats stats() const;
  std::vector<LayerStats> layer_stats() const;
  void reset_stats();
  uint64_t budget_bytes() const { return budget_; }
  uint64_t resident_bytes() const;
  Policy policy() const { return policy_; }
  int io_threads() const { return int(threads_.size()); }
  const ExpertStore& store() const { return *store_; }
  const ExpertStore* fallback_store() const { return fallback_.get(); }

 private:
  friend class PinnedExpert;
  friend class LayerRequest;
  enum class State : uint8_t { kAbsent, kQueuedPrefetch, kQueuedDemand, kLoading, kReady, kCount };
  struct Entry {
    State state = State::kAbsent;
    bool prefetched = false;     // read by a prefetch and not yet demanded
    uint32_t pins = 0;           // holders and waiters, in any state
    uint32_t slot = 0;           // index in resident_ when kReady
    uint64_t bytes = 0;          // budget charge: kQueuedDemand, kLoading, kReady
    std::shared_ptr<Blob> blob;  // kReady; or the evicted buffer a queued read will reuse
    std::exception_ptr error;    // a failed read's error, for the requests pinning it
    Usage usage;
  };
  using Buffers = std::vector<std::shared_ptr<Blob>>;  // evicted buffers, freed outside the lock

 public:
  static constexpr size_t kEntryBytes = sizeof(Entry);

 private:
  // Keys: [0, keys_) full copies, [keys_, 2 keys_) low-bit copies, each layer * E + expert.
  uint32_t layer_of(size_t key) const { return uint32_t(key % keys_ / store_->num_experts()); }
  uint32_t expert_of(size_t key) const { return uint32_t(key % store_->num_experts()); }
  bool low_bit(size_t key) const { return key >= keys_; }
  const ExpertStore& store_of(size_t key) const { return key >= keys_ ? *fallback_ : *store_; }
  uint64_t capacity_of(size_t key) const { return store_of(key).read_capacity(layer_of(key), expert_of(key)); }
  std::string describe(size_t key) const;  // "expert e of layer l" (+ " (low-bit copy)")
  // Everything below runs under mu_.
  void set_state(Entry& en, State s);
  uint32_t distance(uint32_t layer) const;  // MoE layers until `layer` runs again, >= 1
  Score score_of(const Entry& en, uint32_t layer) const;
  // Evicts until `need` more bytes fit, or evicts nothing and returns false.
  // prefetch_key >= 0: the victims a prefetch of that key may take.
  bool make_room(uint64_t need, int64_t prefetch_key, Buffers& evicted);
  void evict(size_t key, Buffers& evicted);
  void charge(Entry& en, uint64_t bytes);
  std::shared_ptr<Blob> take_reusable(Buffers& evicted, uint64_t capacity);
  // Absent -> queued demand read with its bytes reserved; false if no room.
  bool reserve_demand(size_t key, Buffers& evicted);
  // kLoading entry: reads it with mu_ released (freeing `evicted` meanwhile).
  void read_entry(std::unique_lock<std::mutex>& lk, size_t key, bool prefetch, Buffers& evicted);
  void io_loop();
  PinnedExpert next_of(LayerRequest& r);
  size_t ready_of(const LayerRequest& r) const;
  void retry_deferred(LayerRequest& r, Buffers& evicted);
  void finish(LayerRequest& r);
  void unpin(size_t key);

  std::shared_ptr<ExpertStore> store_;
  std::shared_ptr<ExpertStore> fallback_;  // low-bit copies, or null
  size_t keys_ = 0;                        // layers x experts of the store
  std::atomic<float> fallback_threshold_{0.0f};
  const uint64_t budget_;
  const Policy policy_;
  std::vector<int32_t> moe_index_;  // per layer: position among layers with experts, -1 if none
  uint32_t num_moe_layers_ = 0;

  mutable std::mutex mu_;
  std::condition_variable changed_;           // a read landed or failed, a pin dropped, work was cancelled
  std::condition_variable work_;              // the I/O threads' queues
  std::vector<Entry> entries_;                // [key] (full copies, then low-bit ones), never resized
  std::vector<size_t> resident_;              // keys in kReady
  std::deque<size_t> demand_q_, prefetch_q_;  // prefetch_q_ may hold stale keys: checked on pop
  std::array<size_t, size_t(State::kCount)> in_state_{};
  size_t deferred_ = 0;  // demand reads waiting for room: prefetches wait meanwhile
  uint64_t resident_bytes_ = 0, peak_resident_bytes_ = 0;
  uint64_t tick_ = 0, token_ = 0;
  int64_t current_layer_ = -1;
  bool direct_io_ = false;
  bool stopping_ = false;
  std::vector<LayerStats> layer_stats_;
  std::vector<std::thread> threads_;
};

}  // namespace edgemoe
