#include "data/gpt_dataset.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <random>
#include <sstream>

#include "runtime/error.h"

namespace ievo {

namespace {
// Unbiased integer in [0, n) by rejection: keep r >= 2^64 mod n, so that the accepted range is a
// multiple of n. (std::uniform_int_distribution differs between standard libraries.)
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;
  for (;;) {
    const uint64_t r = rng();
    if (r >= threshold) return r % n;
  }
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

namespace detail {

// The endless token stream of one dataset.
struct DocStream {
  struct Epoch {
    std::vector<int64_t> order;  // document at each position; empty = file order
    std::vector<int64_t> start;  // start[j] = stream offset of position j within the epoch; [D] = N
  };

  std::shared_ptr<IndexedDataset> ds;
  int index = 0;  // position among the blended datasets (part of the shuffle seed)
  uint64_t seed = 0;
  bool shuffle = false;
  int64_t vocab_size = 0;
  int64_t tokens_per_epoch = 0;
  std::vector<int64_t> doc_len;

  mutable std::mutex mu;
  mutable std::map<int64_t, std::shared_ptr<const Epoch>> cache;  // by epoch number
  static constexpr size_t kCachedEpochs = 3;

  std::vector<int64_t> permutation(int64_t e) const {
    const int64_t D = static_cast<int64_t>(doc_len.size());
    std::vector<int64_t> order(static_cast<size_t>(D));
    for (int64_t j = 0; j < D; ++j) order[j] = j;
    std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                      static_cast<uint32_t>(index), static_cast<uint32_t>(e),
                      static_cast<uint32_t>(static_cast<uint64_t>(e) >> 32)};
    std::mt19937_64 rng(seq);
    for (int64_t i = D - 1; i > 0; --i)  // Fisher-Yates
      std::swap(order[i], order[uniform_below(rng, static_cast<uint64_t>(i) + 1)]);
    return order;
  }

  std::shared_ptr<const Epoch> epoch(int64_t e) const {
    if (!shuffle) e = 0;  // every epoch is the file order
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = cache.find(e); it != cache.end()) return it->second;
    auto ep = std::make_shared<Epoch>();
    if (shuffle) ep->order = permutation(e);
    const size_t D = doc_len.size();
    ep->start.resize(D + 1);
    ep->start[0] = 0;
    for (size_t j = 0; j < D; ++j)
      ep->start[j + 1] = ep->start[j] + doc_len[ep->order.empty() ? j : ep->order[j]];
    if (cache.size() >= kCachedEpochs) {  // evict the epoch farthest from the requested one
      auto far = std::max_element(cache.begin(), cache.end(), [e](const auto& a, const auto& b) {
        return std::abs(a.first - e) < std::abs(b.first - e);
      });
      cache.erase(far);
    }
    cache.emplace(e, ep);
    return ep;
  }

  // n tokens from stream position pos.
  void read(int64_t pos, int64_t n, int32_t* out) const {
    while (n > 0) {
      const int64_t e = pos / tokens_per_epoch;
      int64_t r = pos % tokens_per_epoch;
      const auto ep = epoch(e);
      const int64_t D = static_cast<int64_t>(doc_len.size());
      // last position whose start <= r (its document is non-empty since the next start > r)
      int64_t j = std::upper_bound(ep->start.begin(), ep->start.end(), r) - ep->start.begin() - 1;
      for (; j < D && n > 0; ++j) {
        const int64_t doc = ep->order.empty() ? j : ep->order[j];
        const int64_t off = r - ep->start[j];
        const int64_t take = std::min(n, doc_len[doc] - off);
        if (take <= 0) continue;
        ds->read_document(doc, off, take, out);
        for (int64_t k = 0; k < take; ++k) {
          if (out[k] >= vocab_size)
            IEVO_FAIL("token id ", out[k], " >= vocab size ", vocab_size, " in ", ds->bin_path(),
                      " (document ", doc, ")");
          if (out[k] < 0)
            IEVO_FAIL("token id ", out[k], " < 0 in ", ds->bin_path(), " (document ", doc, ")");
        }
        out += take;
        n -= take;
        pos += take;
        r += take;
      }
    }
  }
};

// Megatron's blending rule with count snapshots every kBlock samples.
struct Blend {
  static constexpr int64_t kBlock = 4096;
  std::vector<double> w;
  mutable std::mutex mu;
  mutable std::vector<int64_t> snaps;  // counts before sample b * kBlock: [b * D + d]
  mutable int64_t cached_block = -1;
  mutable std::vector<std::pair<int, int64_t>> block;

  // Assigns sample i given the counts before it; updates the counts.
  std::pair<int, int64_t> step(int64_t i, int64_t* counts) const {
    const double x = std::max(static_cast<double>(i), 1.0);
    int best = 0;
    double best_err = w[0] * x - static_cast<double>(counts[0]);
    for (size_t d = 1; d < w.size(); ++d) {
      const double err = w[d] * x - static_cast<double>(counts[d]);
      if (err > best_err) {
        best_err = err;
        best = static_cast<int>(d);
      }
    }
    return {best, counts[best]++};
  }

  std::pair<int, int64_t> locate(int64_t i) const {
    const int64_t D = static_cast<int64_t>(w.size()), b = i / kBlock;
    std::lock_guard<std::mutex> lock(mu);
    if (b != cached_block) {
      if (snaps.empty()) snaps.assign(static_cast<size_t>(D), 0);
      std::vector<int64_t> counts;
      while (static_cast<int64_t>(snaps.size()) / D <= b) {  // extend snapshots to block b
        const int64_t last = static_cast<int64_t>(snaps.size()) / D - 1;
        counts.assign(snaps.end() - D, snaps.end());
        for (int64_t k = last * kBlock; k < (last + 1) * kBlock; ++k) step(k, counts.data());
        snaps.insert(snaps.end(), counts.begin(), counts.end());
      }
      counts.assign(snaps.begin() + b * D, snaps.begin() + (b + 1) * D);
      block.resize(kBlock);
      for (int64_t k = 0; k < kBlock; ++k) block[k] = step(b * kBlock + k, counts.data());
      cached_block = b;
    }
    return block[i - b * kBlock];
  }
};

}  // namespace detail

// ---------------------------------------------------------------------------------------------

void fill_batch(const SampleSource& src, int64_t first, int64_t batch, int32_t* inputs,
                int32_t* targets) {
  const int64_t T = src.seq_len();
  std::vector<int32_t> tok(static_cast<size_t>(T + 1));
  for (int64_t b = 0; b < batch; ++b) {
    src.get(first + b, tok.data());
    std::copy(tok.begin(), tok.end() - 1, inputs + b * T);
    std::copy(tok.begin() + 1, tok.end(), targets + b * T);
  }
}

IndexedSampleSource::IndexedSampleSource(const std::vector<std::string>& prefixes,
                                         std::vector<double> weights, int64_t seq_len,
                                         uint64_t seed, bool shuffle, int64_t vocab_size)
    : seq_len_(seq_len), vocab_size_(vocab_size) {
  if (prefixes.empty())
    IEVO_FAIL("data.paths is empty: give at least one Megatron dataset prefix "
              "(PREFIX.bin/PREFIX.idx), or set data.synthetic: true");
  if (weights.empty()) weights.assign(prefixes.size(), 1.0);
  if (weights.size() != prefixes.size())
    IEVO_FAIL("data.weights has ", weights.size(), " entries but data.paths has ",
              prefixes.size(), " (one weight per path)");
  double sum = 0;
  for (size_t d = 0; d < weights.size(); ++d) {
    if (!(weights[d] >= 0) || !std::isfinite(weights[d]))
      IEVO_FAIL("data.weights[", d, "] = ", weights[d], " (for ", prefixes[d],
                "): weights must be finite and >= 0");
    sum += weights[d];
  }
  if (!(sum > 0)) IEVO_FAIL("data.weights are all 0");
  for (double& w : weights) w /= sum;
  weights_ = weights;
  if (seq_len <= 0) IEVO_FAIL("data.seq_len must be > 0 (got ", seq_len, ")");
  IEVO_CHECK(vocab_size > 0, "vocab size must be > 0 (got ", vocab_size, ")");

  for (size_t d = 0; d < prefixes.size(); ++d) {
    auto s = std::make_unique<detail::DocStream>();
    s->ds = IndexedDataset::open(prefixes[d]);
    s->index = static_cast<int>(d);
    s->seed = seed;
    s->shuffle = shuffle;
    s->vocab_size = vocab_size;
    const int64_t D = s->ds->num_documents();
    s->doc_len.resize(static_cast<size_t>(D));
    for (int64_t j = 0; j < D; ++j) s->doc_len[j] = s->ds->document_length(j);
    s->tokens_per_epoch = s->ds->num_tokens();
    if (s->tokens_per_epoch == 0)
      IEVO_FAIL(s->ds->bin_path(), ": dataset has no tokens (data.paths[", d, "])");
    streams_.push_back(std::move(s));
  }
  blend_ = std::make_unique<detail::Blend>();
  blend_->w = weights_;
}

IndexedSampleSource::~IndexedSampleSource() = default;

const IndexedDataset& IndexedSampleSource::dataset(int d) const { return *streams_.at(d)->ds; }

std::pair<int, int64_t> IndexedSampleSource::locate(int64_t index) const {
  IEVO_CHECK(index >= 0, "sample index ", index, " < 0");
  if (streams_.size() == 1) return {0, index};
  return blend_->locate(index);
}

void IndexedSampleSource::get(int64_t index, int32_t* out) const {
  const auto [d, k] = locate(index);
  streams_[d]->read(k * seq_len_, seq_len_ + 1, out);
}

std::vector<int64_t> IndexedSampleSource::epoch_order(int d, int64_t epoch) const {
  const auto ep = streams_.at(d)->epoch(epoch);
  if (!ep->order.empty()) return ep->order;
  std::vector<int64_t> order(streams_[d]->doc_len.size());
  for (size_t j = 0; j < order.size(); ++j) order[j] = static_cast<int64_t>(j);
  return order;
}

std::string IndexedSampleSource::describe() const {
  std::ostringstream os;
  os << "indexed data, seq_len " << seq_len_ << ", " << (streams_[0]->shuffle ? "shuffled" : "in order");
  for (size_t d = 0; d < streams_.size(); ++d) {
    const auto& ds = *streams_[d]->ds;
    os << (d ? "; " : ": ") << ds.prefix() << " (" << ds.num_documents() << " docs, "
       << ds.num_tokens() << " tokens, " << dtype_code_name(ds.dtype_code()) << ", weight "
       << weights_[d] << ")";
  }
  return os.str();
}

// ---------------------------------------------------------------------------------------------

SyntheticSampleSource::SyntheticSampleSource(int64_t vocab_size, int64_t seq_len, uint64_t seed)
    : vocab_size_(vocab_size), seq_len_(seq_len), seed_(splitmix64(seed)) {
  IEVO_CHECK(vocab_size > 0, "synthetic data: vocab size must be > 0 (got ", vocab_size, ")");
  if (seq_len <= 0) IEVO_FAIL("data.seq_len must be > 0 (got ", seq_len, ")");
}

void SyntheticSampleSource::get(int64_t index, int32_t* out) const {
  IEVO_CHECK(index >= 0, "sample index ", index, " < 0");
  const uint64_t pos0 = static_cast<uint64_t>(index) * static_cast<uint64_t>(seq_len_);
  for (int64_t t = 0; t <= seq_len_; ++t)
    out[t] = static_cast<int32_t>(splitmix64(seed_ ^ (pos0 + t) * 0xD1B54A32D192ED03ull) %
                                  static_cast<uint64_t>(vocab_size_));
}

std::string SyntheticSampleSource::describe() const {
  std::ostringstream os;
  os << "synthetic data: uniform tokens < " << vocab_size_ << ", seq_len " << seq_len_;
  return os.str();
}

std::unique_ptr<SampleSource> make_sample_source(const std::vector<std::string>& paths,
                                                 const std::vector<double>& weights,
                                                 int64_t seq_len, bool shuffle, bool synthetic,
                                                 uint64_t seed, int64_t vocab_size) {
  if (synthetic) return std::make_unique<SyntheticSampleSource>(vocab_size, seq_len, seed);
  return std::make_unique<IndexedSampleSource>(paths, weights, seq_len, seed, shuffle, vocab_size);
}

}  // namespace ievo
