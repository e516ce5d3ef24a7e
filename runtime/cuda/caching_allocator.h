// The CUDA caching allocator (internal to runtime/cuda): cudaMalloc'd blocks are kept after
// deallocate() and handed out again, best fit, to later requests on the same stream.
//   sizes < 1 MiB are rounded up to 512 B, larger ones to 2 MiB (the driver's page size);
//   a cached block serves a request if it is at most 25% larger;
//   when cudaMalloc fails, every cached block is released and the call retried once.
// Statistics: live = bytes requested and not yet freed, peak = its high-water mark, reserved =
// bytes held from cudaMalloc (live blocks + cache).
#pragma once
#include "runtime/allocator.h"

namespace ievo::cuda {

Allocator* caching_allocator();  // the process-wide instance (never destroyed)

}  // namespace ievo::cuda
