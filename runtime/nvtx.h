// NVTX ranges for Nsight Systems timelines (forward, backward, optimizer, communication, ...).
//   IEVO_NVTX_RANGE("optimizer");   // a range until the end of the enclosing scope
//   nvtx::push("forward"); ...; nvtx::pop();
// With the CUDA backend this uses the header-only NVTX v3 of the CUDA toolkit
// (<nvtx3/nvToolsExt.h>; it costs nothing unless a profiler is attached); without CUDA every
// call compiles to nothing.
#pragma once

#ifdef IEVO_CUDA
#include <nvtx3/nvToolsExt.h>
#endif

namespace ievo::nvtx {

inline void push(const char* name) {
#ifdef IEVO_CUDA
  nvtxRangePushA(name);
#else
  (void)name;
#endif
}

inline void pop() {
#ifdef IEVO_CUDA
  nvtxRangePop();
#endif
}

class Range {
 public:
  explicit Range(const char* name) { push(name); }
  ~Range() { pop(); }
  Range(const Range&) = delete;
  Range& operator=(const Range&) = delete;
};

}  // namespace ievo::nvtx

#define IEVO_NVTX_CAT2(a, b) a##b
#define IEVO_NVTX_CAT(a, b) IEVO_NVTX_CAT2(a, b)
#define IEVO_NVTX_RANGE(name) ::ievo::nvtx::Range IEVO_NVTX_CAT(ievo_nvtx_range_, __LINE__)(name)
