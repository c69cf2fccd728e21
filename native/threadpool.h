// A small persistent thread pool for the kernels: a matmul costs a few atomic
// operations, not a thread spawn. Workers spin briefly after each job (decode
// issues small matmuls back to back and a futex wake-up costs more than one of
// them), then sleep on a condition variable.
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
  // How long a worker, and a caller waiting for workers, spins before sleeping (default
  // 200 us). A process that runs one job now and then (a device's expert server between
  // layer calls) sets 0, so its idle threads leave the cores to others at once.
  void set_spin_microseconds(int us);
  int spin_microseconds() const;
  // Wakes the workers that sleep, to spin for the spin time as after a job: a caller whose
  // thread waited on something else (a network answer) calls it as that wait ends, so the
  // parallel_for it issues next does not pay the workers' wake-up. Cheap when none sleeps.
  void wake();

  // Calls fn(i) for every i in [0, n) on the pool; the caller takes part and
  // returns when all are done. fn must not throw. If the pool is already busy
  // (a call from another thread, or from inside fn) the loop runs inline on the
  // calling thread instead of waiting, so nested and concurrent calls are safe.
  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

  // Whether jobs of these sizes, each run whole on one thread (taken in turn by the least
  // loaded), leave no thread more than a quarter above an even share: the rule by which a
  // token's experts run one per thread instead of each split over the threads.
  bool whole_jobs_even(const std::vector<uint64_t>& sizes) const;

 private:
  ThreadPool();
  void start(int n);
  void stop();
  void worker();
  void run_tasks();

  std::mutex busy_;  // held for the whole of one parallel_for
  std::mutex m_;     // guards fn_, n_, sleeping_, joining a job and closing it
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> generation_{0};               // bumped (under m_) when a job opens
  uint64_t wakes_ = 0;                                // bumped (under m_) by wake()
  int sleeping_ = 0;                                  // workers blocked on wake_
  std::atomic<int> active_{0};                        // workers inside the current job
  const std::function<void(int64_t)>* fn_ = nullptr;  // null: no job open
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> num_threads_{1};
  std::atomic<int> spin_us_{200};
};

}  // namespace edgemoe
