#include "launch/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "data/gpt_dataset.h"
#include "data/packed_dataset.h"
#include "launch/checkpoint.h"
#include "launch/checkpoint_shards.h"
#include "launch/checkpointer.h"
#include "launch/device.h"
#include "launch/duration.h"
#include "launch/fault_injection.h"
#include "launch/log.h"
#include "launch/metrics.h"
#include "launch/numerics.h"
#include "launch/phase_timer.h"
#include "launch/profiling.h"
#include "launch/resume.h"
#include "launch/signals.h"
#include "launch/validation.h"
#include "models/batch.h"
#include "models/hf_adapter.h"
#include "models/llama.h"
#include "optim/adamw.h"
#include "optim/schedule.h"
#include "parallel/batch_split.h"
#include "parallel/communicator.h"
#include "parallel/failure.h"
#include "parallel/model_state.h"
#include "parallel/pipeline.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/tensor_parallel.h"
#include "parallel/topology.h"
#include "parallel/zero.h"
#include "runtime/nvtx.h"
#include "runtime/ops/elementwise.h"

namespace fs = std::filesystem;

namespace ievo {
namespace {

class Trainer {
 public:
  Trainer(const Config& cfg, Topology topo, TrainOptions opt = {})
      : cfg_(cfg), opt_(opt), mc_(cfg.model.model), guard_(cfg), time_limit_(cfg.train.max_time),
        topo_(std::move(topo)), rank_(topo_.world_rank()),
        watchdog_(topo_.world_size() > 1 ? cfg.parallel.timeout_s : 0, rank_) {
    device_ = cfg.run.device == "cuda" ? Device::CUDA : Device::CPU;
    if (device_ == Device::CUDA) init_device(topo_.local_rank(), cfg.run.deterministic);
    const auto& t = cfg.train;
    // Data parallelism: G = micro x accumulation x dp; rank r reads its slice of every step.
    // (Ulysses: the S ranks of a sequence group read the same samples and split their tokens.)
    split_ = split_batch(t.global_batch_size, t.micro_batch_size, topo_.data_size(), topo_.data_rank());
    // Tensor / sequence layout errors before any work (parallel/tensor_parallel.h).
    validate_sequence_layout(mc_, topo_.tp(), sequence_parallel_from_name(cfg.parallel.sequence), topo_.sp(),
                             t.micro_batch_size, cfg.data.seq_len);
    accum_ = split_.accum;
    compute_dtype_ = t.precision == "bf16"   ? DType::BF16
                     : t.precision == "fp16" ? DType::F16
                                             : DType::F32;
  }

  std::vector<StepMetrics> run() {
    setup();
    std::vector<StepMetrics> all;
    MetricsLogger metrics({run_dir_.string(), rank_, cfg_.metrics.tensorboard, cfg_.train.steps,
                           cfg_.train.log_every, start_step_ + 1});
    install_stop_handlers();  // SIGTERM / SIGINT / SIGUSR1: save at the end of the step, exit
    for (int64_t step = start_step_ + 1; step <= cfg_.train.steps; ++step) {
      watchdog_.kick("step " + std::to_string(step));
      test_failure_hook(rank_, step);  // IEVO_TEST_FAIL_RANK (tests of the failure handling)
      StepMetrics m = train_step(step);
      all.push_back(m);
      metrics.log_step(m);
      if (validator_->due(step)) evaluate(step, metrics);  // launch/validation.h
      fault_point("step", step);  // IEVO_TEST_KILL_AT_STEP (tests/test_resume.cpp)
      if (ckpt_) ckpt_->poll();   // a failed background checkpoint write fails the run here
      if (sharded_) sharded_->poll();  // several ranks: collective (launch/checkpoint_shards.h)
      const int64_t every = cfg_.checkpoint.every;
      const bool due = (every > 0 && step % every == 0) ||
                       (step == cfg_.train.steps && cfg_.checkpoint.at_end);
      if (due) timed_save(step);
      if (stop_requested()) {  // launch/signals.h: every rank stops after the same step
        if (!due) timed_save(step);
        log_info("ievo: %s received: saved step %lld, exiting (resume with the same command)",
                 signal_name(stop_signal()), static_cast<long long>(step));
        break;
      }
      time_limit_.record_step(m.step_time_s);
      // train.max_time: every rank stops after the same step (one rank's clock decides for all).
      if (step < cfg_.train.steps && time_limit_.enabled() &&
          world_comm_->all_reduce_sum(static_cast<int64_t>(time_limit_.should_stop())) > 0) {
        if (!due) timed_save(step);
        log_info("train.max_time (%s) is near after %s: saved step %lld, exiting",
                 cfg_.train.max_time.c_str(), format_duration(time_limit_.elapsed_s()).c_str(),
                 static_cast<long long>(step));
        break;
      }
    }
    if (ckpt_) ckpt_->wait();  // the last (async) checkpoint is complete before we return
    if (sharded_) sharded_->wait();
    return all;
  }

 private:
  void setup() {
    run_dir_ = cfg_.run.dir;
    fs::create_directories(run_dir_);
    open_rank_log(run_dir_.string(), rank_);
    if (rank_ == 0) {
      std::ofstream f(run_dir_ / "config.yaml");
      f << config_to_yaml(cfg_);
    }
    // This rank's part of the model (tensor slices, pipeline chunks; models/shard.h).
    global_specs_ = param_specs(mc_);
    shard_ = shard_of(topo_.tp_rank(), topo_.pp_rank());
    specs_ = param_specs(mc_, shard_);
    // The starting weights, whole, on the host of every rank; the ZeRO state keeps this rank's part.
    ParamStore initial(global_specs_, DType::F32, Device::CPU);
    if (!cfg_.model.init_from_hf.empty()) {
      load_hf_weights(cfg_.model.init_from_hf, mc_, initial);
    } else {
      init_params(mc_, initial, cfg_.run.seed);
    }
    AdamWConfig oc;
    oc.beta1 = cfg_.optim.beta1;
    oc.beta2 = cfg_.optim.beta2;
    oc.eps = cfg_.optim.eps;
    oc.weight_decay = cfg_.optim.weight_decay;
    // Communicators: data (gradients, ZeRO), tensor and pipeline groups on the device; the world
    // and the model-parallel group on the host (stop decisions, checkpoint assembly).
    dp_comm_ = with_nvtx(make_communicator(device_, topo_.dp_comm()));  // launch/profiling.h
    tp_comm_ = group_communicator(topo_.tp(), topo_.tp_comm(), device_);
    pp_comm_ = group_communicator(topo_.pp(), topo_.pp_comm(), device_);
    sp_comm_ = group_communicator(topo_.sp(), topo_.sp_comm(), device_);
    world_comm_ = group_communicator(topo_.world_size(), topo_.world_comm(), Device::CPU);
    mp_comm_ = group_communicator(topo_.tp() * topo_.pp(), topo_.mp_comm(), Device::CPU);
    const SequenceParallel seq = sequence_parallel_from_name(cfg_.parallel.sequence);
    if (topo_.tp() > 1 || topo_.sp() > 1)
      parallel_ = std::make_unique<TensorParallel>(mc_, shard_, seq, tp_comm_.get(), sp_comm_.get());
    model_ = std::make_unique<Llama>(
        mc_,
        cfg_.model.checkpointing == "full"        ? Recompute::Full
        : cfg_.model.checkpointing == "selective" ? Recompute::Selective
                                                  : Recompute::None,
        shard_, parallel_.get());
    if (cfg_.model.head_chunk_tokens > 0) model_->head_chunk_tokens = cfg_.model.head_chunk_tokens;
    // Weights, gradients and AdamW state, replicated or sharded over the data-parallel ranks.
    // Slices that several tensor ranks hold count once in the gradient norm; partial gradients
    // of replicated slices are summed over the tensor group before the data-parallel reduction.
    ZeroConfig zc{static_cast<int>(cfg_.parallel.zero), cfg_.parallel.bucket_mb, {}, {}, {}};
    zc.param_remainders = cfg_.optim.param_remainders;
    if (topo_.tp() > 1) {
      ReplicaGradients rg = replica_gradients(mc_, shard_, seq, *tp_comm_);
      zc.deferred = rg.deferred;
      zc.norm_weight = rg.norm_weight;
      zc.pre_reduce = rg.pre_reduce;
    }
    if (topo_.pp() > 1)  // schedule, executor, tied embedding's group (parallel/pipeline.h)
      pipeline_ = std::make_unique<TrainerPipeline>(
          topo_, device_, *pp_comm_, pipeline_kind_from_name(cfg_.parallel.schedule), static_cast<int>(accum_),
          static_cast<int>(cfg_.parallel.virtual_stages), mc_, shard_, specs_, zc);
    if (pipeline_ && opt_.pipeline_stage_times)  // ievo bench: device time per op
      pipeline_->executor().set_timing_sync([d = device_] { sync_device(d); });
    if (pipeline_ && seq == SequenceParallel::Megatron)  // the residual stream holds 1/T of the tokens
      pipeline_->executor().set_activation_rows([T = topo_.tp()](const Batch& b) { return b.num_tokens() / T; });
    zero_ = std::make_unique<ZeroOptimizer>(specs_, model_->hook_layers(), compute_dtype_, device_,
                                            *dp_comm_, zc, oc);
    zero_->set_weights(local_slices(initial, specs_));
    model_->set_hooks(nvtx_hooks_.wrap(zero_.get()));
    if (opt_.phases)  // ievo bench: the head layer's backward ends the forward (launch/phase_timer.h)
      model_->set_hooks(nvtx_hooks_.wrap(opt_.phases->wrap(zero_.get(), static_cast<int>(mc_.num_layers) + 1)));
    sched_.kind = cfg_.schedule.kind;
    sched_.lr = cfg_.optim.lr;
    sched_.min_lr = cfg_.optim.min_lr;
    sched_.warmup_steps = cfg_.schedule.warmup_steps;
    sched_.total_steps = cfg_.train.steps;
    sched_.decay_fraction = cfg_.schedule.decay_fraction;
    const auto& d = cfg_.data;
    source_ = make_sample_source(d.paths, d.weights, d.seq_len, d.shuffle, d.synthetic, d.packing,
                                 cfg_.run.seed, mc_.vocab_size);
    validator_ = std::make_unique<Validator>(cfg_, mc_.vocab_size, device_, topo_.data_size(), topo_.data_rank());
    validator_->set_sequence_split(topo_.sp(), topo_.sp_rank());  // Ulysses: 1/S of each batch's tokens
    if (validator_->enabled()) log_info("ievo: %s", validator_->describe().c_str());
    if (topo_.world_size() > 1) {
      const ZeroMemory zm = zero_->memory();
      log_info("ievo: %s; ZeRO-%d over dp %d, %d micro-batches of %lld per rank; per rank: "
               "params %.1f MiB, grads %.1f MiB, optimizer %.1f MiB",
               topo_.describe().c_str(), zero_->stage(), topo_.dp(), static_cast<int>(accum_),
               static_cast<long long>(cfg_.train.micro_batch_size), zm.params / 1048576.0,
               zm.grads / 1048576.0, zm.optimizer / 1048576.0);
    }
    log_info("ievo: %s model, %.2fM parameters, %s, %s; data: %s", arch_name(mc_.arch),
                 static_cast<double>(mc_.num_params()) / 1e6, device_name(device_),
                 cfg_.train.precision.c_str(), source_->describe().c_str());
    resume();
    if (topo_.world_size() > 1 && opt_.checkpoints)  // every rank writes its own shard file
      sharded_ = std::make_unique<ShardedCheckpointer>(run_dir_.string(), cfg_.checkpoint.keep_last,
                                                       cfg_.checkpoint.async, *world_comm_);
    else if (rank_ == 0 && opt_.checkpoints)
      ckpt_ = std::make_unique<Checkpointer>(run_dir_.string(), mc_, cfg_.checkpoint.keep_last,
                                             cfg_.checkpoint.async);
  }

  // checkpoint.resume (launch/resume.h). Every rank reads the checkpoint's whole tensors and
  // keeps its part, so any dp size / ZeRO stage resumes any checkpoint. Restores master weights,
  // AdamW moments and step count, the fp16 loss scaler, the skipped-step counts, and the data
  // position (consumed samples; the LR schedule is a function of the step). There is no other
  // RNG state: the data order is a function of (run.seed, sample index) and nothing in a step is
  // random.
  void resume() {
    auto st = resume_training(cfg_, rank_, [&](const std::string& dir) {
      ParamStore p(global_specs_, DType::F32, Device::CPU), m(global_specs_, DType::F32, Device::CPU),
          v(global_specs_, DType::F32, Device::CPU);
      CheckpointState s = load_checkpoint(
          dir, {{"params", &p}, {"exp_avg", &m}, {"exp_avg_sq", &v}}, /*optimizer_optional=*/true);
      const ParamStore lp = local_slices(p, specs_), lm = local_slices(m, specs_),
                       lv = local_slices(v, specs_);
      zero_->load_state(lp, &lm, &lv, s.extra.value("optimizer_steps", s.step));
      return s;
    });
    if (!st) return;
    start_step_ = st->step;
    sample_base_ = st->consumed_samples;
    if (LossScaler* ls = guard_.scaler(); ls && st->extra.contains("loss_scaler")) {
      const auto& j = st->extra["loss_scaler"];
      ls->set_state({j.at("scale").get<double>(), j.at("good_steps").get<int64_t>(),
                     j.at("hysteresis_count").get<int64_t>()});
    }
    if (st->extra.contains("numerics"))  // skipped-step counts continue (launch/numerics.h)
      guard_.restore_counts(st->extra["numerics"].at("skipped_total").get<int64_t>(),
                            st->extra["numerics"].at("skipped_in_a_row").get<int64_t>());
    if (start_step_ >= cfg_.train.steps)
      log_info("ievo: the checkpoint is at step %lld, train.steps is %lld: nothing to train",
               static_cast<long long>(start_step_), static_cast<long long>(cfg_.train.steps));
  }

  // A stop signal on any rank stops every rank after this step.
  bool stop_requested() {
    return world_comm_->all_reduce_sum(static_cast<int64_t>(stop_signal() != 0)) > 0;
  }

  // Rank (tp_rank, pp_rank)'s part of the model: its pipeline chunks and tensor slices.
  ModelShard shard_of(int tp_rank, int pp_rank) const {
    ModelShard s;
    if (topo_.pp() > 1) {
      const int P = topo_.pp(), V = static_cast<int>(cfg_.parallel.virtual_stages);
      s = pipeline_shard(pipeline_layer_split(mc_, P, V, cfg_.data.seq_len, cfg_.parallel.pipeline_layers),
                         P, V, pp_rank);
    }
    s.tp = topo_.tp();
    s.tp_rank = tp_rank;
    return s;
  }

  // A group's communicator: local for a group of one, else MPI (host) or NCCL (CUDA).
  static std::unique_ptr<Communicator> group_communicator(int size, MPI_Comm comm, Device device) {
    return size > 1 ? make_communicator(device, comm) : make_local_communicator();
  }

  // The micro-batch `micro` of step `step` (1-based): samples in order from the global stream.
  Batch micro_batch(int64_t step, int64_t micro) const {
    const int64_t B = cfg_.train.micro_batch_size;
    // This rank's slice; after a resume the stream continues at the checkpoint's consumed samples.
    const int64_t first = sample_base_ + split_.first_sample(step - start_step_, micro);
    // packed when data.packing; Ulysses: this sequence rank's contiguous 1/S of the tokens
    return sequence_slice(load_batch(*source_, first, B, device_), topo_.sp(), topo_.sp_rank());
  }

  // The next step's micro-batches, read and copied to the device at the end of a step, while the
  // device still runs its optimizer (a data loader's prefetch: the host's batch work no longer
  // leaves the device idle at the start of the step). micro_batch is a function of the step, so
  // a prefetch that is not used (a stop, a resume) changes nothing; a failure is kept and raised
  // by the step that takes the batches, after this step's metrics and checkpoint.
  // Their target tokens are counted then too (a read-back of the device's copy).
  void prefetch_batches(int64_t step) {
    next_ = NextBatches{step, {}, 0, nullptr};
    try {
      for (int64_t j = 0; j < accum_; ++j) {
        next_.micros.push_back(micro_batch(step, j));
        next_.targets += next_.micros.back().num_targets();
      }
    } catch (...) {
      next_.micros.clear();
      next_.error = std::current_exception();
    }
  }
  std::vector<Batch> step_batches(int64_t step, int64_t* targets) {
    if (next_.step != step) prefetch_batches(step);
    NextBatches taken = std::move(next_);
    next_ = NextBatches{};
    if (taken.error) std::rethrow_exception(taken.error);
    *targets = taken.targets;
    return std::move(taken.micros);
  }

  void evaluate(int64_t step, MetricsLogger& metrics) {
    const EvalResult ev = validator_->run(*model_, zero_->weights(), dp_comm_.get(),
                                          pipeline_ ? &pipeline_->executor() : nullptr);
    metrics.log_scalars(step, {{"val_loss", ev.loss}, {"val_ppl", ev.ppl}});
    log_info("step %lld/%lld | val_loss %.4f | val_ppl %.2f | %lld tokens", static_cast<long long>(step),
             static_cast<long long>(cfg_.train.steps), ev.loss, ev.ppl,
             static_cast<long long>(ev.targets));
  }

  StepMetrics train_step(int64_t step) {
    const auto t0 = std::chrono::steady_clock::now();
    // "step_<N>": tools/kernel_profile.sh profiles one warm step by this range (ncu --nvtx-include)
    const std::string step_range = "step_" + std::to_string(step);
    IEVO_NVTX_RANGE(step_range.c_str());
    if (opt_.phases) opt_.phases->begin_step();
    int64_t targets = 0;  // this rank's target tokens
    std::vector<Batch> micros = step_batches(step, &targets);
    targets = dp_comm_->all_reduce_sum(targets);  // over the whole global batch
    phase(Phase::Data);
    IEVO_CHECK(targets > 0, "step ", step, ": the global batch has no target tokens");
    zero_->begin_step(pipeline_ ? 0 : static_cast<int>(accum_));  // known: ZeRO 0-1 overlap the reduction
    const ParamStore& weights = zero_->weights();
    double loss_sum = 0;
    const double loss_scale = guard_.loss_scale();  // fp16 dynamic loss scale, else 1
    if (pipeline_) {  // every micro-batch through this stage's chunks; the loss from the last stage
      loss_sum = pipeline_->executor()
                     .run(*model_, weights, zero_->grads(), micros, loss_scale / static_cast<double>(targets))
                     .sum;
      if (opt_.pipeline_stage_times)  // ievo bench: every stage's times
        opt_.pipeline_stage_times->push_back(gather_stage_times(*pp_comm_, pipeline_->executor().timing()));
      phase(Phase::Backward);
    } else {
      for (auto& b : micros) {
        IEVO_NVTX_RANGE("forward_backward");
        LossSum ls = model_->forward_backward(weights, b, loss_scale / static_cast<double>(targets),
                                              zero_->grads());
        loss_sum += ls.sum;
        phase(Phase::Backward);
      }
    }
    loss_sum = dp_comm_->all_reduce_sum(loss_sum);
    if (const int64_t i = guard_.poison_index(step, specs_); i >= 0)  // debug.nan_* test hook
      zero_->poison_gradient(static_cast<size_t>(i));
    // Reduced over dp; summed over the tensor and pipeline groups: the global squared norm.
    double grad_sum_sq = zero_->finish_gradients();
    grad_sum_sq = pp_comm_->all_reduce_sum(tp_comm_->all_reduce_sum(grad_sum_sq));
    phase(Phase::Reduce);
    StepMetrics m;
    m.step = step;
    m.loss = loss_sum / static_cast<double>(targets);
    m.lr = sched_.at(step);
    // Non-finite loss/gradients (or fp16 overflow): no update (launch/numerics.h).
    auto first_nonfinite = [&] {  // every dp rank scans its shard; they agree (collective)
      const int64_t i = zero_->first_nonfinite_gradient();
      return i < 0 ? std::string() : specs_[static_cast<size_t>(i)].name;
    };
    if (guard_.accept(step, m.loss, std::sqrt(grad_sum_sq), first_nonfinite, m)) {
      IEVO_NVTX_RANGE("optimizer");
      const double coef = clip_coefficient(m.grad_norm, cfg_.optim.grad_clip);
      zero_->step(m.lr, coef / loss_scale);
    }
    phase(Phase::Optimizer);
    if (step < cfg_.train.steps) prefetch_batches(step + 1);  // while the device runs the optimizer
    sync_device(device_);
    if (opt_.phases) opt_.phases->end_step();
    m.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    m.tokens = cfg_.train.global_batch_size * cfg_.data.seq_len;
    m.tokens_per_s = static_cast<double>(m.tokens) / m.step_time_s;
    m.mfu = device_ == Device::CUDA
                ? mc_.flops_per_token(cfg_.data.seq_len) * m.tokens_per_s / kH100PeakBf16Flops
                : 0.0;
    m.peak_mem_bytes = memory_stats(device_).peak_bytes;
    return m;
  }

  void phase(Phase ended) {  // ievo bench: phase timing (launch/phase_timer.h)
    if (opt_.phases) opt_.phases->mark(ended);
  }

  void timed_save(int64_t step) {
    if (!opt_.checkpoints) return;  // ievo bench
    const auto t0 = std::chrono::steady_clock::now();
    watchdog_.kick("checkpoint of step " + std::to_string(step));
    save(step);
    watchdog_.kick("after the checkpoint of step " + std::to_string(step));
    time_limit_.record_save(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }

  void save(int64_t step) {
    CheckpointState st;
    st.step = step;
    st.consumed_samples = sample_base_ + (step - start_step_) * cfg_.train.global_batch_size;
    st.seed = cfg_.run.seed;
    st.config_yaml = config_to_yaml(cfg_);
    st.extra = {{"optimizer_steps", zero_->steps_taken()}, {"lr", sched_.at(step)},
                {"numerics", {{"skipped_total", guard_.skipped_total()},
                              {"skipped_in_a_row", guard_.skipped_in_a_row()}}}};
    if (const LossScaler* ls = guard_.scaler())
      st.extra["loss_scaler"] = {{"scale", ls->state().scale},
                                 {"good_steps", ls->state().good_steps},
                                 {"hysteresis_count", ls->state().hysteresis_count}};
    // Several ranks: each writes its own pieces (ZeRO segments of its tensor/pipeline slices) into
    // its own file, collectively (launch/checkpoint_shards.h); nothing is gathered.
    if (topo_.world_size() > 1) {
      if (ckpt_owned_.empty())  // replicated slices are written by the lowest model-parallel rank
        ckpt_owned_ = owned_slices(specs_, mp_comm_->rank(), [&](int r) {
          return param_specs(mc_, shard_of(r % topo_.tp(), r / topo_.tp()));
        });
      sharded_->save(mc_, st, *zero_, specs_, ckpt_owned_,
                     zero_->layout().shards > 1 || topo_.dp_rank() == 0, global_specs_);
      return;
    }
    // One process: whole f32 master weights and moments in reused host stores (page-locked on
    // CUDA), written by the Checkpointer (checkpoint.async: in the background).
    const auto hs = ckpt_->host_stores(global_specs_, device_ == Device::CUDA);
    zero_->gather_state(hs[0], hs[1], hs[2], 0);
    ckpt_->save(st, {checkpoint_group("params", *hs[0]), checkpoint_group("exp_avg", *hs[1]),
                     checkpoint_group("exp_avg_sq", *hs[2])}, /*private_copy=*/true);
    world_comm_->barrier();  // the checkpoint is complete for every rank
  }

  static constexpr double kH100PeakBf16Flops = 989e12;

  const Config& cfg_;
  TrainOptions opt_;       // ievo bench: phase timing, no checkpoints
  ModelConfig mc_;
  Device device_ = Device::CPU;
  DType compute_dtype_ = DType::F32;
  int64_t accum_ = 1;
  fs::path run_dir_;
  NumericsGuard guard_;    // skipped steps, fp16 loss scaling, debug.nan_* hook
  TimeLimit time_limit_;   // train.max_time
  NvtxLayerHooks nvtx_hooks_;  // CUDA builds: NVTX ranges per layer (launch/profiling.h)
  Topology topo_;          // this rank in data x pipeline x tensor (parallel/topology.h)
  int rank_ = 0;           // world rank
  Watchdog watchdog_;      // parallel.timeout_s with several ranks
  BatchSplit split_;       // this rank's samples of each step
  std::vector<ParamSpec> global_specs_;  // the whole model's parameters (checkpoints, init)
  ModelShard shard_;                     // this rank's part (models/shard.h)
  std::vector<ParamSpec> specs_;         // ... and its parameters
  std::unique_ptr<Communicator> dp_comm_, tp_comm_, pp_comm_, sp_comm_;
  std::unique_ptr<Communicator> world_comm_, mp_comm_;  // host: stop decisions, checkpoint assembly
  std::unique_ptr<ModelParallel> parallel_;  // tensor / sequence parallelism; nullptr: none
  std::vector<bool> ckpt_owned_;             // sharded checkpoints: local slices this rank writes
  std::unique_ptr<TrainerPipeline> pipeline_;  // parallel.pipeline > 1 (parallel/pipeline.h)
  std::unique_ptr<ZeroOptimizer> zero_;  // weights, gradients, AdamW (parallel/zero.h)
  LrSchedule sched_;
  std::unique_ptr<SampleSource> source_;
  struct NextBatches {
    int64_t step = -1;
    std::vector<Batch> micros;
    int64_t targets = 0;  // their target tokens
    std::exception_ptr error;
  };
  NextBatches next_;  // prefetch_batches
  std::unique_ptr<Validator> validator_;  // data.valid_paths
  std::unique_ptr<Llama> model_;
  std::unique_ptr<Checkpointer> ckpt_;  // one process: writes checkpoints (launch/checkpointer.h)
  std::unique_ptr<ShardedCheckpointer> sharded_;  // several ranks (launch/checkpoint_shards.h)
  int64_t start_step_ = 0;              // the resumed checkpoint's step (0: fresh start)
  int64_t sample_base_ = 0;             // ... and its consumed samples
};

}  // namespace

namespace {
Topology topology(const Config& cfg, MPI_Comm world) {
  const auto& p = cfg.parallel;
  const int tp = static_cast<int>(p.tensor), pp = static_cast<int>(p.pipeline),
            sp = static_cast<int>(p.sequence_size);
  return world == MPI_COMM_NULL ? Topology::from_world(tp, pp, sp) : Topology(world, tp, pp, sp);
}
}  // namespace

std::vector<StepMetrics> run_train(const Config& cfg) {
  return Trainer(cfg, topology(cfg, MPI_COMM_NULL)).run();
}

std::vector<StepMetrics> run_train(const Config& cfg, const TrainOptions& opt) {
  return Trainer(cfg, topology(cfg, MPI_COMM_NULL), opt).run();
}

std::vector<StepMetrics> run_train(const Config& cfg, MPI_Comm world) {
  return Trainer(cfg, topology(cfg, world)).run();
}

}  // namespace ievo
