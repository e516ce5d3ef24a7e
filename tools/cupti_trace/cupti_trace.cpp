// A CUPTI activity tracer loaded into any CUDA program by the driver (no profiler binary needed:
// the lent device has ncu but no working nsys). It records every kernel, memcpy, memset,
// synchronisation, CUDA runtime call and NVTX range with CUPTI's timestamps (one clock for host
// and device) and writes them as CSV at exit; tools/cupti_trace.py reads them.
//
//   tools/cupti_trace.sh OUT.csv build/ievo bench configs/llama-134m.yaml --steps 2 --warmup 1
// which sets CUDA_INJECTION64_PATH (build/tools/libievo_cupti_trace.so), NVTX_INJECTION64_PATH
// (libcupti, for the NVTX ranges) and IEVO_TRACE_OUT.
//
// Rows: kind,start_ns,end_ns,stream_or_thread,correlation,name. Kinds: K kernel, C memcpy (name =
// bytes and direction), S memset (bytes), Y synchronisation (its type), A runtime and D driver
// API call (its name; the column holds the thread; libraries such as cuBLASLt launch through the
// driver), M an NVTX range's start or end (end_ns = 0 for a start,
// start_ns = 0 for an end; the correlation column holds the range id).
#include <cupti.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

std::mutex g_mu;
std::FILE* g_out = nullptr;

#define TRACE_CUPTI(call)                                                           \
  do {                                                                              \
    CUptiResult r_ = (call);                                                        \
    if (r_ != CUPTI_SUCCESS) {                                                      \
      const char* s_ = nullptr;                                                     \
      cuptiGetResultString(r_, &s_);                                                \
      std::fprintf(stderr, "cupti_trace: %s failed: %s\n", #call, s_ ? s_ : "?"); \
    }                                                                               \
  } while (0)

// Names go into a CSV column: commas and quotes are replaced.
std::string clean(const char* s) {
  std::string r = s ? s : "";
  for (char& c : r)
    if (c == ',' || c == '"' || c == '\n') c = ';';
  return r;
}

void row(char kind, uint64_t start, uint64_t end, uint64_t where, uint64_t corr, const std::string& name) {
  std::fprintf(g_out, "%c,%llu,%llu,%llu,%llu,%s\n", kind, static_cast<unsigned long long>(start),
               static_cast<unsigned long long>(end), static_cast<unsigned long long>(where),
               static_cast<unsigned long long>(corr), name.c_str());
}

const char* copy_kind(uint8_t k) {
  switch (k) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "DtoD";
    default: return "other";
  }
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = size_t{16} << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(g_mu);
  CUpti_Activity* rec = nullptr;
  while (g_out && cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        auto* k = reinterpret_cast<CUpti_ActivityKernel10*>(rec);
        row('K', k->start, k->end, k->streamId, k->correlationId, clean(k->name));
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        auto* m = reinterpret_cast<CUpti_ActivityMemcpy6*>(rec);
        row('C', m->start, m->end, m->streamId, m->correlationId,
            std::to_string(m->bytes) + " " + copy_kind(m->copyKind));
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        auto* m = reinterpret_cast<CUpti_ActivityMemset4*>(rec);
        row('S', m->start, m->end, m->streamId, m->correlationId, std::to_string(m->bytes));
        break;
      }
      case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
        auto* s = reinterpret_cast<CUpti_ActivitySynchronization2*>(rec);
        row('Y', s->start, s->end, s->streamId, s->correlationId, std::to_string(static_cast<int>(s->type)));
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME:
      case CUPTI_ACTIVITY_KIND_DRIVER: {
        auto* a = reinterpret_cast<CUpti_ActivityAPI*>(rec);
        const bool rt = rec->kind == CUPTI_ACTIVITY_KIND_RUNTIME;
        const char* name = nullptr;
        cuptiGetCallbackName(rt ? CUPTI_CB_DOMAIN_RUNTIME_API : CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
        row(rt ? 'A' : 'D', a->start, a->end, a->threadId, a->correlationId, clean(name));
        break;
      }
      case CUPTI_ACTIVITY_KIND_MARKER: {
        auto* m = reinterpret_cast<CUpti_ActivityMarker2*>(rec);
        const bool start = (m->flags & CUPTI_ACTIVITY_FLAG_MARKER_START) != 0;
        row('M', start ? m->timestamp : 0, start ? 0 : m->timestamp, 0, m->id, clean(m->name));
        break;
      }
      default: break;
    }
  }
  std::free(buffer);
}

void finish() {
  cuptiActivityFlushAll(1);
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_out) {
    std::fclose(g_out);
    g_out = nullptr;
  }
}

}  // namespace

// Called by the CUDA driver when CUDA_INJECTION64_PATH names this library.
extern "C" int InitializeInjection(void) {
  const char* path = std::getenv("IEVO_TRACE_OUT");
  g_out = std::fopen(path && *path ? path : "ievo_trace.csv", "w");
  if (!g_out) {
    std::perror("cupti_trace: cannot open IEVO_TRACE_OUT");
    return 0;
  }
  std::fprintf(g_out, "kind,start_ns,end_ns,where,corr,name\n");
  TRACE_CUPTI(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed));
  for (CUpti_ActivityKind k : {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                               CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_SYNCHRONIZATION,
                               CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_DRIVER,
                               CUPTI_ACTIVITY_KIND_MARKER})
    TRACE_CUPTI(cuptiActivityEnable(k));
  std::atexit(finish);
  return 1;
}
