// Packing (data.packing): document starts of packed samples, make_packed_batch (cu_seqlens,
// positions, ignored cross-document targets), and the model-level identity in f64: the loss of a
// packed batch equals the sum of its documents' losses computed one by one.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "data/indexed_dataset.h"
#include "data/packed_dataset.h"
#include "models/batch.h"
#include "models/llama.h"
#include "util.h"

using namespace ievo;

namespace {

ModelConfig tiny_model() {
  ModelConfig c;
  c.vocab_size = 50;
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 48;
  c.max_position_embeddings = 64;
  c.init_std = 0.2;  // large enough that the logits differ clearly between contexts
  return c;
}

// Documents of the given lengths, tokens in [2, 50) and a last token EOD = 1 (length 0: empty).
std::vector<std::vector<int32_t>> make_docs(const std::vector<int>& lengths, uint64_t seed) {
  std::vector<std::vector<int32_t>> docs;
  uint64_t x = seed;
  for (int len : lengths) {
    std::vector<int32_t> d;
    for (int i = 0; i + 1 < len; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      d.push_back(2 + static_cast<int32_t>((x >> 33) % 48));
    }
    if (len > 0) d.push_back(1);
    docs.push_back(d);
  }
  return docs;
}

std::string write(const std::string& prefix, const std::vector<std::vector<int32_t>>& docs) {
  IndexedDatasetWriter w(prefix, kDtypeU16);
  for (const auto& d : docs) w.add_document(d);
  w.finalize();
  return prefix;
}

// Loss of one sequence alone: inputs tok[0, n), targets tgt (same length), positions 0..n-1.
LossSum loss_alone(Llama& m, const ParamStore& p, const std::vector<int32_t>& in,
                   const std::vector<int32_t>& tgt) {
  const int64_t n = static_cast<int64_t>(in.size());
  Batch b;
  b.inputs = Tensor::from_vector(in, {n});
  b.targets = Tensor::from_vector(tgt, {n});
  std::vector<int32_t> pos(in.size());
  std::iota(pos.begin(), pos.end(), 0);
  b.positions = Tensor::from_vector(pos, {n});
  b.cu_seqlens = Tensor::from_vector(std::vector<int32_t>{0, static_cast<int32_t>(n)}, {2});
  b.max_seqlen = static_cast<int>(n);
  return m.loss(p, b);
}

}  // namespace

TEST(Packing, MakePackedBatchCutsAtDocumentStarts) {
  // One row of T = 8 inputs: tokens 10..18; documents start at offsets 3 and 8 (the target-only
  // token). Row 2 has no boundary.
  std::vector<int32_t> rows;
  for (int r = 0; r < 2; ++r)
    for (int t = 0; t <= 8; ++t) rows.push_back(10 * (r + 1) + t);
  Batch b = make_packed_batch(rows, {{3, 8}, {}}, 2, 8);
  EXPECT_EQ(b.cu_seqlens.to_double_vector(), (std::vector<double>{0, 3, 8, 16}));
  EXPECT_EQ(b.max_seqlen, 8);
  EXPECT_EQ(b.positions.to_double_vector(),
            (std::vector<double>{0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(b.targets.to_double_vector(),
            (std::vector<double>{11, 12, -100, 14, 15, 16, 17, -100,  //
                                 21, 22, 23, 24, 25, 26, 27, 28}));
  EXPECT_EQ(b.num_targets(), 14);
  EXPECT_THROW(make_packed_batch(rows, {{3, 3}, {}}, 2, 8), Error);
  EXPECT_THROW(make_packed_batch(rows, {{9}, {}}, 2, 8), Error);
}

TEST(Packing, DocStartsFollowTheStream) {
  // Unshuffled and shuffled, several epochs, an empty document: the starts reported for every
  // sample equal those computed from the stream order directly.
  const std::string dir = test::temp_dir("packing");
  const std::vector<int> lengths = {5, 7, 0, 4, 13, 2, 9, 6};
  auto docs = make_docs(lengths, 3);
  const std::string prefix = write(dir + "/ds", docs);
  for (bool shuffle : {false, true}) {
    auto base = std::make_unique<IndexedSampleSource>(std::vector<std::string>{prefix},
                                                      std::vector<double>{}, 6, 42, shuffle, 50);
    const IndexedSampleSource* raw = base.get();
    PackedSampleSource src(std::move(base));
    // The stream's document-start positions over 4 epochs.
    std::vector<int64_t> starts;
    int64_t pos = 0;
    for (int64_t e = 0; e < 4; ++e)
      for (int64_t j : raw->epoch_order(0, e)) {
        if (lengths[j] > 0) starts.push_back(pos);
        pos += lengths[j];
      }
    for (int64_t k = 0; k < 20; ++k) {
      std::vector<int32_t> want;
      for (int64_t s : starts)
        if (s > k * 6 && s <= k * 6 + 6) want.push_back(static_cast<int32_t>(s - k * 6));
      EXPECT_EQ(src.doc_starts(k), want) << "sample " << k << (shuffle ? " shuffled" : "");
      std::vector<int32_t> a(7), b(7);
      src.get(k, a.data());
      raw->get(k, b.data());
      EXPECT_EQ(a, b);
    }
  }
}

TEST(Packing, WholeDocumentsLossEqualsSumOfDocumentLosses) {
  // Three documents filling one row of T + 1 = 16 tokens exactly.
  const ModelConfig c = tiny_model();
  ParamStore p(param_specs(c), DType::F64, Device::CPU);
  init_params(c, p, 7);
  Llama m(c);
  auto docs = make_docs({5, 7, 4}, 11);
  std::vector<int32_t> row;
  for (const auto& d : docs) row.insert(row.end(), d.begin(), d.end());
  const LossSum packed = m.loss(p, make_packed_batch(row, {{5, 12}}, 1, 15));
  double sum = 0;
  int64_t count = 0;
  for (const auto& d : docs) {
    const int64_t n = static_cast<int64_t>(d.size()) - 1;
    LossSum ls = m.loss(p, make_batch(d, 1, n));
    sum += ls.sum;
    count += ls.count;
  }
  EXPECT_EQ(packed.count, 13);
  EXPECT_EQ(count, 13);
  EXPECT_NEAR(packed.sum, sum, 1e-12 * std::abs(sum));
  // Without packing the documents see each other: the loss must differ clearly.
  const LossSum unpacked = m.loss(p, make_batch(row, 1, 15));
  EXPECT_GT(std::abs(unpacked.sum - sum), 1e-3);
}

TEST(Packing, PackedBatchLossEqualsSumOverPieces) {
  // Samples from a packed source over a file: documents cross row boundaries. Each row piece is
  // computed alone (positions from 0), its last target kept only if the next token is in the
  // same document; the sums must agree to f64 rounding.
  const std::string dir = test::temp_dir("packing2");
  const std::vector<int> lengths = {9, 3, 14, 6, 1, 8, 11, 5, 7};
  auto docs = make_docs(lengths, 5);
  std::vector<int32_t> doc_of;  // stream position -> document
  for (size_t j = 0; j < docs.size(); ++j) doc_of.insert(doc_of.end(), docs[j].size(), static_cast<int32_t>(j));
  const int64_t T = 12, B = 3;
  auto src = make_sample_source({write(dir + "/ds", docs)}, {}, T, false, false, true, 1, 50);
  std::vector<int32_t> rows;
  std::vector<std::vector<int32_t>> starts;
  read_samples(*src, 1, B, &rows, &starts);
  ASSERT_EQ(starts.size(), 3u);
  const Batch packed = make_packed_batch(rows, starts, B, T);

  const ModelConfig c = tiny_model();
  ParamStore p(param_specs(c), DType::F64, Device::CPU);
  init_params(c, p, 9);
  Llama m(c);
  const LossSum got = m.loss(p, packed);
  double sum = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < B; ++r) {
    const int64_t base = (1 + r) * T;  // stream position of the row's token 0
    int64_t a = 0;
    while (a < T) {
      int64_t e = a;
      while (e < T && doc_of[base + e] == doc_of[base + a]) ++e;
      std::vector<int32_t> in, tgt;
      for (int64_t i = a; i < e; ++i) {
        in.push_back(rows[r * (T + 1) + i]);
        const bool same = doc_of[base + i + 1] == doc_of[base + i];
        tgt.push_back(same ? rows[r * (T + 1) + i + 1] : -100);
      }
      LossSum ls = loss_alone(m, p, in, tgt);
      sum += ls.sum;
      count += ls.count;
      a = e;
    }
  }
  EXPECT_EQ(got.count, count);
  EXPECT_EQ(packed.num_targets(), count);
  EXPECT_NEAR(got.sum, sum, 1e-12 * std::abs(sum));
  EXPECT_GT(packed.cu_seqlens.numel(), B + 1);  // some boundaries inside rows
}

TEST(Packing, SyntheticCannotPack) {
  EXPECT_THROW(make_sample_source({}, {}, 8, false, true, true, 1, 50), Error);
}
