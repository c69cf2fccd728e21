// Expert blobs on flash (ExpertStore): one pread per expert, O_DIRECT into
// page-aligned buffers, optionally throttled to emulate a device's storage.
// The cache over it is in cache.h.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace edgemoe {

// The newest experts-file format_version this core reads (docs/format.md); older ones read too.
// Bound as edgemoe._core.FORMAT_VERSION: the Python side writes and checks this version.
constexpr uint32_t kFormatVersion = 4;

// One expert blob in a 4 KiB aligned buffer (as O_DIRECT wants it). The buffer
// is its own anonymous mapping of exactly `capacity` bytes: no allocator slack,
// and its pages go back to the OS when the blob is destroyed (a cache under a
// hard memory limit must not leave freed buffers in the heap). The cache's
// fixed overhead beyond its budget is listed in cache.h.
struct Blob {
  Blob(uint64_t capacity);
  ~Blob();
  Blob(const Blob&) = delete;
  Blob& operator=(const Blob&) = delete;
  uint8_t* base = nullptr;        // aligned allocation
  uint64_t capacity = 0;          // multiple of 4096
  const uint8_t* data = nullptr;  // the blob's first byte (inside base)
  uint64_t size = 0;              // the blob's exact length
};

// When read() checks a blob's CRC-32C. kFirstRead (the default) checks each blob
// the first time it is read by this store and trusts later reads of it: a file
// damaged on disk or in transit fails on its first read, and a cache that reads
// an expert again after evicting it does not pay for the check every time (on a
// 2-core board that CPU competes with the layer's compute). kEveryRead also
// catches a blob that changes between reads (a file rewritten under a running
// process, a flash that returns different bytes).
enum class Verify : uint8_t { kNever, kFirstRead, kEveryRead };

// "never", "first read" or "every read".
const char* verify_name(Verify v);

class ExpertStore {
 public:
  // offsets/sizes/checksums: [num_layers * num_experts], row-major; size 0 = no expert.
  // Throws ModelDirectoryError if the file is missing, not an experts file, or a
  // blob lies beyond its end (truncated). read_bytes_per_s / read_latency_s > 0
  // emulate slower storage (see set_throttle).
  ExpertStore(std::string path, uint32_t num_layers, uint32_t num_experts, std::vector<uint64_t> offsets,
              std::vector<uint64_t> sizes, std::vector<uint32_t> checksums, bool direct, Verify verify,
              double read_bytes_per_s = 0, double read_latency_s = 0);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // One pread into an aligned buffer (`reuse` if it has exactly the capacity
  // needed, else a fresh one); verifies the CRC-32C (as `verify` says) and the blob
  // header. Thread-safe. Throws CorruptExpertError (checksum or blob header),
  // ExpertReadError (an I/O error, or the file now ends before the blob),
  // std::invalid_argument (bad layer/expert). A failed read leaves the store usable:
  // the next read of the blob tries the file again.
  //
  // A file changed under the running store: with kFirstRead, a read that finds
  // the file's size, mtime or ctime different from when it last looked (or
  // modified in the last two seconds, within the clock's coarse granularity)
  // forgets which blobs were checked, so each is checked again on its next read.
  // A file replaced by rename keeps being read from the old inode, unchanged.
  std::shared_ptr<Blob> read(uint32_t layer, uint32_t expert, std::shared_ptr<Blob> reuse = nullptr) const;

  bool direct() const { return direct_.load(); }
  Verify verify() const { return verify_; }
  const std::string& path() const { return path_; }
  uint32_t num_layers() const { return num_layers_; }
  uint32_t num_experts() const { return num_experts_; }
  uint64_t file_bytes() const { return file_bytes_; }
  uint64_t blob_size(uint32_t layer, uint32_t expert) const;  // 0 = no such expert
  uint64_t buffer_bytes(uint32_t layer, uint32_t expert) const {
    return (blob_size(layer, expert) + 4095) / 4096 * 4096;
  }
  // Bytes of the aligned buffer read() uses (whole pages around the blob).
  uint64_t read_capacity(uint32_t layer, uint32_t expert) const;
  // Throws std::invalid_argument naming the range when out of range.
  void check_index(uint32_t layer, uint32_t expert) const;
  // Evicts the file from the OS page cache (benchmarks of buffered reads).
  void drop_page_cache() const;

  // Storage emulation: a read of n bytes takes at least latency + n / bandwidth,
  // and concurrent reads share the bandwidth (one transfer schedule for all
  // threads; a read that finishes early sleeps until its slot ends). 0 = off.
  void set_throttle(double read_bytes_per_s, double read_latency_s);
  double read_bytes_per_s() const;
  double read_latency_s() const;

 private:
  size_t index(uint32_t layer, uint32_t expert) const { return size_t(layer) * num_experts_ + expert; }
  std::string who(uint32_t layer, uint32_t expert) const;

  std::string path_;
  uint32_t num_layers_, num_experts_;
  std::vector<uint64_t> offsets_, sizes_;
  std::vector<uint32_t> checksums_;
  Verify verify_;
  std::unique_ptr<std::atomic<bool>[]> verified_;  // [num_layers * num_experts]: kFirstRead's checked blobs
  // The file as last seen (size, mtime, ctime in ns): a change forgets verified_.
  struct Stamp {
    int64_t size = 0, mtime_ns = 0, ctime_ns = 0;
    bool operator==(const Stamp& o) const {
      return size == o.size && mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns;
    }
  };
  // True when this read must check its blob's CRC-32C because the file changed or is being written.
  bool file_changed() const;
  mutable std::mutex stamp_mu_;
  mutable Stamp stamp_;              // guarded by stamp_mu_
  mutable bool changed_ever_ = false;  // guarded by stamp_mu_: the file changed since it was opened
  int fd_ = -1;                                    // buffered
  int fd_direct_ = -1;                             // O_DIRECT, -1 when unavailable
  mutable std::atomic<bool> direct_{false};
  uint64_t file_bytes_ = 0;

  // When the emulated device may finish a read of n bytes issued now; advances the schedule.
  std::chrono::steady_clock::time_point throttle_slot(uint64_t n) const;
  mutable std::mutex throttle_mu_;
  double bytes_per_s_ = 0, latency_s_ = 0;                 // guarded by throttle_mu_
  mutable std::chrono::steady_clock::time_point free_at_;  // end of the last scheduled transfer
};

}  // namespace edgemoe
