// GPT pretraining samples. A sample is seq_len + 1 consecutive tokens; a batch takes
// inputs = tokens[0, T) and targets = tokens[1, T] of each sample.
//
// IndexedSampleSource, one dataset: the token stream is its documents concatenated, epoch after
// epoch. Epoch e lists the documents in file order (shuffle = false) or in a permutation drawn by
// Fisher-Yates from mt19937_64 seeded with seed_seq{seed, dataset, e} (identical on every
// platform). Sample k is the T + 1 tokens starting at stream position k * T, so consecutive
// samples share one token, as in Megatron's GPTDataset. Lookups are O(log documents) through the
// per-epoch prefix sums of document lengths (a few epochs are cached).
//
// Several datasets are blended as in Megatron's BlendedDataset (helpers.cpp,
// build_blending_indices): with normalized weights w and per-dataset counts c (all 0 at first),
// global sample i goes to d = argmax_d (w_d * max(i, 1) - c_d) (ties: lowest d) and is that
// dataset's sample c_d; then c_d += 1. Counts are snapshotted every few thousand samples so that
// any i (e.g. after resuming) is found without storing the whole assignment.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/indexed_dataset.h"

namespace ievo {

class SampleSource {
 public:
  virtual ~SampleSource() = default;
  virtual int64_t seq_len() const = 0;
  virtual int64_t vocab_size() const = 0;
  // Writes the seq_len() + 1 tokens of sample `index` (any index >= 0; deterministic; thread-safe).
  virtual void get(int64_t index, int32_t* out) const = 0;
  virtual std::string describe() const = 0;  // one line for the log
};

// Samples [first, first + batch): inputs[b * T + t] = tokens_b[t], targets[b * T + t] =
// tokens_b[t + 1]; both arrays hold batch * T entries.
// (models/batch.h turns rows of T + 1 tokens into the packed Batch the model takes.)
void fill_batch(const SampleSource& src, int64_t first, int64_t batch, int32_t* inputs,
                int32_t* targets);

namespace detail {
struct DocStream;
struct Blend;
}  // namespace detail

class IndexedSampleSource : public SampleSource {
 public:
  // prefixes: Megatron dataset prefixes (PREFIX.bin / PREFIX.idx); weights: one per prefix, or
  // empty for equal weights. Every token read is checked against vocab_size (an error names the
  // .bin file, the document and the token).
  IndexedSampleSource(const std::vector<std::string>& prefixes, std::vector<double> weights,
                      int64_t seq_len, uint64_t seed, bool shuffle, int64_t vocab_size);
  ~IndexedSampleSource() override;

  int64_t seq_len() const override { return seq_len_; }
  int64_t vocab_size() const override { return vocab_size_; }
  void get(int64_t index, int32_t* out) const override;
  std::string describe() const override;

  int num_datasets() const { return static_cast<int>(streams_.size()); }
  const IndexedDataset& dataset(int d) const;
  const std::vector<double>& weights() const { return weights_; }  // normalized
  // Global sample `index` is sample .second of dataset .first.
  std::pair<int, int64_t> locate(int64_t index) const;
  // Documents of dataset d in the order epoch e uses.
  std::vector<int64_t> epoch_order(int d, int64_t epoch) const;

 private:
  int64_t seq_len_, vocab_size_;
  std::vector<double> weights_;
  std::vector<std::unique_ptr<detail::DocStream>> streams_;
  std::unique_ptr<detail::Blend> blend_;
};

// Uniform random tokens, a pure function of (seed, stream position): sample k is positions
// [k * T, k * T + T] like the indexed source. For benchmarks.
class SyntheticSampleSource : public SampleSource {
 public:
  SyntheticSampleSource(int64_t vocab_size, int64_t seq_len, uint64_t seed);
  int64_t seq_len() const override { return seq_len_; }
  int64_t vocab_size() const override { return vocab_size_; }
  void get(int64_t index, int32_t* out) const override;
  std::string describe() const override;

 private:
  int64_t vocab_size_, seq_len_;
  uint64_t seed_;
};

// The source for a `data:` config section (the trainer passes data.paths, data.weights,
// data.seq_len, data.shuffle, data.synthetic). Errors name those keys.
std::unique_ptr<SampleSource> make_sample_source(const std::vector<std::string>& paths,
                                                 const std::vector<double>& weights,
                                                 int64_t seq_len, bool shuffle, bool synthetic,
                                                 uint64_t seed, int64_t vocab_size);

}  // namespace ievo
