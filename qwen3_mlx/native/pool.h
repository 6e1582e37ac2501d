// The worker pool every op shares: the calling (MLX stream) thread works too, and chunks come
// from one atomic counter, so a descheduled worker never holds an op up.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace native {
// ---------------------------------------------------------------------------------------------
// Worker pool: the calling (MLX stream) thread works too; chunks come from one atomic counter

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Run work(chunk) for chunk in [0, chunks) on up to `threads` threads, this one included.
  void run(int threads, int64_t chunks, const std::function<void(int64_t)>& work) {
    // One job at a time: a call from a second MLX stream while one runs works alone.
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (threads > 1 && chunks > 1 && busy.owns_lock()) {
      grow(threads - 1);
      std::lock_guard<std::mutex> lock(mutex_);
      work_ = &work;
      chunks_ = chunks;
      next_.store(0);
      wanted_ = threads - 1;
      generation_.fetch_add(1);
    } else {
      for (int64_t c = 0; c < chunks; ++c) work(c);
      return;
    }
    wake_.notify_all();
    drain(work);
    // The last chunks are in flight on other threads: they end within one chunk's time, so spin
    // briefly before sleeping (a futex sleep and wake cost about what a small mat-vec does).
    for (int i = 0; i < 4000 && inside_.load(std::memory_order_acquire) != 0; ++i) {
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return inside_.load() == 0; });
    work_ = nullptr;
  }

 private:
  void drain(const std::function<void(int64_t)>& work) {
    for (int64_t c = next_.fetch_add(1); c < chunks_; c = next_.fetch_add(1)) work(c);
  }

  void grow(int workers) {
    while (int(threads_.size()) < workers) {
      int index = int(threads_.size());
      threads_.emplace_back([this, index] { loop(index); });
    }
  }

  void loop(int index) {
    uint64_t seen = generation_.load();
    while (true) {
      // Spin briefly (ops come back to back within one token), then sleep.
      for (int i = 0; i < 2000 && generation_.load(std::memory_order_acquire) == seen; ++i) {
#if defined(__x86_64__) || defined(_M_X64)
        _mm_pause();
#endif
      }
      const std::function<void(int64_t)>* work = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (stop_) return;
        if (work_ == nullptr || index >= wanted_) continue;
        work = work_;
        ++inside_;
      }
      drain(*work);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--inside_ == 0) done_.notify_all();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_, mutex_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  const std::function<void(int64_t)>* work_ = nullptr;
  int64_t chunks_ = 0;
  int wanted_ = 0;
  std::atomic<int> inside_{0};
  bool stop_ = false;
};

inline Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: workers may outlive static teardown
  return *instance;
}

}  // namespace native
