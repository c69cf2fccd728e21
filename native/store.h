// Expert blobs on flash (ExpertStore), resident in RAM under a byte budget
// (ExpertCache), and the MoE layer that runs them (moe_forward).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace edgemoe {

// One expert blob in a 4 KiB aligned buffer (as O_DIRECT wants it).
struct Blob {
  Blob(uint64_t capacity);
  ~Blob();
  Blob(const Blob&) = delete;
  Blob& operator=(const Blob&) = delete;
  uint8_t* base = nullptr;      // aligned allocation
  uint64_t capacity = 0;        // multiple of 4096
  const uint8_t* data = nullptr;  // the blob's first byte (inside base)
  uint64_t size = 0;            // the blob's exact length
};

class ExpertStore {
 public:
  // offsets/sizes/checksums: [num_layers * num_experts], row-major; size 0 = no expert.
  // Throws ModelDirectoryError if the file is missing, not an experts file, or a
  // blob lies beyond its end (truncated).
  ExpertStore(std::string path, uint32_t num_layers, uint32_t num_experts, std::vector<uint64_t> offsets,
              std::vector<uint64_t> sizes, std::vector<uint32_t> checksums, bool direct, bool verify);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // One pread into an aligned buffer (`reuse` if it has exactly the capacity
  // needed, else a fresh one); verifies the CRC-32C (if verify) and the blob
  // header. Thread-safe. Throws CorruptExpertError, ModelDirectoryError,
  // std::invalid_argument (bad layer/expert), std::runtime_error (I/O error).
  std::shared_ptr<Blob> read(uint32_t layer, uint32_t expert, std::shared_ptr<Blob> reuse = nullptr) const;

  bool direct() const { return direct_.load(); }
  bool verify() const { return verify_; }
  const std::string& path() const { return path_; }
  uint32_t num_layers() const { return num_layers_; }
  uint32_t num_experts() const { return num_experts_; }
  uint64_t file_bytes() const { return file_bytes_; }
  uint64_t blob_size(uint32_t layer, uint32_t expert) const;  // 0 = no such expert
  uint64_t buffer_bytes(uint32_t layer, uint32_t expert) const { return (blob_size(layer, expert) + 4095) / 4096 * 4096; }
  // Bytes of the aligned buffer read() uses (whole pages around the blob).
  uint64_t read_capacity(uint32_t layer, uint32_t expert) const;
  // Throws std::invalid_argument naming the range when out of range.
  void check_index(uint32_t layer, uint32_t expert) const;
  // Evicts the file from the OS page cache (benchmarks of buffered reads).
  void drop_page_cache() const;

 private:
  size_t index(uint32_t layer, uint32_t expert) const { return size_t(layer) * num_experts_ + expert; }
  std::string who(uint32_t layer, uint32_t expert) const;

  std::string path_;
  uint32_t num_layers_, num_experts_;
  std::vector<uint64_t> offsets_, sizes_;
  std::vector<uint32_t> checksums_;
  bool verify_;
  int fd_ = -1;         // buffered
  int fd_direct_ = -1;  // O_DIRECT, -1 when unavailable
  mutable std::atomic<bool> direct_{false};
  uint64_t file_bytes_ = 0;
};

struct CacheStats {
  uint64_t hits = 0, misses = 0, loads = 0, evictions = 0, bytes_read = 0;
  double read_seconds = 0;
  uint64_t resident_bytes = 0, peak_resident_bytes = 0;
  bool direct_io = false;
};

class ExpertCache;

// An expert pinned in the cache; unpins when destroyed.
class PinnedExpert {
 public:
  PinnedExpert() = default;
  PinnedExpert(ExpertCache* cache, size_t key, std::shared_ptr<Blob> blob)
      : cache_(cache), key_(key), blob_(std::move(blob)) {}
  PinnedExpert(PinnedExpert&& o) noexcept;
  PinnedExpert& operator=(PinnedExpert&& o) noexcept;
  ~PinnedExpert();
  const Blob& blob() const { return *blob_; }
  void release();

 private:
  ExpertCache* cache_ = nullptr;
  size_t key_ = 0;
  std::shared_ptr<Blob> blob_;
};

// Resident blobs under a byte budget (0 = unbounded), least recently used
// evicted first, pinned ones never. Thread-safe: reads happen outside the lock,
// and concurrent requests for one expert wait for a single read.
class ExpertCache {
 public:
  ExpertCache(std::shared_ptr<ExpertStore> store, uint64_t budget_bytes);

  // Returns the expert pinned, reading it on a miss. Throws BudgetError if the
  // budget cannot make room (all resident experts pinned, or budget < blob).
  PinnedExpert acquire(uint32_t layer, uint32_t expert);
  // Makes the expert resident without pinning it; true if this call read it.
  bool prefetch(uint32_t layer, uint32_t expert);

  bool contains(uint32_t layer, uint32_t expert) const;
  void clear();  // evicts every unpinned expert
  CacheStats stats() const;
  void reset_stats();
  uint64_t budget_bytes() const { return budget_; }
  uint64_t resident_bytes() const;
  const ExpertStore& store() const { return *store_; }

 private:
  friend class PinnedExpert;
  enum class State : uint8_t { kAbsent, kLoading, kReady };
  struct Entry {
    State state = State::kAbsent;
    int pins = 0;
    uint64_t bytes = 0;  // budget charge while loading or resident
    std::shared_ptr<Blob> blob;
    std::list<size_t>::iterator lru;  // valid when kReady
  };

  // Under mu_: ensure the expert is resident (reading it with mu_ released);
  // on return the entry is kReady. Returns true if this call read it.
  bool ensure_resident(std::unique_lock<std::mutex>& lk, uint32_t layer, uint32_t expert);
  // Under mu_: evicts LRU unpinned experts until `need` more bytes fit; their
  // buffers go to `evicted` so a load can reuse one instead of faulting in new pages.
  void make_room(uint64_t need, uint32_t layer, uint32_t expert, std::vector<std::shared_ptr<Blob>>& evicted);
  std::shared_ptr<Blob> evict(size_t key);  // under mu_
  void unpin(size_t key);

  std::shared_ptr<ExpertStore> store_;
  uint64_t budget_;
  mutable std::mutex mu_;
  std::condition_variable loaded_;
  std::vector<Entry> entries_;
  std::list<size_t> lru_;  // resident keys, least recently used first
  CacheStats stats_;
};

// y[T, H] = sum_k weights[t, k] * expert[ids[t, k]](x[t]) for layer `layer`.
// x [T, H], ids/weights [T, K] (C-contiguous). Each distinct expert is pinned
// once for all its tokens. Throws std::invalid_argument on a bad id or shape.
void moe_forward(ExpertCache& cache, uint32_t layer, const float* x, int64_t T, int64_t H, const int32_t* ids,
                 const float* weights, int64_t K, float* y);

}  // namespace edgemoe
