// Pipeline parallelism: runs one optimiser step's micro-batches through this rank's model chunks
// following a schedule (parallel/pipeline_schedule.h), moving activations forward and their
// gradients backward between stages with Communicator::exchange.
//
// Per stage the executor walks its program:
//   Forward(mb, c)   input = the received activation (none on virtual stage 0, which embeds);
//                    out = Llama::stage_forward(...) -> kept for the next exchange's send. The
//                    last virtual stage instead runs the LM head, the loss and the head's
//                    backward (fused) and keeps d loss / d x for its Backward.
//   Backward(mb, c)  dy = the received gradient (none on the last virtual stage);
//                    dx = Llama::stage_backward(...) -> kept for the next exchange's send.
//   Exchange         receives into fresh [rows, d] tensors of the compute dtype, sends the kept
//                    outputs, all in one Communicator::exchange; the sent tensors are then freed.
// Gradients accumulate in the ParamStore over all micro-batches, as the trainer's one-process
// loop does, so ZeRO 0-2 work unchanged (the layer hooks fire inside stage_forward/backward, in
// the schedule's order). The loss and token count are summed on the last stage and then over the
// pipeline group, so every stage reports the same numbers.
//
// Tied embeddings (model.tie_embeddings): the first stage's model.embed_tokens.weight and the
// last stage's copy (its LM head, models/shard.h) start equal and must stay equal: both are
// ZeroConfig::deferred, ZeroConfig::pre_reduce sums their gradients over the two stages (the
// "embedding group", as Megatron's embedding all-reduce) before the data-parallel reduction, and
// ZeroConfig::norm_weight is 0 for the copy so the global gradient norm counts the tensor once.
// AdamW then makes the same update on both. ZeRO-3 with pipeline parallelism is refused (config).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <mpi.h>

#include "models/llama.h"
#include "parallel/communicator.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/topology.h"
#include "parallel/zero.h"

namespace ievo {

class PipelineExecutor {
 public:
  // pp: the pipeline group, rank = stage (not owned); the schedule must be for pp.size() stages.
  PipelineExecutor(PipelineSchedule schedule, Communicator& pp);

  // Forward and backward of every micro-batch (micros.size() == schedule().micro_batches) through
  // `model` (this stage's chunks, model.shard()), reading `weights` and adding grad_scale *
  // d(summed loss)/d(param) into `grads`. Returns the summed loss and target count of all
  // micro-batches, the same on every stage.
  LossSum run(Llama& model, const ParamStore& weights, ParamStore& grads, const std::vector<Batch>& micros,
              double grad_scale);

  // Forward only (validation): the summed loss and target count of `micros` (any number), the
  // same on every stage; make_forward_schedule's order, nothing kept for a backward.
  LossSum evaluate(Llama& model, const ParamStore& weights, const std::vector<Batch>& micros);
  // The rows of an activation message of micro-batch b (default: its tokens; a residual stream
  // split over the tensor group, Megatron sequence parallelism, passes its share).
  void set_activation_rows(std::function<int64_t(const Batch&)> rows) { rows_ = std::move(rows); }

  const PipelineSchedule& schedule() const { return schedule_; }
  // Wall time of the last run on this stage: its forward and backward ops, and its exchanges
  // (transfers plus the waits for the other stages: the bubble). Host clock; with a device, set a
  // synchronisation (ievo bench) or the times are only the launches.
  struct Timing {
    double forward_s = 0, backward_s = 0, exchange_s = 0;
  };
  const Timing& timing() const { return timing_; }
  void set_timing_sync(std::function<void()> sync) { sync_ = std::move(sync); }

 private:
  LossSum execute(const PipelineSchedule& s, Llama& model, const ParamStore& weights, ParamStore* grads,
                  const std::vector<Batch>& micros, double grad_scale);

  PipelineSchedule schedule_;
  std::unique_ptr<PipelineSchedule> eval_;  // the last evaluation's forward schedule
  Communicator& pp_;
  std::function<int64_t(const Batch&)> rows_;
  std::function<void()> sync_;  // before each clock reading (nullptr: none)
  Timing timing_;
  bool connected_ = false;  // connect() ran
  // Opens every point-to-point connection of the group at once (one symmetric exchange with each
  // other stage). NCCL sets up a pair's connection lazily, on the host, inside the first group
  // that uses it, and waits there for the peer's first group to the pair: a schedule whose first
  // send on one side sits in a group the peer reaches only after depending on it (GPipe: stage 0
  // sends the last activation and receives the first gradient together) would hang there.
  void connect(Device device);
};

// The first and last stage of this rank's pipeline (same data/tensor coordinates), the group
// over which a tied embedding's gradient is summed. Construction is collective over the
// topology's world; comm is nullptr on the other stages and when pp == 1.
struct EmbeddingGroup {
  EmbeddingGroup(const Topology& topo, Device device);
  ~EmbeddingGroup();
  EmbeddingGroup(const EmbeddingGroup&) = delete;
  EmbeddingGroup& operator=(const EmbeddingGroup&) = delete;
  std::unique_ptr<Communicator> comm;

 private:
  MPI_Comm mpi_ = MPI_COMM_NULL;
};

// Tied embeddings under pipeline parallelism (see the top of the file): marks
// model.embed_tokens.weight deferred on the first and last stages, chains a pre_reduce that
// all-reduces its gradient over `embed` (EmbeddingGroup::comm, not owned, outlives zc's use) and
// sets its norm weight to 0 on the last stage. No-op when the model is untied, on middle stages,
// or when the shard is both first and last. `specs`: this rank's parameters (zc's vectors are
// sized to them).
void tie_pipeline_embeddings(ZeroConfig& zc, const std::vector<ParamSpec>& specs, const ModelConfig& c,
                             const ModelShard& shard, Communicator* embed);

// Every stage's timing of the last run, on every rank of the pipeline group: 3 values per stage
// (forward, backward, exchange seconds), stage-major. Collective over pp.
std::vector<double> gather_stage_times(Communicator& pp, const PipelineExecutor::Timing& mine);

// A trainer rank's pipeline (parallel.pipeline > 1): the embedding group, the tied embedding's
// ZeRO settings (added to zc, so build this before the ZeroOptimizer) and the executor of the
// schedule for `micro_batches` per step. Collective over the topology's world. Throws naming the
// keys when the schedule cannot run this many micro-batches (interleaved: a multiple of P).
class TrainerPipeline {
 public:
  TrainerPipeline(const Topology& topo, Device device, Communicator& pp, PipelineKind kind, int micro_batches,
                  int virtual_stages, const ModelConfig& c, const ModelShard& shard,
                  const std::vector<ParamSpec>& specs, ZeroConfig& zc);
  PipelineExecutor& executor() { return exec_; }

 private:
  EmbeddingGroup embed_;
  PipelineExecutor exec_;
};

}  // namespace ievo
