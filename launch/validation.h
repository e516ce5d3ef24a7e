// Validation during training (data.valid_paths, train.eval_every, train.eval_batches) and the
// micro-batch loader shared with the training loop.
//
// The validation set is its own sample source over data.valid_paths (never shuffled, same
// data.seq_len and data.packing as training), so evaluating never touches the training stream.
// Every evaluation reads the same samples: micro-batches 0, 1, ..., n-1 of train.micro_batch_size
// samples, n = train.eval_batches rounded up to a multiple of the data-parallel size (each rank
// takes every dp-th micro-batch; all ranks run the same number of forwards, which ZeRO-3's
// per-layer gathers need) and capped so that no sample repeats (the set's tokens / (B * T), at
// least one micro-batch). val_loss = summed token cross-entropy / counted targets over them,
// reduced over the ranks; val_ppl = exp(val_loss).
// Evaluation runs after the steps where step % eval_every == 0 (eval_every > 0) and after the
// last step, whenever data.valid_paths is set.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "data/gpt_dataset.h"
#include "launch/config.h"
#include "models/batch.h"
#include "models/llama.h"

namespace ievo {

class Communicator;
class PipelineExecutor;

// Samples [first, first + B) of src as a Batch on `device`: make_packed_batch when src is a
// PackedSampleSource (data.packing), else make_batch.
Batch load_batch(const SampleSource& src, int64_t first, int64_t B, Device device);

struct EvalResult {
  double loss = 0, ppl = 0;
  int64_t targets = 0;  // target tokens counted, over all ranks
  int64_t batches = 0;  // micro-batches, over all ranks
};

class Validator {
 public:
  // No validation set (data.valid_paths empty): enabled() is false.
  Validator(const Config& cfg, int64_t vocab_size, Device device, int dp, int dp_rank);
  bool enabled() const { return source_ != nullptr; }
  bool due(int64_t step) const;
  // Forward passes over the validation micro-batches of this rank; sums reduced with comm
  // (nullptr: a single process). With `pipeline` (parallel.pipeline > 1) they run through its
  // forward-only schedule (parallel/pipeline.h) and every stage gets the loss.
  EvalResult run(Llama& model, const ParamStore& weights, Communicator* comm,
                 PipelineExecutor* pipeline = nullptr) const;
  std::string describe() const;  // for the setup log line
  // Ulysses (parallel/tensor_parallel.h): the S ranks of a sequence group evaluate the same
  // micro-batches (dp, dp_rank above count data groups), each its contiguous 1/S of the tokens.
  void set_sequence_split(int S, int rank) { sp_ = S, sp_rank_ = rank; }

 private:
  const Config& cfg_;
  Device device_;
  int dp_ = 1, dp_rank_ = 0;
  int sp_ = 1, sp_rank_ = 0;
  int64_t batches_ = 0;  // micro-batches per evaluation, all ranks together
  std::unique_ptr<SampleSource> source_;
};

}  // namespace ievo
