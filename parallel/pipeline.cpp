#include "parallel/pipeline.h"

#include <chrono>
#include <map>
#include <tuple>
#include <utility>

#include "runtime/error.h"

namespace ievo {
namespace {

using MessageKey = std::tuple<bool, int, int>;  // (grad, micro, producing virtual stage)
MessageKey key(const PipeMessage& m) { return {m.grad, m.micro, m.vstage}; }

double seconds_since(std::chrono::steady_clock::time_point t0, const std::function<void()>& sync) {
  if (sync) sync();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

PipelineExecutor::PipelineExecutor(PipelineSchedule schedule, Communicator& pp)
    : schedule_(std::move(schedule)), pp_(pp) {
  IEVO_CHECK(schedule_.stages == pp_.size(), "pipeline schedule for ", schedule_.stages,
             " stages on a pipeline group of ", pp_.size(), " ranks");
  check_pipeline_schedule(schedule_);  // throws if it could deadlock or mismatch
}

LossSum PipelineExecutor::run(Llama& model, const ParamStore& weights, ParamStore& grads,
                              const std::vector<Batch>& micros, double grad_scale) {
  return execute(schedule_, model, weights, &grads, micros, grad_scale);
}

LossSum PipelineExecutor::evaluate(Llama& model, const ParamStore& weights, const std::vector<Batch>& micros) {
  const int m = static_cast<int>(micros.size());
  if (!eval_ || eval_->micro_batches != m) {
    eval_ = std::make_unique<PipelineSchedule>(make_forward_schedule(schedule_.stages, m, schedule_.chunks));
    check_pipeline_schedule(*eval_);
  }
  return execute(*eval_, model, weights, nullptr, micros, 1.0);
}

void PipelineExecutor::connect(Device device) {
  std::vector<Communicator::P2POp> ops;
  for (int q = 0; q < pp_.size(); ++q) {
    if (q == pp_.rank()) continue;
    ops.push_back({true, Tensor::zeros({1}, DType::F32, device), q});
    ops.push_back({false, Tensor::empty({1}, DType::F32, device), q});
  }
  pp_.exchange(ops);
  connected_ = true;
}

LossSum PipelineExecutor::execute(const PipelineSchedule& s, Llama& model, const ParamStore& weights,
                                  ParamStore* grads, const std::vector<Batch>& micros, double grad_scale) {
  if (!connected_) connect(weights.device());  // every stage's first step: collective
  const int stage = pp_.rank(), S = s.num_vstages();
  IEVO_CHECK(static_cast<int>(micros.size()) == s.micro_batches, "pipeline: ", micros.size(),
             " micro-batches for a schedule of ", s.micro_batches);
  IEVO_CHECK(model.shard().num_chunks() == s.chunks, "pipeline: the model holds ", model.shard().num_chunks(),
             " chunks, the schedule runs ", s.chunks);
  IEVO_CHECK(model.shard().first == (stage == 0) && model.shard().last == (stage == s.stages - 1),
             "pipeline: stage ", stage, " of ", s.stages, " holds a shard with first = ", model.shard().first,
             ", last = ", model.shard().last);
  const int64_t d = model.config().hidden_size;
  timing_ = Timing{};
  std::map<MessageKey, Tensor> inbox, outbox;
  std::map<std::pair<int, int>, StageActs> acts;  // (micro, chunk) forwarded, not yet backwarded
  LossSum ls;
  for (const PipeOp& op : s.programs[stage]) {
    const auto t0 = std::chrono::steady_clock::now();
    if (op.type == PipeOp::Type::Exchange) {
      std::vector<Communicator::P2POp> ops;
      for (const PipeTransfer& t : op.transfers) {
        if (t.send) {
          auto it = outbox.find(key(t.msg));
          IEVO_CHECK(it != outbox.end(), "pipeline stage ", stage, ": nothing to send for ", t.msg.str());
          ops.push_back({true, it->second, t.peer});
        } else {
          const Batch& b = micros[t.msg.micro];
          Tensor buf = Tensor::empty({rows_ ? rows_(b) : b.num_tokens(), d}, weights.dtype(), weights.device());
          IEVO_CHECK(inbox.emplace(key(t.msg), buf).second, "pipeline stage ", stage, ": ", t.msg.str(),
                     " received twice");
          ops.push_back({false, buf, t.peer});
        }
      }
      pp_.exchange(ops);
      for (const PipeTransfer& t : op.transfers)
        if (t.send) outbox.erase(key(t.msg));
      timing_.exchange_s += seconds_since(t0, sync_);
      continue;
    }
    const int v = s.vstage(stage, op.chunk);
    const Batch& b = micros[op.micro];
    const auto mc = std::make_pair(op.micro, op.chunk);
    auto take = [&](const PipeMessage& m) {
      auto it = inbox.find(key(m));
      IEVO_CHECK(it != inbox.end(), "pipeline stage ", stage, ": ", op.str(), " before ", m.str(), " arrived");
      Tensor t = std::move(it->second);
      inbox.erase(it);
      return t;
    };
    if (op.type == PipeOp::Type::Forward) {
      const Tensor in = v > 0 ? take({false, op.micro, v - 1}) : Tensor();
      StageActs* a = nullptr;  // forward only (evaluation): nothing kept
      if (!s.forward_only) {
        auto [it, fresh] = acts.try_emplace(mc);
        IEVO_CHECK(fresh, "pipeline stage ", stage, ": ", op.str(), " runs twice");
        a = &it->second;
      }
      Tensor out = model.stage_forward(weights, op.chunk, b, in, a, grad_scale, grads, &ls);
      if (v < S - 1) outbox[key({false, op.micro, v})] = out;
      timing_.forward_s += seconds_since(t0, sync_);
    } else {
      const Tensor dy = v < S - 1 ? take({true, op.micro, v + 1}) : Tensor();
      auto it = acts.find(mc);
      IEVO_CHECK(it != acts.end(), "pipeline stage ", stage, ": ", op.str(), " before its forward");
      Tensor dx = model.stage_backward(weights, op.chunk, b, it->second, dy, *grads);
      acts.erase(it);
      if (v > 0) outbox[key({true, op.micro, v})] = dx;
      timing_.backward_s += seconds_since(t0, sync_);
    }
  }
  IEVO_CHECK(inbox.empty() && outbox.empty() && acts.empty(), "pipeline stage ", stage, ": ", inbox.size(),
             " received tensors unused, ", outbox.size(), " unsent, ", acts.size(), " micro-batches without backward");
  // The last stage computed the loss; every stage reports it.
  ls.sum = pp_.all_reduce_sum(ls.sum);
  ls.count = pp_.all_reduce_sum(ls.count);
  return ls;
}

std::vector<double> gather_stage_times(Communicator& pp, const PipelineExecutor::Timing& mine) {
  std::vector<double> out(3 * static_cast<size_t>(pp.size()), 0.0);
  const size_t r = 3 * static_cast<size_t>(pp.rank());
  out[r] = mine.forward_s, out[r + 1] = mine.backward_s, out[r + 2] = mine.exchange_s;
  for (double& x : out) x = pp.all_reduce_sum(x);  // a few host scalars per step (ievo bench)
  return out;
}

EmbeddingGroup::EmbeddingGroup(const Topology& topo, Device device) {
  if (topo.pp() == 1 || topo.world_comm() == MPI_COMM_NULL) return;
  const int p = topo.pp_rank();
  const bool member = p == 0 || p == topo.pp() - 1;
  // One group per (data, tensor) coordinate; stage order inside it (first stage = rank 0).
  MPI_Comm_split(topo.world_comm(), member ? topo.dp_rank() * topo.tp() + topo.tp_rank() : MPI_UNDEFINED, p,
                 &mpi_);
  if (member) comm = make_communicator(device, mpi_);
}

EmbeddingGroup::~EmbeddingGroup() {
  comm.reset();  // before the MPI communicator it uses
  if (mpi_ != MPI_COMM_NULL && mpi_active()) MPI_Comm_free(&mpi_);
}

void tie_pipeline_embeddings(ZeroConfig& zc, const std::vector<ParamSpec>& specs, const ModelConfig& c,
                             const ModelShard& shard, Communicator* embed) {
  if (!c.tie_embeddings || (shard.first && shard.last) || !(shard.first || shard.last)) return;
  size_t idx = specs.size();
  for (size_t i = 0; i < specs.size(); ++i)
    if (specs[i].name == "model.embed_tokens.weight") idx = i;
  IEVO_CHECK(idx < specs.size(), "tied embeddings: stage without model.embed_tokens.weight");
  IEVO_CHECK(embed != nullptr && embed->size() == 2, "tied embeddings: the pipeline's first and last stage "
             "need their embedding group (2 ranks)");
  if (zc.deferred.empty()) zc.deferred.assign(specs.size(), false);
  if (zc.norm_weight.empty()) zc.norm_weight.assign(specs.size(), 1.0);
  IEVO_CHECK(zc.deferred.size() == specs.size() && zc.norm_weight.size() == specs.size(),
             "tied embeddings: ZeroConfig vectors of another size than the parameters");
  zc.deferred[idx] = true;
  if (shard.last) zc.norm_weight[idx] = 0;  // the copy: counted on the first stage
  auto before = std::move(zc.pre_reduce);
  zc.pre_reduce = [before, idx, embed](ParamStore& grads) {
    if (before) before(grads);
    embed->all_reduce(grads[idx]);
  };
}

TrainerPipeline::TrainerPipeline(const Topology& topo, Device device, Communicator& pp, PipelineKind kind,
                                 int micro_batches, int virtual_stages, const ModelConfig& c,
                                 const ModelShard& shard, const std::vector<ParamSpec>& specs, ZeroConfig& zc)
    : embed_(topo, device),
      exec_(make_pipeline_schedule(kind, topo.pp(), micro_batches, virtual_stages), pp) {
  tie_pipeline_embeddings(zc, specs, c, shard, embed_.comm.get());
}

}  // namespace ievo
