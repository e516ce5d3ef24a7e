// Packed samples (data.packing: true): the same T + 1 tokens as IndexedSampleSource's sample k
// (documents concatenated, epoch after epoch, cut every T tokens), plus where documents begin
// inside the sample. models/batch.h (make_packed_batch) turns them into sequences that attention
// never crosses, with positions restarting per document and no loss on the token that would
// predict the next document from the previous one. Boundaries come from the .idx document index
// (not from the EOD id), so data without EOD tokens packs correctly too; an epoch's end is a
// boundary as well.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "data/gpt_dataset.h"

namespace ievo {

class PackedSampleSource : public SampleSource {
 public:
  explicit PackedSampleSource(std::unique_ptr<IndexedSampleSource> base);

  int64_t seq_len() const override { return base_->seq_len(); }
  int64_t vocab_size() const override { return base_->vocab_size(); }
  void get(int64_t index, int32_t* out) const override { base_->get(index, out); }
  std::string describe() const override { return "packed " + base_->describe(); }

  // Offsets t in [1, T], ascending, at which token t of sample `index` is the first token of a
  // document (t = T: the sample's last token, a target only, starts the next document).
  std::vector<int32_t> doc_starts(int64_t index) const;
  const IndexedSampleSource& base() const { return *base_; }

 private:
  // Stream offsets at which the documents of epoch e of dataset d begin, ascending, ending with
  // the epoch's token count (empty documents repeat an offset).
  std::shared_ptr<const std::vector<int64_t>> starts(int d, int64_t epoch) const;

  std::unique_ptr<IndexedSampleSource> base_;
  mutable std::mutex mu_;
  mutable std::map<std::pair<int, int64_t>, std::shared_ptr<const std::vector<int64_t>>> cache_;
};

// The `data:` sources of the trainer: PackedSampleSource when packing (needs files: packing
// synthetic data is an error naming data.packing), else make_sample_source.
std::unique_ptr<SampleSource> make_sample_source(const std::vector<std::string>& paths,
                                                 const std::vector<double>& weights,
                                                 int64_t seq_len, bool shuffle, bool synthetic,
                                                 bool packing, uint64_t seed, int64_t vocab_size);

// Reads samples [first, first + count) as rows of T + 1 tokens; with a PackedSampleSource also
// each row's document starts (else doc_starts is left empty).
void read_samples(const SampleSource& src, int64_t first, int64_t count, std::vector<int32_t>* rows,
                  std::vector<std::vector<int32_t>>* doc_starts);

}  // namespace ievo
