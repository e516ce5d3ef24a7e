// Time per phase of a training step, for `ievo bench` (launch/bench.h).
//
// The trainer marks the end of each phase as it issues the work; on CUDA a mark records a timing
// event on the current stream (no host synchronisation), so the phase times are device time between
// consecutive marks and the step runs exactly as without timing. On the CPU a mark reads the host
// clock (CPU ops are synchronous). end_step() waits for the device and adds up the step.
//
// Phases of one optimiser step (in issue order; micro-batches repeat forward/backward):
//   data       batch assembly + host->device copy of every micro-batch
//   forward    embedding + transformer blocks
//   backward   final norm + fused LM head/loss (its forward and backward are one pass) + blocks in
//              reverse (+ the recomputed block forward under model.checkpointing: full) + embedding
//   reduce     gradient reduction over data-parallel ranks and the global gradient norm ("comm";
//              on one GPU only the norm)
//   optimizer  clipping + AdamW on the master weights + the bf16 copy
// The split between forward and backward comes from the model's layer hooks (wrap()): the first
// Backward pass of the head layer ends the forward.
#pragma once
#include <array>
#include <memory>
#include <string>
#include <vector>

#include "models/llama.h"
#include "runtime/dtype.h"

namespace ievo {

enum class Phase { Data, Forward, Backward, Reduce, Optimizer };
constexpr int kNumPhases = 5;
const char* phase_name(Phase p);  // "data", "forward", ...

class PhaseTimer {
 public:
  explicit PhaseTimer(Device d);
  ~PhaseTimer();
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

  void begin_step();
  // The phase `ended` ends now: the time since the previous mark (or begin_step) is added to it.
  void mark(Phase ended);
  // Waits for the device; the step's phase times become last() and are added to total().
  void end_step();

  using Times = std::array<double, kNumPhases>;  // seconds, indexed by Phase
  const Times& last() const { return last_; }
  const std::vector<Times>& steps() const { return steps_; }  // every completed step

  // Model hooks that mark the end of the forward and then call `inner` (may be nullptr).
  // head_layer = num_layers + 1 (models/llama.h). The returned object is owned by the timer.
  LayerHooks* wrap(LayerHooks* inner, int head_layer);

 private:
  struct Clock;  // CUDA events or host time points
  class Hooks;
  std::unique_ptr<Clock> clock_;
  std::unique_ptr<Hooks> hooks_;
  std::vector<Phase> marks_;  // phase ended by each mark of this step
  Times last_{};
  std::vector<Times> steps_;
};

}  // namespace ievo
