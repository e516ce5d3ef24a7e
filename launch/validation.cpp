#include "launch/validation.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "data/packed_dataset.h"
#include "parallel/communicator.h"
#include "parallel/pipeline.h"
#include "parallel/tensor_parallel.h"

namespace ievo {

Batch load_batch(const SampleSource& src, int64_t first, int64_t B, Device device) {
  std::vector<int32_t> rows;
  std::vector<std::vector<int32_t>> starts;
  read_samples(src, first, B, &rows, &starts);
  const int64_t T = src.seq_len();
  Batch b = starts.empty() ? make_batch(rows, B, T) : make_packed_batch(rows, starts, B, T);
  return device == Device::CPU ? b : b.to(device);
}

Validator::Validator(const Config& cfg, int64_t vocab_size, Device device, int dp, int dp_rank)
    : cfg_(cfg), device_(device), dp_(dp), dp_rank_(dp_rank) {
  const DataConfig& d = cfg.data;
  if (d.valid_paths.empty()) return;
  source_ = make_sample_source(d.valid_paths, {}, d.seq_len, /*shuffle=*/false, /*synthetic=*/false,
                               d.packing, cfg.run.seed, vocab_size);
  const auto& base = d.packing ? dynamic_cast<const PackedSampleSource&>(*source_).base()
                               : dynamic_cast<const IndexedSampleSource&>(*source_);
  int64_t tokens = 0;  // all validation datasets (blended with equal weights)
  for (int i = 0; i < base.num_datasets(); ++i) tokens += base.dataset(i).num_tokens();
  const int64_t B = cfg.train.micro_batch_size;
  const int64_t fit = std::max<int64_t>(1, (tokens - 1) / (B * d.seq_len));
  batches_ = std::min(cfg.train.eval_batches, fit);
  batches_ = (batches_ + dp_ - 1) / dp_ * dp_;
}

bool Validator::due(int64_t step) const {
  if (!enabled()) return false;
  const int64_t every = cfg_.train.eval_every;
  return (every > 0 && step % every == 0) || step == cfg_.train.steps;
}

EvalResult Validator::run(Llama& model, const ParamStore& weights, Communicator* comm,
                          PipelineExecutor* pipeline) const {
  IEVO_CHECK(enabled(), "validation without data.valid_paths");
  const int64_t B = cfg_.train.micro_batch_size;
  double sum = 0;
  int64_t count = 0, batches = 0;
  std::vector<Batch> micros;  // pipeline: all of this rank's micro-batches in one schedule
  for (int64_t j = dp_rank_; j < batches_; j += dp_) {
    Batch b = sequence_slice(load_batch(*source_, j * B, B, device_), sp_, sp_rank_);
    batches += sp_rank_ == 0;  // a Ulysses group's micro-batch counts once
    if (pipeline) {
      micros.push_back(std::move(b));
      continue;
    }
    const LossSum ls = model.loss(weights, b);
    sum += ls.sum;
    count += ls.count;
  }
  if (pipeline) {
    const LossSum ls = pipeline->evaluate(model, weights, micros);
    sum = ls.sum;
    count = ls.count;
  }
  if (comm) {
    sum = comm->all_reduce_sum(sum);
    count = comm->all_reduce_sum(count);
    batches = comm->all_reduce_sum(batches);
  }
  EvalResult r;
  r.targets = count;
  r.batches = batches;
  r.loss = count > 0 ? sum / static_cast<double>(count) : NAN;
  r.ppl = std::exp(r.loss);
  return r;
}

std::string Validator::describe() const {
  if (!enabled()) return "no validation";
  std::ostringstream os;
  os << "validation: " << batches_ << " micro-batches of " << cfg_.train.micro_batch_size
     << " from " << source_->describe();
  if (cfg_.train.eval_every > 0) os << ", every " << cfg_.train.eval_every << " steps";
  else os << ", after the last step";
  return os.str();
}

}  // namespace ievo
