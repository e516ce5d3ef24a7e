#include "launch/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include <nlohmann/json.hpp>

#include "data/gpt_dataset.h"
#include "launch/checkpoint.h"
#include "launch/device.h"
#include "models/batch.h"
#include "models/hf_adapter.h"
#include "models/llama.h"
#include "optim/adamw.h"
#include "optim/schedule.h"
#include "runtime/ops/elementwise.h"

namespace fs = std::filesystem;

namespace ievo {
namespace {

std::string fmt_duration(double s) {
  int64_t t = static_cast<int64_t>(std::llround(std::max(0.0, s)));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(t / 3600),
                static_cast<long long>(t / 60 % 60), static_cast<long long>(t % 60));
  return buf;
}

std::string fmt_rate(double r) {
  char buf[32];
  if (r >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", r / 1e6);
  else if (r >= 1e3) std::snprintf(buf, sizeof buf, "%.1fK", r / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", r);
  return buf;
}

class Trainer {
 public:
  explicit Trainer(const Config& cfg) : cfg_(cfg), mc_(cfg.model.model) {
    device_ = cfg.run.device == "cuda" ? Device::CUDA : Device::CPU;
    if (device_ == Device::CUDA) init_device(0);
    const auto& t = cfg.train;
    IEVO_CHECK(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size (",
               t.global_batch_size, ") must be a multiple of train.micro_batch_size (",
               t.micro_batch_size, ")");
    accum_ = t.global_batch_size / t.micro_batch_size;
    compute_dtype_ = t.precision == "bf16" ? DType::BF16 : DType::F32;
  }

  std::vector<StepMetrics> run() {
    setup();
    std::vector<StepMetrics> all;
    std::ofstream metrics(run_dir_ / "metrics.jsonl", std::ios::app);
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t step = 1; step <= cfg_.train.steps; ++step) {
      StepMetrics m = train_step(step);
      all.push_back(m);
      nlohmann::json j = {{"step", m.step},         {"loss", m.loss},
                          {"grad_norm", m.grad_norm}, {"lr", m.lr},
                          {"tokens_per_s", m.tokens_per_s}, {"mfu", m.mfu},
                          {"tokens", m.tokens},     {"step_time_s", m.step_time_s},
                          {"peak_mem_bytes", memory_stats(device_).peak_bytes}};
      metrics << j.dump() << "\n";
      metrics.flush();
      if (step % std::max<int64_t>(1, cfg_.train.log_every) == 0 || step == cfg_.train.steps) {
        double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        double eta = elapsed / static_cast<double>(step) * static_cast<double>(cfg_.train.steps - step);
        std::fprintf(stderr, "step %lld/%lld | loss %.4f | grad_norm %.3f | lr %.3e | %s tok/s | ETA %s\n",
                     static_cast<long long>(step), static_cast<long long>(cfg_.train.steps), m.loss,
                     m.grad_norm, m.lr, fmt_rate(m.tokens_per_s).c_str(), fmt_duration(eta).c_str());
      }
      const int64_t every = cfg_.checkpoint.every;
      if ((every > 0 && step % every == 0) || step == cfg_.train.steps) save(step);
    }
    return all;
  }

 private:
  void setup() {
    run_dir_ = cfg_.run.dir;
    fs::create_directories(run_dir_);
    {
      std::ofstream f(run_dir_ / "config.yaml");
      f << config_to_yaml(cfg_);
    }
    specs_ = param_specs(mc_);
    master_ = std::make_unique<ParamStore>(specs_, DType::F32, device_);
    if (!cfg_.model.init_from_hf.empty()) {
      load_hf_weights(cfg_.model.init_from_hf, mc_, *master_);
    } else {
      init_params(mc_, *master_, cfg_.run.seed);
    }
    if (compute_dtype_ != DType::F32) {
      lowp_ = std::make_unique<ParamStore>(specs_, compute_dtype_, device_);
      ops::cast(master_->flat(), lowp_->flat());
    }
    grads_ = std::make_unique<ParamStore>(specs_, compute_dtype_, device_);
    AdamWConfig oc;
    oc.beta1 = cfg_.optim.beta1;
    oc.beta2 = cfg_.optim.beta2;
    oc.eps = cfg_.optim.eps;
    oc.weight_decay = cfg_.optim.weight_decay;
    opt_ = std::make_unique<AdamW>(*master_, oc);
    sched_.kind = cfg_.schedule.kind;
    sched_.lr = cfg_.optim.lr;
    sched_.min_lr = cfg_.optim.min_lr;
    sched_.warmup_steps = cfg_.schedule.warmup_steps;
    sched_.total_steps = cfg_.train.steps;
    sched_.decay_fraction = cfg_.schedule.decay_fraction;
    const auto& d = cfg_.data;
    source_ = make_sample_source(d.paths, d.weights, d.seq_len, d.shuffle, d.synthetic, cfg_.run.seed,
                                 mc_.vocab_size);
    model_ = std::make_unique<Llama>(
        mc_, cfg_.model.checkpointing == "none" ? Recompute::None : Recompute::Full);
    std::fprintf(stderr, "ievo: %s model, %.2fM parameters, %s, %s; data: %s\n", arch_name(mc_.arch),
                 static_cast<double>(mc_.num_params()) / 1e6, device_name(device_),
                 cfg_.train.precision.c_str(), source_->describe().c_str());
  }

  // The micro-batch `micro` of step `step` (1-based): samples in order from the global stream.
  Batch micro_batch(int64_t step, int64_t micro) const {
    const int64_t B = cfg_.train.micro_batch_size, T = cfg_.data.seq_len;
    const int64_t first = (step - 1) * cfg_.train.global_batch_size + micro * B;
    std::vector<int32_t> rows(static_cast<size_t>(B * (T + 1)));
    for (int64_t r = 0; r < B; ++r) source_->get(first + r, rows.data() + r * (T + 1));
    Batch b = make_batch(rows, B, T);
    return device_ == Device::CPU ? b : b.to(device_);
  }

  StepMetrics train_step(int64_t step) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<Batch> micros;
    int64_t targets = 0;
    for (int64_t j = 0; j < accum_; ++j) {
      micros.push_back(micro_batch(step, j));
      targets += micros.back().num_targets();
    }
    IEVO_CHECK(targets > 0, "step ", step, ": the global batch has no target tokens");
    grads_->zero();
    const ParamStore& weights = lowp_ ? *lowp_ : *master_;
    double loss_sum = 0;
    for (auto& b : micros) {
      LossSum ls = model_->forward_backward(weights, b, 1.0 / static_cast<double>(targets), *grads_);
      loss_sum += ls.sum;
    }
    StepMetrics m;
    m.step = step;
    m.loss = loss_sum / static_cast<double>(targets);
    m.grad_norm = std::sqrt(grad_sum_squares(*grads_));
    m.lr = sched_.at(step);
    const double coef = clip_coefficient(m.grad_norm, cfg_.optim.grad_clip);
    opt_->step(*master_, *grads_, m.lr, coef, lowp_.get());
    sync_device(device_);
    m.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    m.tokens = cfg_.train.global_batch_size * cfg_.data.seq_len;
    m.tokens_per_s = static_cast<double>(m.tokens) / m.step_time_s;
    m.mfu = device_ == Device::CUDA
                ? mc_.flops_per_token(cfg_.data.seq_len) * m.tokens_per_s / kH100PeakBf16Flops
                : 0.0;
    return m;
  }

  void save(int64_t step) {
    CheckpointState st;
    st.step = step;
    st.consumed_samples = step * cfg_.train.global_batch_size;
    st.seed = cfg_.run.seed;
    st.config_yaml = config_to_yaml(cfg_);
    st.extra = {{"optimizer_steps", opt_->steps_taken()}};
    const fs::path dir = run_dir_ / "checkpoints" / ("step_" + std::to_string(step));
    save_checkpoint(dir.string(), mc_, st,
                    {{"params", master_.get()}, {"exp_avg", &opt_->exp_avg()},
                     {"exp_avg_sq", &opt_->exp_avg_sq()}});
  }

  static constexpr double kH100PeakBf16Flops = 989e12;

  const Config& cfg_;
  ModelConfig mc_;
  Device device_ = Device::CPU;
  DType compute_dtype_ = DType::F32;
  int64_t accum_ = 1;
  fs::path run_dir_;
  std::vector<ParamSpec> specs_;
  std::unique_ptr<ParamStore> master_, lowp_, grads_;
  std::unique_ptr<AdamW> opt_;
  LrSchedule sched_;
  std::unique_ptr<SampleSource> source_;
  std::unique_ptr<Llama> model_;
};

}  // namespace

std::vector<StepMetrics> run_train(const Config& cfg) { return Trainer(cfg).run(); }

}  // namespace ievo
