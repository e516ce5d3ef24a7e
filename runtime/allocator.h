// Allocators with memory statistics. One allocator per device kind; the CUDA one (a caching
// allocator) registers itself when the CUDA backend is built.
#pragma once
#include <cstddef>
#include <cstdint>

#include "runtime/dtype.h"

namespace ievo {

struct MemoryStats {
  int64_t live_bytes = 0;      // bytes handed out and not yet freed
  int64_t peak_bytes = 0;      // high-water mark of live_bytes since the last reset
  int64_t reserved_bytes = 0;  // bytes held from the system (>= live for caching allocators)
  int64_t num_allocs = 0;      // number of allocate() calls
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p, size_t bytes) = 0;
  virtual MemoryStats stats() const = 0;
  virtual void reset_peak() = 0;
  // Drop cached blocks (no-op for the CPU allocator).
  virtual void empty_cache() {}
};

Allocator& allocator(Device d);
void set_allocator(Device d, Allocator* a);  // used by the CUDA backend at start-up
inline MemoryStats memory_stats(Device d) { return allocator(d).stats(); }

}  // namespace ievo
