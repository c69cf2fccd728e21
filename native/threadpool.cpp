#include "threadpool.h"

namespace edgemoe {

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

void ThreadPool::run_tasks() {
  for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
}

// A worker joins a job only while it is open (fn_ set); the caller closes it
// once every joined worker has left, so a worker the OS schedules late never
// holds the caller up: it finds the job closed and sleeps again.
void ThreadPool::worker() {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lk(m_);
  for (;;) {
    wake_.wait(lk, [&] { return stopping_ || generation_ != seen; });
    if (stopping_) return;
    seen = generation_;
    if (fn_ == nullptr) continue;  // that job is already over
    ++active_;
    lk.unlock();
    run_tasks();
    lk.lock();
    if (--active_ == 0) done_.notify_one();
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (!busy.owns_lock() || workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(m_);
    fn_ = &fn;
    n_ = n;
    next_ = 0;
    ++generation_;
  }
  wake_.notify_all();
  run_tasks();
  // Every task is claimed; wait for the workers still finishing theirs.
  std::unique_lock<std::mutex> lk(m_);
  done_.wait(lk, [&] { return active_ == 0; });
  fn_ = nullptr;
}

}  // namespace edgemoe
