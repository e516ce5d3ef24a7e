#include "runtime/cuda/caching_allocator.h"

#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <unordered_map>

#include "runtime/cuda/check.h"
#include "runtime/cuda/cuda.h"

namespace ievo::cuda {
namespace {

constexpr size_t kSmall = size_t{1} << 20;      // requests below this round to kSmallRound
constexpr size_t kSmallRound = 512;
constexpr size_t kLargeRound = size_t{2} << 20;  // 2 MiB

size_t round_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  const size_t r = bytes < kSmall ? kSmallRound : kLargeRound;
  return (bytes + r - 1) / r * r;
}

class CachingAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    const size_t size = round_size(bytes);
    cudaStream_t stream = current_stream();  // initializes the device on first use
    std::lock_guard<std::mutex> lock(mu_);
    void* p = take_cached(stream, size);
    if (!p) {
      p = device_malloc(size, bytes);
      blocks_size_[p] = size;
      reserved_ += static_cast<int64_t>(size);
    }
    live_blocks_[p] = Live{stream, bytes};
    live_ += static_cast<int64_t>(bytes);
    if (live_ > peak_) peak_ = live_;
    ++num_allocs_;
    return p;
  }

  void deallocate(void* p, size_t /*bytes*/) override {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_blocks_.find(p);
    if (it == live_blocks_.end()) return;  // not ours (cannot happen through Tensor)
    live_ -= static_cast<int64_t>(it->second.requested);
    free_[it->second.stream].emplace(blocks_size_.at(p), p);
    live_blocks_.erase(it);
  }

  MemoryStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    MemoryStats s;
    s.live_bytes = live_;
    s.peak_bytes = peak_;
    s.reserved_bytes = reserved_;
    s.num_allocs = num_allocs_;
    return s;
  }

  void reset_peak() override {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = live_;
  }

  void empty_cache() override {
    std::lock_guard<std::mutex> lock(mu_);
    release_cached();
  }

 private:
  struct Live {
    cudaStream_t stream;
    size_t requested;
  };

  // Best fit among the stream's cached blocks: the smallest >= size and <= 1.25 size.
  void* take_cached(cudaStream_t stream, size_t size) {
    auto fit = free_.find(stream);
    if (fit == free_.end()) return nullptr;
    auto& pool = fit->second;
    auto it = pool.lower_bound(size);
    if (it == pool.end() || it->first > size + size / 4) return nullptr;
    void* p = it->second;
    pool.erase(it);
    return p;
  }

  void* device_malloc(size_t size, size_t requested) {
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      release_cached();
      e = cudaMalloc(&p, size);
    }
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      (void)cudaMemGetInfo(&free_b, &total_b);
      IEVO_FAIL("CUDA out of memory: cudaMalloc of ", size, " bytes (request ", requested,
                ") failed with ", cudaGetErrorName(e), "; ievo holds ", reserved_,
                " bytes (live ", live_, "), device free ", free_b, " of ", total_b, " bytes");
    }
    return p;
  }

  void release_cached() {
    for (auto& [stream, pool] : free_) {
      for (auto& [size, p] : pool) {
        // cudaFree waits for outstanding work on the device that may still use the block.
        (void)cudaFree(p);
        blocks_size_.erase(p);
        reserved_ -= static_cast<int64_t>(size);
      }
      pool.clear();
    }
  }

  mutable std::mutex mu_;
  std::unordered_map<void*, size_t> blocks_size_;  // every block held from cudaMalloc
  std::unordered_map<void*, Live> live_blocks_;    // handed out
  std::unordered_map<cudaStream_t, std::multimap<size_t, void*>> free_;  // cached, per stream
  int64_t live_ = 0, peak_ = 0, reserved_ = 0, num_allocs_ = 0;
};

}  // namespace

Allocator* caching_allocator() {
  static CachingAllocator* a = new CachingAllocator();  // leaked: tensors may die at exit
  return a;
}

}  // namespace ievo::cuda
