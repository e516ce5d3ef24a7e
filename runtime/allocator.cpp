#include "runtime/allocator.h"

#include <atomic>
#include <cstdlib>
#include <new>

#include "runtime/error.h"

namespace ievo {
namespace {

class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    size_t n = (bytes + 63) / 64 * 64;
    if (n == 0) n = 64;
    void* p = std::aligned_alloc(64, n);
    if (!p) IEVO_FAIL("out of host memory allocating ", bytes, " bytes");
    int64_t live = live_.fetch_add(static_cast<int64_t>(bytes)) + static_cast<int64_t>(bytes);
    int64_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
    allocs_.fetch_add(1);
    return p;
  }
  void deallocate(void* p, size_t bytes) override {
    if (!p) return;
    std::free(p);
    live_.fetch_sub(static_cast<int64_t>(bytes));
  }
  MemoryStats stats() const override {
    MemoryStats s;
    s.live_bytes = live_.load();
    s.peak_bytes = peak_.load();
    s.reserved_bytes = s.live_bytes;
    s.num_allocs = allocs_.load();
    return s;
  }
  void reset_peak() override { peak_.store(live_.load()); }

 private:
  std::atomic<int64_t> live_{0}, peak_{0}, allocs_{0};
};

CpuAllocator g_cpu;
Allocator* g_cuda = nullptr;

}  // namespace

Allocator& allocator(Device d) {
  if (d == Device::CPU) return g_cpu;
  IEVO_CHECK(g_cuda != nullptr, "CUDA device requested but this build has no CUDA backend");
  return *g_cuda;
}

void set_allocator(Device d, Allocator* a) {
  IEVO_CHECK(d == Device::CUDA, "only the CUDA allocator can be replaced");
  g_cuda = a;
}

}  // namespace ievo
