// The CUDA backend's device state: one GPU per process, a current stream that every ievo kernel
// and copy is issued on, events, and pinned host buffers.
//
// Initialization happens on first CUDA use (allocating a CUDA tensor, running a CUDA op) with
// the device chosen from the environment (LOCAL_RANK or OMPI_COMM_WORLD_LOCAL_RANK modulo the
// device count, else 0), or explicitly with init(device) before that. Including this header is
// only valid in builds with IEVO_CUDA.
//
// Streams: init() creates one non-blocking "compute" stream; it is the current stream until
// set_current_stream() changes it (e.g. a communication stream for overlapping ZeRO gathers).
// The caching allocator reuses a freed block only for allocations on the stream that allocated
// it; memory used on another stream must be kept alive (or synchronized with an Event) by the
// caller until that stream has finished with it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <limits>
#include <string>
#include <vector>

namespace ievo::cuda {

// True if a CUDA driver and at least one device are present. Never throws or aborts.
bool available();
int device_count();  // 0 without a driver

// Selects the device, creates the compute stream and registers the CUDA allocator and copy
// functions with the runtime. device < 0: choose from the environment (see above). Calling it
// again with the same device is a no-op; a different device after initialization is an error.
void init(int device = -1);
bool initialized();
int current_device();  // initializes if needed
const cudaDeviceProp& device_properties();
std::string device_description();  // "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)"

// The stream all ievo work is issued on (initializes if needed).
cudaStream_t current_stream();
// nullptr restores the compute stream.
void set_current_stream(cudaStream_t s);
cudaStream_t compute_stream();
void synchronize();  // the current stream

// Deterministic mode: paths that may use atomics pick their deterministic algorithms (cuDNN's
// attention backward; ievo's flash attention backward: its two-kernel form instead of the fused
// one with atomic dQ). ievo's other kernels are always deterministic. Default off.
void set_deterministic(bool on);
bool deterministic();

// Makes `s` current for a scope.
class StreamGuard {
 public:
  explicit StreamGuard(cudaStream_t s) : prev_(current_stream()) { set_current_stream(s); }
  ~StreamGuard() { set_current_stream(prev_); }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  cudaStream_t prev_;
};

// An owned non-blocking stream (e.g. for communication).
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// An owned event. timing=false events are cheaper (ordering only).
class Event {
 public:
  explicit Event(bool timing = false);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(cudaStream_t s = nullptr);  // nullptr: the current stream
  void wait(cudaStream_t s = nullptr);    // make stream s wait for this event
  void synchronize();                     // host waits
  bool query();                           // true if completed
  float elapsed_ms(const Event& since) const;  // both timing events, both completed
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

// Autotuning (cuBLASLt algorithms, cuDNN attention plans): times candidates 0..count-1 on stream
// s, each with one warm-up run and `reps` timed runs between two events, over `rounds` rounds
// (the candidates in turn in each round, so that a card heating up under the load, or reaching
// its power limit, weighs on all alike); launch(i) runs candidate i once and returns false when it
// refuses (the candidate is skipped). Returns the fastest's index (-1: none ran); times (if
// given) gets each candidate's mean ms a run (infinity: skipped).
template <typename Launch>
int fastest_candidate(int count, cudaStream_t s, Launch&& launch, std::vector<float>* times = nullptr,
                      int reps = 3, int rounds = 1) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> total(static_cast<size_t>(count), 0.0f);
  Event t0(true), t1(true);
  for (int round = 0; round < rounds; ++round)
    for (int i = 0; i < count; ++i) {
      float& t = total[static_cast<size_t>(i)];
      if (t == inf || (round == 0 && !launch(i))) {  // skipped, or refused its warm-up
        t = inf;
        continue;
      }
      t0.record(s);
      bool ok = true;
      for (int r = 0; r < reps && ok; ++r) ok = launch(i);
      t1.record(s);
      t1.synchronize();
      t = ok ? t + t1.elapsed_ms(t0) : inf;
    }
  float best_ms = inf;
  int best = -1;
  for (int i = 0; i < count; ++i) {
    const float ms = total[static_cast<size_t>(i)] / static_cast<float>(reps * rounds);
    total[static_cast<size_t>(i)] = ms;
    if (ms < best_ms) {
      best_ms = ms;
      best = i;
    }
  }
  if (times) *times = total;
  return best;
}

// Page-locked host memory (fast, asynchronous host<->device copies), freed with the object.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept;
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const { return p_; }
  size_t size() const { return bytes_; }
  // Grows (never shrinks) to at least `bytes`; contents are not kept.
  void reserve(size_t bytes);

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// A device scratch block from the caching allocator, returned on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() const { return p_; }
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }
  size_t size() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace ievo::cuda
