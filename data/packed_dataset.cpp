#include "data/packed_dataset.h"

#include <algorithm>

#include "runtime/error.h"

namespace ievo {

PackedSampleSource::PackedSampleSource(std::unique_ptr<IndexedSampleSource> base)
    : base_(std::move(base)) {
  IEVO_CHECK(base_ != nullptr, "PackedSampleSource: no base source");
}

std::shared_ptr<const std::vector<int64_t>> PackedSampleSource::starts(int d, int64_t epoch) const {
  std::lock_guard<std::mutex> lock(mu_);
  const auto key = std::make_pair(d, epoch);
  if (auto it = cache_.find(key); it != cache_.end()) return it->second;
  const IndexedDataset& ds = base_->dataset(d);
  const std::vector<int64_t> order = base_->epoch_order(d, epoch);
  auto s = std::make_shared<std::vector<int64_t>>(order.size() + 1);
  (*s)[0] = 0;
  for (size_t j = 0; j < order.size(); ++j) (*s)[j + 1] = (*s)[j] + ds.document_length(order[j]);
  if (cache_.size() >= 8) cache_.erase(cache_.begin());  // a few epochs per dataset suffice
  cache_.emplace(key, s);
  return s;
}

std::vector<int32_t> PackedSampleSource::doc_starts(int64_t index) const {
  const int64_t T = seq_len();
  const auto [d, k] = base_->locate(index);
  const int64_t n = base_->dataset(d).num_tokens();  // tokens per epoch
  const int64_t pos0 = k * T;                        // stream position of the sample's token 0
  std::vector<int32_t> out;
  for (int64_t t = 1; t <= T;) {
    const int64_t p = pos0 + t, e = p / n, r = p % n;
    const auto s = starts(d, e);
    // The first document start at or after r in this epoch (s->back() = n: the next epoch).
    const int64_t next = *std::lower_bound(s->begin(), s->end(), r);
    t += next - r;
    if (t <= T) out.push_back(static_cast<int32_t>(t));
    ++t;
  }
  return out;
}

std::unique_ptr<SampleSource> make_sample_source(const std::vector<std::string>& paths,
                                                 const std::vector<double>& weights,
                                                 int64_t seq_len, bool shuffle, bool synthetic,
                                                 bool packing, uint64_t seed, int64_t vocab_size) {
  if (!packing)
    return make_sample_source(paths, weights, seq_len, shuffle, synthetic, seed, vocab_size);
  if (synthetic)
    IEVO_FAIL("data.packing: true needs documents; data.synthetic random tokens have none");
  return std::make_unique<PackedSampleSource>(
      std::make_unique<IndexedSampleSource>(paths, weights, seq_len, seed, shuffle, vocab_size));
}

void read_samples(const SampleSource& src, int64_t first, int64_t count, std::vector<int32_t>* rows,
                  std::vector<std::vector<int32_t>>* doc_starts) {
  const int64_t T = src.seq_len();
  rows->resize(static_cast<size_t>(count * (T + 1)));
  for (int64_t r = 0; r < count; ++r) src.get(first + r, rows->data() + r * (T + 1));
  doc_starts->clear();
  if (const auto* packed = dynamic_cast<const PackedSampleSource*>(&src))
    for (int64_t r = 0; r < count; ++r) doc_starts->push_back(packed->doc_starts(first + r));
}

}  // namespace ievo
