// Device selection, the current stream, copies, events and pinned buffers; registers the CUDA
// allocator and copy/zero functions with the runtime (at static initialization, without
// touching the driver: the device itself is initialized on first use).
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <utility>

#include "runtime/allocator.h"
#include "runtime/cuda/caching_allocator.h"
#include "runtime/cuda/check.h"
#include "runtime/cuda/cuda.h"
#include "runtime/tensor.h"

namespace ievo::cuda {
namespace {

std::mutex g_init_mu;
std::atomic<bool> g_initialized{false};
int g_device = -1;
cudaDeviceProp g_props{};
cudaStream_t g_compute = nullptr;
thread_local cudaStream_t t_stream = nullptr;  // nullptr: the compute stream
thread_local int t_device = -1;                // device set on this thread

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return (end && *end == '\0') ? static_cast<int>(x) : fallback;
}

void ensure_init() {
  if (!g_initialized) init(-1);
  if (t_device != g_device) {
    IEVO_CUDA_CHECK(cudaSetDevice(g_device));
    t_device = g_device;
  }
}

// Whether p is pageable host memory (not page-locked or registered with CUDA).
bool pageable(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();  // older drivers: an error for unregistered memory
    return true;
  }
  return a.type == cudaMemoryTypeUnregistered;
}

void copy_fn(void* dst, Device dd, const void* src, Device sd, size_t bytes) {
  cudaStream_t s = current_stream();
  IEVO_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
  // Host memory on either side: wait, so the caller may read or free it at once. Except a copy
  // from pageable host memory to the device: cudaMemcpyAsync returns once it has staged the
  // source (CUDA's API synchronisation rules), so the caller may already free it, and the stream
  // need not drain (a batch copied while the device still runs the optimizer).
  if (dd == Device::CPU || (sd == Device::CPU && !pageable(src))) IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
}

void copy_2d_fn(void* dst, size_t dst_pitch, Device dd, const void* src, size_t src_pitch, Device sd,
                size_t width, size_t rows) {
  cudaStream_t s = current_stream();
  IEVO_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDefault, s));
  if (dd == Device::CPU || sd == Device::CPU) IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
}

void zero_fn(void* dst, size_t bytes) {
  IEVO_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, current_stream()));
}

void register_hooks() {
  set_allocator(Device::CUDA, caching_allocator());
  set_device_copy(&copy_fn);
  set_device_copy_2d(&copy_2d_fn);
  set_device_zero(&zero_fn);
}

// Registration at load time: allocation, copies and zeroing then work without an explicit
// init() (the allocator initializes the device on its first call).
const bool g_registered = (register_hooks(), true);

}  // namespace

const char* cublas_status_name(cublasStatus_t s) { return cublasGetStatusName(s); }

bool sync_after_launch() {
  static const bool on = env_int("IEVO_CUDA_SYNC", 0) != 0;
  return on;
}

bool programmatic_launch() {
  static const bool on = [] {
    if (env_int("IEVO_PDL", 1) == 0) return false;
    int major = 0;
    IEVO_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, current_device()));
    return major >= 9;
  }();
  return on;
}

void check_launch(const char* kernel, const char* file, int line) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess && sync_after_launch()) e = cudaStreamSynchronize(current_stream());
  if (e != cudaSuccess)
    IEVO_FAIL("CUDA error launching ", kernel, ": ", cudaGetErrorName(e), " (",
              cudaGetErrorString(e), ") [", file, ":", line, "]");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

bool available() {
  static const bool avail = device_count() > 0;
  return avail;
}

void init(int device) {
  std::lock_guard<std::mutex> lock(g_init_mu);
  (void)g_registered;
  if (g_initialized) {
    IEVO_CHECK(device < 0 || device == g_device, "cuda::init(", device,
               "): this process already uses CUDA device ", g_device);
    return;
  }
  const int n = device_count();
  IEVO_CHECK(n > 0, "CUDA requested but no CUDA device is available (no driver or no GPU)");
  if (device < 0) {
    int local = env_int("LOCAL_RANK", -1);
    if (local < 0) local = env_int("OMPI_COMM_WORLD_LOCAL_RANK", -1);
    if (local < 0) local = env_int("MPI_LOCALRANKID", 0);
    device = local % n;
  }
  IEVO_CHECK(device < n, "cuda::init: device ", device, " requested, only ", n, " present");
  IEVO_CUDA_CHECK(cudaSetDevice(device));
  IEVO_CUDA_CHECK(cudaGetDeviceProperties(&g_props, device));
  IEVO_CUDA_CHECK(cudaStreamCreateWithFlags(&g_compute, cudaStreamNonBlocking));
  register_hooks();
  g_device = device;
  t_device = device;
  g_initialized = true;
}

bool initialized() { return g_initialized; }

int current_device() {
  ensure_init();
  return g_device;
}

const cudaDeviceProp& device_properties() {
  ensure_init();
  return g_props;
}

std::string device_description() {
  ensure_init();
  return detail::cat(g_props.name, " (sm_", g_props.major, g_props.minor, ", ",
                     g_props.multiProcessorCount, " SMs, ",
                     static_cast<double>(g_props.totalGlobalMem) / (1u << 30), " GiB)");
}

cudaStream_t current_stream() {
  ensure_init();
  return t_stream ? t_stream : g_compute;
}

void set_current_stream(cudaStream_t s) {
  ensure_init();
  t_stream = s == g_compute ? nullptr : s;
}

cudaStream_t compute_stream() {
  ensure_init();
  return g_compute;
}

void synchronize() { IEVO_CUDA_CHECK(cudaStreamSynchronize(current_stream())); }

namespace {
std::atomic<bool> g_deterministic{false};
}
void set_deterministic(bool on) { g_deterministic.store(on); }
bool deterministic() { return g_deterministic.load(); }

Stream::Stream() {
  ensure_init();
  IEVO_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
}
Stream::~Stream() {
  if (s_) (void)cudaStreamDestroy(s_);
}

Event::Event(bool timing) {
  ensure_init();
  IEVO_CUDA_CHECK(cudaEventCreateWithFlags(&e_, timing ? cudaEventDefault : cudaEventDisableTiming));
}
Event::~Event() {
  if (e_) (void)cudaEventDestroy(e_);
}
void Event::record(cudaStream_t s) { IEVO_CUDA_CHECK(cudaEventRecord(e_, s ? s : current_stream())); }
void Event::wait(cudaStream_t s) { IEVO_CUDA_CHECK(cudaStreamWaitEvent(s ? s : current_stream(), e_, 0)); }
void Event::synchronize() { IEVO_CUDA_CHECK(cudaEventSynchronize(e_)); }
bool Event::query() {
  cudaError_t e = cudaEventQuery(e_);
  if (e == cudaErrorNotReady) return false;
  IEVO_CUDA_CHECK(e);
  return true;
}
float Event::elapsed_ms(const Event& since) const {
  float ms = 0;
  IEVO_CUDA_CHECK(cudaEventElapsedTime(&ms, since.e_, e_));
  return ms;
}

PinnedBuffer::PinnedBuffer(size_t bytes) { reserve(bytes); }
PinnedBuffer::~PinnedBuffer() {
  if (p_) (void)cudaFreeHost(p_);
}
PinnedBuffer::PinnedBuffer(PinnedBuffer&& o) noexcept
    : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    if (p_) (void)cudaFreeHost(p_);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}
void PinnedBuffer::reserve(size_t bytes) {
  if (bytes <= bytes_) return;
  ensure_init();
  if (p_) IEVO_CUDA_CHECK(cudaFreeHost(p_));
  p_ = nullptr;
  bytes_ = 0;
  IEVO_CUDA_CHECK(cudaHostAlloc(&p_, bytes, cudaHostAllocDefault));
  bytes_ = bytes;
}

DeviceBuffer::DeviceBuffer(size_t bytes)
    : p_(allocator(Device::CUDA).allocate(bytes)), bytes_(bytes) {}
DeviceBuffer::~DeviceBuffer() {
  if (p_) allocator(Device::CUDA).deallocate(p_, bytes_);
}
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (p_) allocator(Device::CUDA).deallocate(p_, bytes_);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

}  // namespace ievo::cuda
