#include "store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <new>
#include <thread>

#include "common.h"
#include "crc32c.h"

namespace edgemoe {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

int64_t ns_of(const struct timespec& t) { return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec; }

}  // namespace

// ---------------------------------------------------------------- Blob

Blob::Blob(uint64_t cap) : capacity(round_up(cap, kPage)) {
  void* p = ::mmap(nullptr, size_t(capacity), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  base = static_cast<uint8_t*>(p);
  data = base;
}

Blob::~Blob() { ::munmap(base, size_t(capacity)); }

// ---------------------------------------------------------------- ExpertStore

const char* verify_name(Verify v) {
  switch (v) {
    case Verify::kNever: return "never";
    case Verify::kFirstRead: return "first read";
    case Verify::kEveryRead: return "every read";
  }
  return "?";
}

ExpertStore::ExpertStore(std::string path, uint32_t num_layers, uint32_t num_experts, std::vector<uint64_t> offsets,
                         std::vector<uint64_t> sizes, std::vector<uint32_t> checksums, bool direct, Verify verify,
                         double read_bytes_per_s, double read_latency_s)
    : path_(std::move(path)),
      num_layers_(num_layers),
      num_experts_(num_experts),
      offsets_(std::move(offsets)),
      sizes_(std::move(sizes)),
      checksums_(std::move(checksums)),
      verify_(verify) {
  const size_t n = size_t(num_layers_) * num_experts_;
  verified_.reset(new std::atomic<bool>[n]);
  for (size_t i = 0; i < n; ++i) verified_[i].store(false, std::memory_order_relaxed);
  if (offsets_.size() != n || sizes_.size() != n || checksums_.size() != n)
    throw std::invalid_argument("offsets, sizes and checksums must all be [num_layers, num_experts]");
  set_throttle(read_bytes_per_s, read_latency_s);

  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0)
    throw ModelDirectoryError("cannot open the experts file " + path_ + ": " + errno_text(errno) +
                              ": check the model directory, or convert the model again");
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    ::close(fd_);
    throw ModelDirectoryError("cannot stat " + path_ + ": " + errno_text(err));
  }
  file_bytes_ = uint64_t(st.st_size);
  stamp_ = {int64_t(st.st_size), ns_of(st.st_mtim), ns_of(st.st_ctim)};

  try {
    if (file_bytes_ < kPage)
      throw ModelDirectoryError(
          path_ + " is " + std::to_string(file_bytes_) +
          " bytes, shorter than its 4096-byte header: the file is truncated, convert the model again");
    // The header, read through O_DIRECT when asked for: this also probes whether
    // the filesystem accepts O_DIRECT (tmpfs and some FUSE mounts answer EINVAL).
    Blob header(kPage);
    bool have_header = false;
    if (direct) {
      fd_direct_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
      if (fd_direct_ >= 0) {
        ssize_t r;
        do r = ::pread(fd_direct_, header.base, kPage, 0);
        while (r < 0 && errno == EINTR);
        if (r == ssize_t(kPage)) {
          have_header = true;
          direct_ = true;
        } else {
          ::close(fd_direct_);
          fd_direct_ = -1;
        }
      }
    }
    if (!have_header) {
      uint64_t got = 0;
      while (got < kPage) {
        const ssize_t r = ::pread(fd_, header.base + got, kPage - got, off_t(got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) throw ModelDirectoryError("cannot read the header of " + path_ + ": " + errno_text(errno));
        got += uint64_t(r);
      }
    }
    if (std::memcmp(header.base, "EDGEMOEX", 8) != 0)
      throw ModelDirectoryError(path_ + " is not an edgemoe experts file (bad magic): convert the model again");
    const uint32_t version = load_u32(header.base + 8);  // 4 added kind 5 (MXFP4), 3 two-matrix experts, 2 kind 4; 1 still reads
    if (version > kFormatVersion)
      throw ModelDirectoryError(path_ + " has format_version " + std::to_string(version) +
                                ", this edgemoe reads up to " + std::to_string(kFormatVersion) + ": upgrade edgemoe");

    for (uint32_t l = 0; l < num_layers_; ++l)
      for (uint32_t e = 0; e < num_experts_; ++e) {
        const size_t i = index(l, e);
        if (sizes_[i] == 0) continue;
        if (sizes_[i] < 64)
          throw ModelDirectoryError(who(l, e) + " is " + std::to_string(sizes_[i]) +
                                    " bytes, too small for an expert blob: convert the model again");
        if (offsets_[i] > file_bytes_ || sizes_[i] > file_bytes_ - offsets_[i])
          throw ModelDirectoryError(who(l, e) + " at bytes [" + std::to_string(offsets_[i]) + ", " +
                                    std::to_string(offsets_[i] + sizes_[i]) + ") lies beyond the end of " + path_ +
                                    " (" + std::to_string(file_bytes_) +
                                    " bytes): the file is truncated, convert the model again");
      }
  } catch (...) {
    ::close(fd_);
    if (fd_direct_ >= 0) ::close(fd_direct_);
    throw;
  }
}

ExpertStore::~ExpertStore() {
  ::close(fd_);
  if (fd_direct_ >= 0) ::close(fd_direct_);
}

std::string ExpertStore::who(uint32_t layer, uint32_t expert) const {
  return "expert " + std::to_string(expert) + " of layer " + std::to_string(layer);
}

void ExpertStore::check_index(uint32_t layer, uint32_t expert) const {
  if (layer >= num_layers_)
    throw std::invalid_argument("layer " + std::to_string(layer) + " is out of range: the experts file has " +
                                std::to_string(num_layers_) + " layers");
  if (expert >= num_experts_)
    throw std::invalid_argument("expert " + std::to_string(expert) + " is out of range: layer " +
                                std::to_string(layer) + " has " + std::to_string(num_experts_) + " experts");
}

uint64_t ExpertStore::blob_size(uint32_t layer, uint32_t expert) const {
  check_index(layer, expert);
  return sizes_[index(layer, expert)];
}

uint64_t ExpertStore::read_capacity(uint32_t layer, uint32_t expert) const {
  check_index(layer, expert);
  const size_t i = index(layer, expert);
  return round_up(offsets_[i] % kPage + sizes_[i], kPage);
}

void ExpertStore::drop_page_cache() const { ::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED); }

void ExpertStore::set_throttle(double read_bytes_per_s, double read_latency_s) {
  if (!(read_bytes_per_s >= 0) || !(read_latency_s >= 0) || std::isinf(read_bytes_per_s) || std::isinf(read_latency_s))
    throw std::invalid_argument("read_bytes_per_s and read_latency_s must be finite and >= 0 (0 = no throttling)");
  std::lock_guard<std::mutex> lk(throttle_mu_);
  bytes_per_s_ = read_bytes_per_s;
  latency_s_ = read_latency_s;
}

double ExpertStore::read_bytes_per_s() const {
  std::lock_guard<std::mutex> lk(throttle_mu_);
  return bytes_per_s_;
}

double ExpertStore::read_latency_s() const {
  std::lock_guard<std::mutex> lk(throttle_mu_);
  return latency_s_;
}

std::chrono::steady_clock::time_point ExpertStore::throttle_slot(uint64_t n) const {
  using clock = std::chrono::steady_clock;
  const auto now = clock::now();
  std::lock_guard<std::mutex> lk(throttle_mu_);
  if (bytes_per_s_ <= 0 && latency_s_ <= 0) return now;
  // The latency of concurrent reads overlaps (a device queue); their transfers
  // share one channel, scheduled back to back. Idle time earns no credit.
  const auto first_byte = now + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(latency_s_));
  if (bytes_per_s_ <= 0) return first_byte;
  const auto start = std::max(first_byte, free_at_);
  free_at_ =
      start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(double(n) / bytes_per_s_));
  return free_at_;
}

bool ExpertStore::file_changed() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return true;  // cannot tell: check
  const Stamp now{int64_t(st.st_size), ns_of(st.st_mtim), ns_of(st.st_ctim)};
  struct timespec wall {};
  ::clock_gettime(CLOCK_REALTIME, &wall);
  // Timestamps move in coarse ticks: a write in the same tick as the last look leaves them equal.
  const bool recent = ns_of(wall) - std::max(now.mtime_ns, now.ctime_ns) < 2000000000;
  std::lock_guard<std::mutex> lk(stamp_mu_);
  if (now == stamp_) return recent;
  stamp_ = now;
  changed_ever_ = true;
  const size_t n = size_t(num_layers_) * num_experts_;
  for (size_t i = 0; i < n; ++i) verified_[i].store(false, std::memory_order_relaxed);
  return true;
}

std::shared_ptr<Blob> ExpertStore::read(uint32_t layer, uint32_t expert, std::shared_ptr<Blob> reuse) const {
  check_index(layer, expert);
  const size_t i = index(layer, expert);
  const uint64_t size = sizes_[i];
  if (size == 0)
    throw std::invalid_argument("layer " + std::to_string(layer) + " has no expert " + std::to_string(expert));

  // O_DIRECT wants offset, length and buffer 4 KiB aligned: read whole pages
  // around the blob (the last blob may end mid-page at EOF: a short read).
  const uint64_t start = offsets_[i] / kPage * kPage, delta = offsets_[i] - start, want = delta + size;
  const uint64_t cap = read_capacity(layer, expert);
  auto blob =
      reuse && reuse->capacity == cap && reuse.use_count() == 1 ? std::move(reuse) : std::make_shared<Blob>(cap);
  blob->data = blob->base + delta;
  blob->size = size;

  const auto slot_end = throttle_slot(size);
  bool use_direct = direct_.load();
  uint64_t got = 0;
  while (got < want) {
    const int fd = use_direct ? fd_direct_ : fd_;
    const uint64_t len = use_direct ? blob->capacity - got : want - got;
    const ssize_t r = ::pread(fd, blob->base + got, size_t(len), off_t(start + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL && use_direct) {
        if (got == 0) direct_ = false;  // the filesystem refuses O_DIRECT: buffered from now on
        use_direct = false;
        continue;
      }
      throw ExpertReadError("reading " + who(layer, expert) + " from " + path_ + " failed: " + errno_text(errno) +
                            ": check the storage (dmesg), then try again");
    }
    if (r == 0) {
      struct stat st {};
      const uint64_t now = ::fstat(fd_, &st) == 0 ? uint64_t(st.st_size) : 0;
      throw ExpertReadError(who(layer, expert) + " ends beyond the end of " + path_ + ", which is now " +
                            std::to_string(now) + " bytes (" + std::to_string(file_bytes_) +
                            " when the model was loaded): the file was truncated or is being rewritten; "
                            "restore it, or convert the model again");
    }
    got += uint64_t(r);
    if (use_direct && got % kPage != 0) use_direct = false;  // short read mid-file: finish buffered
  }

  bool check = verify_ == Verify::kEveryRead;
  if (verify_ == Verify::kFirstRead) {
    const bool changed = file_changed();  // after the read: a write that fed it has moved the timestamps
    check = changed || !verified_[i].load(std::memory_order_acquire);
  }
  if (check) {
    if (crc32c(blob->data, size) != checksums_[i]) {
      bool changed;
      {
        std::lock_guard<std::mutex> lk(stamp_mu_);
        changed = changed_ever_;
      }
      throw CorruptExpertError(who(layer, expert) + " failed its checksum in " + path_ +
                               (changed ? ", which changed while the model ran: restore the file, or load the model "
                                          "again from a complete conversion"
                                        : ": the file is damaged, convert the model again"));
    }
    verified_[i].store(true, std::memory_order_release);
  }
  const uint8_t* h = blob->data;
  if (std::memcmp(h, "EXPB", 4) != 0 || load_u32(h + 4) != layer || load_u32(h + 8) != expert)
    throw CorruptExpertError(who(layer, expert) + " in " + path_ +
                             " does not start with its own blob header: the file is damaged, convert the model again");
  std::this_thread::sleep_until(slot_end);  // storage emulation: no-op when the slot is already over
  return blob;
}

}  // namespace edgemoe
