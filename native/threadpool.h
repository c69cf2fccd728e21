// A small persistent thread pool for the kernels: workers sleep on a condition
// variable between calls, so a matmul costs a wake-up, not a thread spawn.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace edgemoe {

class ThreadPool {
 public:
  static ThreadPool& instance();

  ~ThreadPool();
  // Threads that run a parallel_for, the calling thread included (>= 1).
  void set_num_threads(int n);
  int num_threads() const;

  // Calls fn(i) for every i in [0, n) on the pool; the caller takes part and
  // returns when all are done. fn must not throw. If the pool is already busy
  // (a call from another thread, or from inside fn) the loop runs inline on the
  // calling thread instead of waiting, so nested and concurrent calls are safe.
  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  ThreadPool();
  void start(int n);
  void stop();
  void worker();
  void run_tasks();

  std::mutex busy_;  // held for the whole of one parallel_for
  std::mutex m_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
  uint64_t generation_ = 0;
  int active_ = 0;  // workers that joined the current job and have not left it
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> num_threads_{1};
};

}  // namespace edgemoe
