// Writes the trainer's checkpoints, synchronously or in a background thread (checkpoint.async),
// and applies checkpoint.keep_last once a checkpoint is complete.
//
// Async: save() first waits for the previous write (so at most one is in flight and the host
// copy can be reused), copies every tensor into one host buffer (pinned memory on CUDA, so the
// device-to-host copies run at full speed; a plain copy on the CPU), and returns; a thread writes
// the copy with save_checkpoint_groups(). The trainer instead gathers the state into
// host_stores() (reused, page-locked on CUDA) and passes private_copy: no second copy. Training goes on meanwhile; the state saved is the one
// at the call. A failed background write is reported at the next sync point (poll() after every
// step, the next save(), wait() at the end of the run) as an Error naming the checkpoint; the
// write removed its step_<N>.tmp, so the previous checkpoint is untouched.
#pragma once
#include <array>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "launch/checkpoint.h"

namespace ievo {

class Checkpointer {
 public:
  Checkpointer(std::string run_dir, ModelConfig mc, int64_t keep_last, bool async);
  ~Checkpointer();  // waits for a write in flight (its error is logged, not thrown)
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Saves RUN_DIR/checkpoints/step_<state.step> from these tensors (any device/dtype).
  // private_copy: the tensors are host tensors nobody else holds or modifies (e.g. just gathered),
  // so the async writer takes them as they are instead of copying them first.
  void save(const CheckpointState& state, const std::vector<CheckpointGroup>& groups,
            bool private_copy = false);
  // Three f32 host stores (params, exp_avg, exp_avg_sq) for the trainer to gather the state into
  // and pass to save(..., private_copy = true): allocated once and reused, page-locked when
  // `pin` (CUDA runs), so the device-to-host copies run at full bandwidth. Waits for the write
  // in flight first (it may still be reading them).
  std::array<ParamStore*, 3> host_stores(const std::vector<ParamSpec>& specs, bool pin);
  // Throws if a background write has failed since the last sync point; never blocks.
  void poll();
  // Waits for the write in flight; throws if it failed.
  void wait();
  bool async() const { return async_; }

 private:
  void write(const CheckpointState& state, const std::vector<CheckpointGroup>& groups);
  std::vector<CheckpointGroup> snapshot(const std::vector<CheckpointGroup>& groups);
  void rethrow_failure();

  std::string run_dir_;
  ModelConfig mc_;
  int64_t keep_last_;
  bool async_;
  std::thread worker_;
  std::atomic<bool> done_{true};
  std::mutex mu_;
  std::string failure_;  // the failed write's message (guarded by mu_)
  std::shared_ptr<void> host_;  // snapshot buffer, reused across saves
  size_t host_bytes_ = 0;
  std::array<std::unique_ptr<ParamStore>, 3> stores_;  // host_stores()
  bool pinned_ = false;
};

}  // namespace ievo
