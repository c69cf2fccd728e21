#include "threadpool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace edgemoe {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
  asm volatile("yield");
#endif
}

// Spins until pred() or about `us` microseconds have passed; returns pred().
template <class Pred>
bool spin_for(Pred pred, int us) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (int i = 0;; ++i) {
    if (pred()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > end) return pred();
  }
}

}  // namespace

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::ThreadPool() {
  const unsigned hw = std::thread::hardware_concurrency();
  start(hw == 0 ? 1 : int(hw));
}

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::start(int n) {
  stopping_ = false;
  num_threads_ = n;
  for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker(); });
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lk(m_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::set_num_threads(int n) {
  if (n < 1) n = 1;
  std::lock_guard<std::mutex> busy(busy_);
  if (n == num_threads_) return;
  stop();
  start(n);
}

int ThreadPool::num_threads() const { return num_threads_; }

void ThreadPool::set_spin_microseconds(int us) { spin_us_.store(us < 0 ? 0 : us, std::memory_order_relaxed); }

int ThreadPool::spin_microseconds() const { return spin_us_.load(std::memory_order_relaxed); }

void ThreadPool::wake() {
  bool notify;
  {
    std::lock_guard<std::mutex> lk(m_);
    ++wakes_;
    notify = sleeping_ > 0;
  }
  if (notify) wake_.notify_all();
}

bool ThreadPool::whole_jobs_even(const std::vector<uint64_t>& sizes) const {
  const auto threads = size_t(num_threads());
  std::vector<uint64_t> load(threads, 0);
  uint64_t total = 0;
  for (const uint64_t b : sizes) {
    *std::min_element(load.begin(), load.end()) += b;
    total += b;
  }
  return double(*std::max_element(load.begin(), load.end())) <= 1.25 * double(total) / double(threads);
}

void ThreadPool::run_tasks() {
  for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
}

// A worker joins a job only while it is open (fn_ set, under m_); the caller
// closes it once every joined worker has left, so a worker the OS schedules
// late never holds the caller up: it finds the job closed and waits again.
void ThreadPool::worker() {
  uint64_t seen = generation_.load();
  for (;;) {
    spin_for([&] { return generation_.load(std::memory_order_acquire) != seen || stopping_.load(); },
             spin_us_.load(std::memory_order_relaxed));
    std::unique_lock<std::mutex> lk(m_);
    if (generation_.load() == seen && !stopping_) {
      const uint64_t woken = wakes_;
      ++sleeping_;
      wake_.wait(lk, [&] { return stopping_ || generation_.load() != seen || wakes_ != woken; });
      --sleeping_;
      if (generation_.load() == seen && !stopping_) continue;  // wake(): spin, ready for the next job
    }
    if (stopping_) return;
    seen = generation_.load();
    if (fn_ == nullptr) continue;  // that job is already over
    active_.fetch_add(1);
    lk.unlock();
    run_tasks();
    if (active_.fetch_sub(1) == 1) {
      std::lock_guard<std::mutex> g(m_);  // pairs with the caller's wait on done_
      done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (!busy.owns_lock() || workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  bool notify;
  {
    std::lock_guard<std::mutex> lk(m_);
    fn_ = &fn;
    n_ = n;
    next_ = 0;
    generation_.fetch_add(1, std::memory_order_release);
    notify = sleeping_ > 0;
  }
  if (notify) wake_.notify_all();
  run_tasks();
  // Every task is claimed; wait for the workers still finishing theirs, then close the job.
  spin_for([&] { return active_.load(std::memory_order_acquire) == 0; }, spin_us_.load(std::memory_order_relaxed));
  std::unique_lock<std::mutex> lk(m_);
  done_.wait(lk, [&] { return active_.load() == 0; });
  fn_ = nullptr;
}

}  // namespace edgemoe
