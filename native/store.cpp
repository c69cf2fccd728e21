#include "store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common.h"
#include "crc32c.h"
#include "kernels.h"

namespace edgemoe {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

// ---------------------------------------------------------------- Blob

Blob::Blob(uint64_t cap) : capacity(cap) {
  base = static_cast<uint8_t*>(std::aligned_alloc(kPage, size_t(cap)));
  if (base == nullptr) throw std::bad_alloc();
  data = base;
}

Blob::~Blob() { std::free(base); }

// ---------------------------------------------------------------- ExpertStore

ExpertStore::ExpertStore(std::string path, uint32_t num_layers, uint32_t num_experts, std::vector<uint64_t> offsets,
                         std::vector<uint64_t> sizes, std::vector<uint32_t> checksums, bool direct, bool verify)
    : path_(std::move(path)),
      num_layers_(num_layers),
      num_experts_(num_experts),
      offsets_(std::move(offsets)),
      sizes_(std::move(sizes)),
      checksums_(std::move(checksums)),
      verify_(verify) {
  const size_t n = size_t(num_layers_) * num_experts_;
  if (offsets_.size() != n || sizes_.size() != n || checksums_.size() != n)
    throw std::invalid_argument("offsets, sizes and checksums must all be [num_layers, num_experts]");

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

  try {
    if (file_bytes_ < kPage)
      throw ModelDirectoryError(path_ + " is " + std::to_string(file_bytes_) +
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
    const uint32_t version = load_u32(header.base + 8);
    if (version > 1)
      throw ModelDirectoryError(path_ + " has format_version " + std::to_string(version) +
                                ", this edgemoe reads up to 1: upgrade edgemoe");

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

std::shared_ptr<Blob> ExpertStore::read(uint32_t layer, uint32_t expert, std::shared_ptr<Blob> reuse) const {
  check_index(layer, expert);
  const size_t i = index(layer, expert);
  const uint64_t size = sizes_[i];
  if (size == 0) throw std::invalid_argument("layer " + std::to_string(layer) + " has no expert " + std::to_string(expert));

  // O_DIRECT wants offset, length and buffer 4 KiB aligned: read whole pages
  // around the blob (the last blob may end mid-page at EOF: a short read).
  const uint64_t start = offsets_[i] / kPage * kPage, delta = offsets_[i] - start, want = delta + size;
  const uint64_t cap = read_capacity(layer, expert);
  auto blob = reuse && reuse->capacity == cap && reuse.use_count() == 1 ? std::move(reuse) : std::make_shared<Blob>(cap);
  blob->data = blob->base + delta;
  blob->size = size;

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
      throw std::runtime_error("reading " + who(layer, expert) + " from " + path_ + " failed: " + errno_text(errno));
    }
    if (r == 0)
      throw ModelDirectoryError(who(layer, expert) + " ends beyond the end of " + path_ +
                                ": the file is truncated, convert the model again");
    got += uint64_t(r);
    if (use_direct && got % kPage != 0) use_direct = false;  // short read mid-file: finish buffered
  }

  if (verify_ && crc32c(blob->data, size) != checksums_[i])
    throw CorruptExpertError(who(layer, expert) + " failed its checksum in " + path_ +
                             ": the file is damaged, convert the model again");
  const uint8_t* h = blob->data;
  if (std::memcmp(h, "EXPB", 4) != 0 || load_u32(h + 4) != layer || load_u32(h + 8) != expert)
    throw CorruptExpertError(who(layer, expert) + " in " + path_ +
                             " does not start with its own blob header: the file is damaged, convert the model again");
  return blob;
}

// ---------------------------------------------------------------- PinnedExpert

PinnedExpert::PinnedExpert(PinnedExpert&& o) noexcept
    : cache_(o.cache_), key_(o.key_), blob_(std::move(o.blob_)) {
  o.cache_ = nullptr;
}

PinnedExpert& PinnedExpert::operator=(PinnedExpert&& o) noexcept {
  if (this != &o) {
    release();
    cache_ = o.cache_;
    key_ = o.key_;
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

// ---------------------------------------------------------------- ExpertCache

ExpertCache::ExpertCache(std::shared_ptr<ExpertStore> store, uint64_t budget_bytes)
    : store_(std::move(store)), budget_(budget_bytes) {
  entries_.resize(size_t(store_->num_layers()) * store_->num_experts());
  stats_.direct_io = store_->direct();
}

bool ExpertCache::ensure_resident(std::unique_lock<std::mutex>& lk, uint32_t layer, uint32_t expert) {
  const size_t key = size_t(layer) * store_->num_experts() + expert;
  Entry& en = entries_[key];  // entries_ never resizes: references stay valid
  for (;;) {
    if (en.state == State::kReady) return false;
    if (en.state == State::kAbsent) break;
    loaded_.wait(lk);  // another thread is reading it: wait for that one read
  }
  const uint64_t need = store_->buffer_bytes(layer, expert);
  std::vector<std::shared_ptr<Blob>> evicted;
  make_room(need, layer, expert, evicted);
  std::shared_ptr<Blob> reuse;
  for (auto& b : evicted)
    if (b->capacity == store_->read_capacity(layer, expert) && b.use_count() == 1) reuse = std::move(b);
  en.state = State::kLoading;
  en.bytes = need;
  stats_.resident_bytes += need;  // reserved now so concurrent loads respect the budget
  stats_.peak_resident_bytes = std::max(stats_.peak_resident_bytes, stats_.resident_bytes);

  lk.unlock();
  evicted.clear();  // free the buffers we do not reuse outside the lock
  const auto t0 = std::chrono::steady_clock::now();
  std::shared_ptr<Blob> blob;
  try {
    blob = store_->read(layer, expert, std::move(reuse));
  } catch (...) {
    lk.lock();
    en.state = State::kAbsent;
    stats_.resident_bytes -= en.bytes;
    en.bytes = 0;
    loaded_.notify_all();
    throw;
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  lk.lock();

  en.blob = std::move(blob);
  en.state = State::kReady;
  en.lru = lru_.insert(lru_.end(), key);
  stats_.loads += 1;
  stats_.bytes_read += en.blob->size;
  stats_.read_seconds += dt;
  stats_.direct_io = store_->direct();
  loaded_.notify_all();
  return true;
}

void ExpertCache::make_room(uint64_t need, uint32_t layer, uint32_t expert,
                            std::vector<std::shared_ptr<Blob>>& evicted) {
  if (budget_ == 0) return;
  const std::string what = "expert " + std::to_string(expert) + " of layer " + std::to_string(layer) + " (" +
                           std::to_string(need) + " bytes)";
  if (need > budget_)
    throw BudgetError("the expert cache budget of " + std::to_string(budget_) + " bytes cannot hold " + what +
                      ": raise the budget to at least " + std::to_string(need) + " bytes");
  for (auto it = lru_.begin(); stats_.resident_bytes + need > budget_ && it != lru_.end();) {
    const size_t k = *it++;
    if (entries_[k].pins == 0) evicted.push_back(evict(k));
  }
  if (stats_.resident_bytes + need > budget_)
    throw BudgetError("the expert cache budget of " + std::to_string(budget_) + " bytes cannot hold " + what +
                      " next to the " + std::to_string(stats_.resident_bytes) +
                      " bytes of experts in use (pinned or being read): raise the budget to at least " +
                      std::to_string(stats_.resident_bytes + need) + " bytes");
}

std::shared_ptr<Blob> ExpertCache::evict(size_t key) {
  Entry& en = entries_[key];
  assert(en.state == State::kReady && en.pins == 0);
  lru_.erase(en.lru);
  stats_.resident_bytes -= en.bytes;
  en.bytes = 0;
  en.state = State::kAbsent;
  stats_.evictions += 1;
  return std::move(en.blob);
}

PinnedExpert ExpertCache::acquire(uint32_t layer, uint32_t expert) {
  if (store_->blob_size(layer, expert) == 0)
    throw std::invalid_argument("layer " + std::to_string(layer) + " has no expert " + std::to_string(expert));
  const size_t key = size_t(layer) * store_->num_experts() + expert;
  std::unique_lock<std::mutex> lk(mu_);
  if (entries_[key].state == State::kReady)
    stats_.hits += 1;
  else
    stats_.misses += 1;
  ensure_resident(lk, layer, expert);
  Entry& en = entries_[key];
  en.pins += 1;
  lru_.splice(lru_.end(), lru_, en.lru);  // most recently used
  return PinnedExpert(this, key, en.blob);
}

bool ExpertCache::prefetch(uint32_t layer, uint32_t expert) {
  if (store_->blob_size(layer, expert) == 0)
    throw std::invalid_argument("layer " + std::to_string(layer) + " has no expert " + std::to_string(expert));
  std::unique_lock<std::mutex> lk(mu_);
  return ensure_resident(lk, layer, expert);
}

void ExpertCache::unpin(size_t key) {
  std::lock_guard<std::mutex> lk(mu_);
  assert(entries_[key].pins > 0);
  entries_[key].pins -= 1;
}

bool ExpertCache::contains(uint32_t layer, uint32_t expert) const {
  store_->check_index(layer, expert);
  std::lock_guard<std::mutex> lk(mu_);
  return entries_[size_t(layer) * store_->num_experts() + expert].state == State::kReady;
}

void ExpertCache::clear() {
  std::vector<std::shared_ptr<Blob>> evicted;  // freed after the lock is released
  std::lock_guard<std::mutex> lk(mu_);
  for (auto it = lru_.begin(); it != lru_.end();) {
    const size_t k = *it++;
    if (entries_[k].pins == 0) evicted.push_back(evict(k));
  }
}

CacheStats ExpertCache::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void ExpertCache::reset_stats() {
  std::lock_guard<std::mutex> lk(mu_);
  const uint64_t resident = stats_.resident_bytes;
  stats_ = CacheStats{};
  stats_.resident_bytes = resident;
  stats_.peak_resident_bytes = resident;
  stats_.direct_io = store_->direct();
}

uint64_t ExpertCache::resident_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_.resident_bytes;
}

// ---------------------------------------------------------------- moe_forward

void moe_forward(ExpertCache& cache, uint32_t layer, const float* x, int64_t T, int64_t H, const int32_t* ids,
                 const float* weights, int64_t K, float* y) {
  // x [T, H], ids/weights [T, K] -> y [T, H]
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
    slots[size_t(e)].push_back(i);
  }
  std::fill(y, y + T * H, 0.0f);

  // Resident experts first, so loading the others cannot evict one we still need.
  std::vector<uint32_t> order;
  for (uint32_t e = 0; e < E; ++e)
    if (!slots[e].empty() && cache.contains(layer, e)) order.push_back(e);
  for (uint32_t e = 0; e < E; ++e)
    if (!slots[e].empty() && !cache.contains(layer, e)) order.push_back(e);
  // A token may appear more than once per expert only if the router repeated it.
  std::vector<float> xb, yb;
  for (uint32_t e : order) {
    const auto& s = slots[e];
    const auto n = int64_t(s.size());
    PinnedExpert pin = cache.acquire(layer, e);
    const Expert ex = parse_expert(pin.blob().data, pin.blob().size);
    if (int64_t(ex.hidden()) != H)
      throw std::invalid_argument("x has hidden size " + std::to_string(H) + " but expert " + std::to_string(e) +
                                  " of layer " + std::to_string(layer) + " expects " + std::to_string(ex.hidden()));
    xb.resize(size_t(n * H));  // gathered tokens [n, H]
    yb.resize(size_t(n * H));  // their expert outputs [n, H]
    for (int64_t j = 0; j < n; ++j) std::memcpy(&xb[size_t(j * H)], x + (s[size_t(j)] / K) * H, size_t(H) * 4);
    expert_forward(ex, xb.data(), n, yb.data());
    pin.release();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = s[size_t(j)] / K;
      const float w = weights[s[size_t(j)]];
      float* yt = y + t * H;
      const float* src = &yb[size_t(j * H)];
      for (int64_t h = 0; h < H; ++h) yt[h] += w * src[h];
    }
  }
}

}  // namespace edgemoe
