#include "launch/phase_timer.h"

#include <chrono>

#include "runtime/error.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

namespace ievo {

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::Data: return "data";
    case Phase::Forward: return "forward";
    case Phase::Backward: return "backward";
    case Phase::Reduce: return "reduce";
    case Phase::Optimizer: return "optimizer";
  }
  return "?";
}

// Time stamps 0..n of one step: stamp 0 at begin_step, stamp i at mark i. Elapsed times are read
// only in end_step, after the device has finished.
struct PhaseTimer::Clock {
  explicit Clock(Device d) : cuda(d == Device::CUDA) {}
  void stamp(size_t i) {
#ifdef IEVO_CUDA
    if (cuda) {
      while (events.size() <= i) events.push_back(std::make_unique<cuda::Event>(/*timing=*/true));
      events[i]->record();
      return;
    }
#endif
    if (host.size() <= i) host.resize(i + 1);
    host[i] = std::chrono::steady_clock::now();
  }
  // Seconds from stamp i-1 to stamp i; call after wait(last).
  double seconds(size_t i) const {
#ifdef IEVO_CUDA
    if (cuda) return events[i]->elapsed_ms(*events[i - 1]) / 1e3;
#endif
    return std::chrono::duration<double>(host[i] - host[i - 1]).count();
  }
  void wait(size_t last) {
#ifdef IEVO_CUDA
    if (cuda) events[last]->synchronize();
#else
    (void)last;
#endif
  }

  bool cuda;
#ifdef IEVO_CUDA
  std::vector<std::unique_ptr<cuda::Event>> events;
#endif
  std::vector<std::chrono::steady_clock::time_point> host;
};

class PhaseTimer::Hooks final : public LayerHooks {
 public:
  Hooks(PhaseTimer* t, LayerHooks* inner, int head_layer) : t_(t), inner_(inner), head_(head_layer) {}
  void before_layer(int layer, Pass pass) override {
    if (layer == head_ && pass == Pass::Backward) t_->mark(Phase::Forward);
    if (inner_) inner_->before_layer(layer, pass);
  }
  void after_layer(int layer, Pass pass) override {
    if (inner_) inner_->after_layer(layer, pass);
  }

 private:
  PhaseTimer* t_;
  LayerHooks* inner_;
  int head_;
};

PhaseTimer::PhaseTimer(Device d) : clock_(std::make_unique<Clock>(d)) {}
PhaseTimer::~PhaseTimer() = default;

void PhaseTimer::begin_step() {
  marks_.clear();
  clock_->stamp(0);
}

void PhaseTimer::mark(Phase ended) {
  marks_.push_back(ended);
  clock_->stamp(marks_.size());
}

void PhaseTimer::end_step() {
  IEVO_CHECK(!marks_.empty(), "PhaseTimer::end_step: no phase was marked in this step");
  clock_->wait(marks_.size());
  last_.fill(0.0);
  for (size_t i = 0; i < marks_.size(); ++i)
    last_[static_cast<size_t>(marks_[i])] += clock_->seconds(i + 1);
  steps_.push_back(last_);
  marks_.clear();
}

LayerHooks* PhaseTimer::wrap(LayerHooks* inner, int head_layer) {
  hooks_ = std::make_unique<Hooks>(this, inner, head_layer);
  return hooks_.get();
}

}  // namespace ievo
