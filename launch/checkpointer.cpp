#include "launch/checkpointer.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>

#include "launch/device.h"
#include "launch/log.h"
#include "launch/resume.h"
#include "runtime/error.h"

#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

namespace fs = std::filesystem;

namespace ievo {

namespace {

// The dtype a tensor is written with (checkpoint.h): f64 stays f64, everything else is f32.
DType file_dtype(const Tensor& t) { return t.dtype() == DType::F64 ? DType::F64 : DType::F32; }

size_t aligned(size_t n) { return (n + 255) & ~size_t{255}; }

}  // namespace

Checkpointer::Checkpointer(std::string run_dir, ModelConfig mc, int64_t keep_last, bool async)
    : run_dir_(std::move(run_dir)), mc_(std::move(mc)), keep_last_(keep_last), async_(async) {}

Checkpointer::~Checkpointer() {
  if (worker_.joinable()) worker_.join();
#ifdef IEVO_CUDA
  if (pinned_)
    for (auto& s : stores_) cudaHostUnregister(s->flat().raw());
#endif
  std::lock_guard<std::mutex> lock(mu_);
  if (!failure_.empty()) log_info("ievo: error: %s", failure_.c_str());
}

std::array<ParamStore*, 3> Checkpointer::host_stores(const std::vector<ParamSpec>& specs, bool pin) {
  if (worker_.joinable()) worker_.join();  // the writer may still read them; its error: poll()
  if (!stores_[0]) {
    for (auto& s : stores_) s = std::make_unique<ParamStore>(specs, DType::F32, Device::CPU);
#ifdef IEVO_CUDA
    if (pin) {
      pinned_ = true;
      for (auto& s : stores_)
        pinned_ = pinned_ && cudaHostRegister(s->flat().raw(), s->flat().nbytes(),
                                               cudaHostRegisterDefault) == cudaSuccess;
      if (!pinned_) {  // pageable memory works too, only slower
        cudaGetLastError();
        for (auto& s : stores_) cudaHostUnregister(s->flat().raw());
        cudaGetLastError();
      }
    }
#else
    (void)pin;
#endif
  }
  return {stores_[0].get(), stores_[1].get(), stores_[2].get()};
}

void Checkpointer::write(const CheckpointState& state, const std::vector<CheckpointGroup>& groups) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string dir = checkpoint_dir(run_dir_, state.step);
  save_checkpoint_groups(dir, mc_, state, groups);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::error_code ec;
  const auto bytes = fs::file_size(fs::path(dir) / "model.h5", ec);
  log_info("ievo: saved %s (%.1f MiB, %.2f s%s)", dir.c_str(),
           ec ? 0.0 : static_cast<double>(bytes) / (1 << 20), s, async_ ? ", in the background" : "");
  for (int64_t step : prune_checkpoints(run_dir_, state.step, keep_last_))
    log_info("ievo: checkpoint.keep_last=%lld: removed step_%lld",
             static_cast<long long>(keep_last_), static_cast<long long>(step));
}

std::vector<CheckpointGroup> Checkpointer::snapshot(const std::vector<CheckpointGroup>& groups) {
  size_t total = 0;
  bool on_device = false;
  for (auto& g : groups)
    for (auto& [name, t] : g.tensors) {
      total += aligned(static_cast<size_t>(t.numel()) * dtype_size(file_dtype(t)));
      on_device = on_device || !t.is_cpu();
    }
  if (!host_ || host_bytes_ < total) {
    host_.reset();
#ifdef IEVO_CUDA
    if (on_device) {  // page-locked: device-to-host copies at full bandwidth
      auto buf = std::make_shared<cuda::PinnedBuffer>(total);
      host_ = std::shared_ptr<void>(buf, buf->data());
    }
#endif
    if (!host_) host_ = std::shared_ptr<void>(std::malloc(std::max<size_t>(total, 1)), std::free);
    IEVO_CHECK(host_ != nullptr, "checkpoint.async: cannot allocate ", total,
               " bytes of host memory for the checkpoint copy");
    host_bytes_ = total;
  }
  std::vector<CheckpointGroup> out;
  char* p = static_cast<char*>(host_.get());
  for (auto& g : groups) {
    CheckpointGroup c{g.name, {}};
    for (auto& [name, t] : g.tensors) {
      const DType dt = file_dtype(t);
      Tensor h = Tensor::from_blob(p, t.shape(), dt, Device::CPU, host_);
      Tensor src = t.dtype() == dt ? t : t.to(dt);
      h.copy_from(src.is_contiguous() ? src : src.clone());
      c.tensors.emplace_back(name, h);
      p += aligned(h.nbytes());
    }
    out.push_back(std::move(c));
  }
  if (on_device) sync_device(Device::CUDA);
  return out;
}

void Checkpointer::save(const CheckpointState& state, const std::vector<CheckpointGroup>& groups,
                        bool private_copy) {
  wait();  // at most one write in flight; also the sync point for the previous one's error
  if (!async_) {
    write(state, groups);
    return;
  }
  bool host = true;
  for (auto& g : groups)
    for (auto& [name, t] : g.tensors) host = host && t.is_cpu();
  auto copy = private_copy && host ? groups : snapshot(groups);
  done_ = false;
  worker_ = std::thread([this, state, copy = std::move(copy)] {
    try {
      write(state, copy);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(mu_);
      failure_ = e.what();
    }
    done_ = true;
  });
}

void Checkpointer::rethrow_failure() {
  std::string f;
  {
    std::lock_guard<std::mutex> lock(mu_);
    f.swap(failure_);
  }
  if (!f.empty())
    IEVO_FAIL("checkpoint.async: the background checkpoint write failed: ", f,
              " (the previous checkpoint is untouched)");
}

void Checkpointer::poll() {
  if (!done_) return;
  if (worker_.joinable()) worker_.join();
  rethrow_failure();
}

void Checkpointer::wait() {
  if (worker_.joinable()) worker_.join();
  rethrow_failure();
}

}  // namespace ievo
