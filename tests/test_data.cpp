// Data layer: Megatron .bin/.idx reader and writer, GPT sample order (sequential, shuffled,
// blended), token validation and error messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include "data/gpt_dataset.h"
#include "data/indexed_dataset.h"
#include "util.h"

using namespace ievo;
namespace fs = std::filesystem;

namespace {

std::string write_dataset(const std::string& prefix, const std::vector<std::vector<int32_t>>& docs,
                          int code = kDtypeU16) {
  IndexedDatasetWriter w(prefix, code);
  for (const auto& d : docs) w.add_document(d);
  w.finalize();
  return prefix;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
void put(std::string& s, T v) {  // little endian host (checked in indexed_dataset.cpp)
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// Runs fn, expects an ievo::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "no ievo::Error thrown (expected one naming " << parts.at(0) << ")";
}

std::vector<int32_t> sample(const SampleSource& s, int64_t k) {
  std::vector<int32_t> v(static_cast<size_t>(s.seq_len() + 1));
  s.get(k, v.data());
  return v;
}

const std::vector<std::vector<int32_t>> kDocs = {{1, 2, 3}, {4, 5}, {6, 7, 8, 9}};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Reader / writer

TEST(IndexedDataset, RoundTripUint16AndInt32) {
  const std::string dir = test::temp_dir("data_rt");
  const std::vector<std::vector<int32_t>> docs16 = {{0, 1, 65535}, {}, {42}, {7, 7, 7, 7, 7}};
  const std::vector<std::vector<int32_t>> docs32 = {{-5, 100000, 2147483647}, {3}, {128255, 0}};
  for (int code : {kDtypeU16, kDtypeI32}) {
    const auto& docs = code == kDtypeU16 ? docs16 : docs32;
    const std::string prefix = write_dataset(dir + "/d" + std::to_string(code), docs, code);
    EXPECT_FALSE(fs::exists(prefix + ".bin.tmp"));
    EXPECT_FALSE(fs::exists(prefix + ".idx.tmp"));
    auto ds = IndexedDataset::open(prefix);
    EXPECT_EQ(ds->dtype_code(), code);
    ASSERT_EQ(ds->num_documents(), static_cast<int64_t>(docs.size()));
    EXPECT_EQ(ds->num_sequences(), static_cast<int64_t>(docs.size()));
    int64_t total = 0;
    for (size_t d = 0; d < docs.size(); ++d) {
      EXPECT_EQ(ds->document(static_cast<int64_t>(d)), docs[d]) << "document " << d;
      EXPECT_EQ(ds->document_length(static_cast<int64_t>(d)), static_cast<int64_t>(docs[d].size()));
      total += static_cast<int64_t>(docs[d].size());
    }
    EXPECT_EQ(ds->num_tokens(), total);
    EXPECT_EQ(static_cast<int64_t>(fs::file_size(prefix + ".bin")), total * dtype_code_size(code));
    // a read from the middle of a sequence
    int32_t mid[2];
    ds->read_sequence(docs.size() == 4 ? 3 : 0, 1, 2, mid);
    EXPECT_EQ(mid[0], docs[docs.size() == 4 ? 3 : 0][1]);
    EXPECT_EQ(mid[1], docs[docs.size() == 4 ? 3 : 0][2]);
  }
}

TEST(IndexedDataset, IdxBytesMatchMegatronLayout) {
  const std::string dir = test::temp_dir("data_bytes");
  // Two documents: [1, 2, 3] and [4, 5] as two sequences [4] [5] (written with the low-level API).
  IndexedDatasetWriter w(dir + "/x", kDtypeU16);
  w.add_document({1, 2, 3});
  const int32_t a = 4, b = 5;
  w.add_sequence(&a, 1);
  w.add_sequence(&b, 1);
  w.end_document();
  w.finalize();

  std::string idx("MMIDIDX\0\0", 9);
  put<uint64_t>(idx, 1);   // version
  put<uint8_t>(idx, 8);    // dtype code: uint16
  put<uint64_t>(idx, 3);   // sequence_count
  put<uint64_t>(idx, 3);   // document_count = documents + 1
  for (int32_t len : {3, 1, 1}) put<int32_t>(idx, len);   // sequence_lengths
  for (int64_t ptr : {0, 6, 8}) put<int64_t>(idx, ptr);   // sequence_pointers (bytes)
  for (int64_t di : {0, 1, 3}) put<int64_t>(idx, di);     // document_indices
  ASSERT_EQ(idx.size(), 34u + 3 * 4 + 3 * 8 + 3 * 8);
  EXPECT_EQ(test::read_file(dir + "/x.idx"), idx);
  std::string bin;
  for (uint16_t t : {1, 2, 3, 4, 5}) put<uint16_t>(bin, t);
  EXPECT_EQ(test::read_file(dir + "/x.bin"), bin);

  // The reader takes a hand-written int64 dataset with a multi-sequence document.
  std::string idx2("MMIDIDX\0\0", 9), bin2;
  put<uint64_t>(idx2, 1);
  put<uint8_t>(idx2, 5);  // int64
  put<uint64_t>(idx2, 2);
  put<uint64_t>(idx2, 2);
  for (int32_t len : {2, 3}) put<int32_t>(idx2, len);
  for (int64_t ptr : {0, 16}) put<int64_t>(idx2, ptr);
  for (int64_t di : {0, 2}) put<int64_t>(idx2, di);
  for (int64_t t : {10, 11, 12, 13, 14}) put<int64_t>(bin2, t);
  write_bytes(dir + "/y.idx", idx2);
  write_bytes(dir + "/y.bin", bin2);
  auto ds = IndexedDataset::open(dir + "/y");
  EXPECT_EQ(ds->num_documents(), 1);
  EXPECT_EQ(ds->document(0), (std::vector<int32_t>{10, 11, 12, 13, 14}));
  int32_t part[3];
  ds->read_document(0, 1, 3, part);  // spans both sequences
  EXPECT_EQ(std::vector<int32_t>(part, part + 3), (std::vector<int32_t>{11, 12, 13}));
}

TEST(IndexedDataset, BestDtype) {
  EXPECT_EQ(best_dtype_code(32000), kDtypeU16);
  EXPECT_EQ(best_dtype_code(65499), kDtypeU16);
  EXPECT_EQ(best_dtype_code(65500), kDtypeI32);
  EXPECT_EQ(best_dtype_code(128256), kDtypeI32);
}

// ---------------------------------------------------------------------------------------------
// Sample order

TEST(GptSamples, SequentialEpochs) {
  const std::string p = write_dataset(test::temp_dir("data_seq") + "/d", kDocs);
  IndexedSampleSource s({p}, {}, /*seq_len=*/3, /*seed=*/1, /*shuffle=*/false, /*vocab=*/10);
  using V = std::vector<int32_t>;
  EXPECT_EQ(sample(s, 0), (V{1, 2, 3, 4}));
  EXPECT_EQ(sample(s, 1), (V{4, 5, 6, 7}));
  EXPECT_EQ(sample(s, 2), (V{7, 8, 9, 1}));  // epoch 1 starts
  EXPECT_EQ(sample(s, 3), (V{1, 2, 3, 4}));
  EXPECT_EQ(sample(s, 1000000), (V{4, 5, 6, 7}));  // stream position 3e6 = 3 (mod 9)

  IndexedSampleSource s4({p}, {}, 4, 1, false, 10);
  EXPECT_EQ(sample(s4, 0), (V{1, 2, 3, 4, 5}));
  EXPECT_EQ(sample(s4, 1), (V{5, 6, 7, 8, 9}));
  EXPECT_EQ(sample(s4, 2), (V{9, 1, 2, 3, 4}));
  EXPECT_EQ(sample(s4, 3), (V{4, 5, 6, 7, 8}));

  IndexedSampleSource s20({p}, {}, 20, 1, false, 10);  // a sample longer than an epoch
  EXPECT_EQ(sample(s20, 0), (V{1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3}));

  // batch of samples 1..2: inputs = tokens[0, T), targets = tokens[1, T]
  V inputs(6), targets(6);
  fill_batch(s, 1, 2, inputs.data(), targets.data());
  EXPECT_EQ(inputs, (V{4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(targets, (V{5, 6, 7, 8, 9, 1}));
}

TEST(GptSamples, ShuffledEpochsArePermutations) {
  // 20 documents; document j holds tokens 10 j + 1 ... 10 j + len_j (unique, so each token
  // names its document).
  std::vector<std::vector<int32_t>> docs;
  int64_t N = 0;
  for (int j = 0; j < 20; ++j) {
    std::vector<int32_t> d;
    for (int t = 0; t < 1 + j % 5; ++t) d.push_back(10 * j + 1 + t);
    N += static_cast<int64_t>(d.size());
    docs.push_back(d);
  }
  const std::string p = write_dataset(test::temp_dir("data_shuf") + "/d", docs);
  const int64_t T = 7, epochs = 4;
  IndexedSampleSource s({p}, {}, T, 1234, true, 1000);
  std::vector<int32_t> stream;  // the first `epochs` epochs, from samples (first T tokens each)
  int32_t prev_last = -1;
  for (int64_t k = 0; static_cast<int64_t>(stream.size()) < epochs * N; ++k) {
    auto v = sample(s, k);
    if (k > 0) {
      ASSERT_EQ(v[0], prev_last) << "samples " << k - 1 << " and " << k << " share a token";
    }
    prev_last = v.back();
    stream.insert(stream.end(), v.begin(), v.end() - 1);
  }
  std::vector<std::vector<int64_t>> orders;
  for (int64_t e = 0; e < epochs; ++e) {
    // parse epoch e into documents: each must appear exactly once, whole
    std::vector<int64_t> order;
    int64_t pos = e * N;
    while (pos < (e + 1) * N) {
      const int64_t j = (stream[pos] - 1) / 10;
      ASSERT_LT(j, 20);
      for (int32_t tok : docs[j]) ASSERT_EQ(stream[pos++], tok) << "epoch " << e;
      order.push_back(j);
    }
    std::vector<int64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t j = 0; j < 20; ++j) ASSERT_EQ(sorted[j], j) << "epoch " << e << " is not a permutation";
    std::multiset<int32_t> got(stream.begin() + e * N, stream.begin() + (e + 1) * N), want;
    for (const auto& d : docs) want.insert(d.begin(), d.end());
    EXPECT_EQ(got, want);
    EXPECT_EQ(order, s.epoch_order(0, e));
    orders.push_back(order);
  }
  for (int64_t e = 1; e < epochs; ++e) EXPECT_NE(orders[e], orders[0]) << "epoch " << e;
  // Pinned: mt19937_64, seed_seq and our Fisher-Yates are fully specified, so these orders must
  // never change (a resumed run depends on them).
  EXPECT_EQ(orders[0], (std::vector<int64_t>{8, 10, 17, 9, 5, 0, 14, 4, 12, 19, 3, 2, 7, 6, 15,
                                             18, 1, 13, 11, 16}));
  EXPECT_EQ(orders[1], (std::vector<int64_t>{5, 6, 16, 18, 3, 17, 12, 2, 1, 4, 14, 13, 9, 0, 15,
                                             11, 8, 19, 7, 10}));

  // Same seed: same samples, whatever the access order (reverse order exercises the epoch cache).
  IndexedSampleSource same({p}, {}, T, 1234, true, 1000);
  const int64_t K = epochs * N / T;
  for (int64_t k = K - 1; k >= 0; --k) ASSERT_EQ(sample(same, k), sample(s, k)) << "sample " << k;
  // Another seed: other permutations.
  IndexedSampleSource other({p}, {}, T, 1235, true, 1000);
  for (int64_t e = 0; e < epochs; ++e) EXPECT_NE(other.epoch_order(0, e), orders[e]);
  // No shuffle: file order every epoch.
  IndexedSampleSource plain({p}, {}, T, 1234, false, 1000);
  std::vector<int64_t> ident(20);
  for (int64_t j = 0; j < 20; ++j) ident[j] = j;
  EXPECT_EQ(plain.epoch_order(0, 3), ident);
}

TEST(GptSamples, BlendingFollowsMegatronRule) {
  const std::string dir = test::temp_dir("data_blend");
  std::vector<int32_t> a(50), b(50);
  for (int i = 0; i < 50; ++i) a[i] = i, b[i] = 100 + i;
  const std::string pa = write_dataset(dir + "/a", {a}), pb = write_dataset(dir + "/b", {b});
  const int64_t T = 4;
  IndexedSampleSource blend({pa, pb}, {3.0, 1.0}, T, 7, false, 200);  // normalizes to 0.75/0.25
  EXPECT_DOUBLE_EQ(blend.weights()[0], 0.75);
  IndexedSampleSource only_a({pa}, {}, T, 7, false, 200), only_b({pb}, {}, T, 7, false, 200);
  // Megatron: d = argmax(w_d * max(i, 1) - c_d), ties to the lowest d. For 0.75/0.25 this gives
  // a, b, a, a, | a, b, a, a, | ...: dataset b exactly at i = 1 (mod 4).
  int64_t count[2] = {0, 0};
  for (int64_t i = 0; i < 400; ++i) {
    const auto [d, k] = blend.locate(i);
    ASSERT_EQ(d, i % 4 == 1 ? 1 : 0) << "sample " << i;
    ASSERT_EQ(k, count[d]) << "sample " << i;
    ++count[d];
    ASSERT_EQ(sample(blend, i), sample(d == 0 ? only_a : only_b, k)) << "sample " << i;
  }
  EXPECT_EQ(count[0], 300);
  EXPECT_EQ(count[1], 100);

  // Three datasets, far past one snapshot block, looked up out of order by a fresh source:
  // equal to a straight run of the rule.
  const std::string pc = write_dataset(dir + "/c", {{150, 151, 152}});
  const std::vector<double> w = {0.5, 0.3, 0.2};
  const int64_t n = 20000;
  std::vector<std::pair<int, int64_t>> ref(n);
  int64_t c[3] = {0, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    const double x = std::max<double>(static_cast<double>(i), 1.0);
    int best = 0;
    for (int d = 1; d < 3; ++d)
      if (w[d] * x - static_cast<double>(c[d]) > w[best] * x - static_cast<double>(c[best])) best = d;
    ref[i] = {best, c[best]++};
  }
  EXPECT_NEAR(static_cast<double>(c[0]) / n, 0.5, 1e-3);
  EXPECT_NEAR(static_cast<double>(c[2]) / n, 0.2, 1e-3);
  IndexedSampleSource three({pa, pb, pc}, w, T, 7, true, 200);
  for (int64_t i : {19999, 5, 12345, 4095, 4096, 0, 8191, 17000, 1})
    EXPECT_EQ(three.locate(i), ref[i]) << "sample " << i;
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(three.locate(i), ref[i]) << "sample " << i;
}

TEST(GptSamples, Synthetic) {
  auto s = make_sample_source({}, {}, 16, true, /*synthetic=*/true, 99, 1000);
  EXPECT_EQ(s->seq_len(), 16);
  SyntheticSampleSource same(1000, 16, 99), other(1000, 16, 100);
  int32_t lo = 1000, hi = -1;
  for (int64_t k = 0; k < 1000; ++k) {
    auto v = sample(*s, k);
    ASSERT_EQ(v, sample(same, k));
    ASSERT_NE(v, sample(other, k));
    ASSERT_EQ(v.back(), sample(*s, k + 1)[0]);  // consecutive samples share a token
    for (int32_t t : v) lo = std::min(lo, t), hi = std::max(hi, t);
  }
  EXPECT_EQ(lo, 0);  // 17000 uniform draws cover both ends of [0, 1000)
  EXPECT_EQ(hi, 999);
}

// ---------------------------------------------------------------------------------------------
// Bad input: each error names the file (or config key) and what is wrong.

class BadData : public ::testing::Test {
 protected:
  void SetUp() override {
    prefix = write_dataset(test::temp_dir("data_bad") + "/d", kDocs);
    idx = test::read_file(prefix + ".idx");
    bin = test::read_file(prefix + ".bin");
  }
  std::string prefix, idx, bin;
};

TEST_F(BadData, WrongMagic) {
  idx[0] = 'X';
  write_bytes(prefix + ".idx", idx);
  expect_error([&] { IndexedDataset::open(prefix); }, {prefix + ".idx", "bad magic"});
}

TEST_F(BadData, WrongVersion) {
  idx[9] = 2;
  write_bytes(prefix + ".idx", idx);
  expect_error([&] { IndexedDataset::open(prefix); }, {prefix + ".idx", "version 2"});
}

TEST_F(BadData, UnknownDtype) {
  idx[17] = 9;
  write_bytes(prefix + ".idx", idx);
  expect_error([&] { IndexedDataset::open(prefix); }, {prefix + ".idx", "dtype code 9"});
}

TEST_F(BadData, TruncatedIdx) {
  write_bytes(prefix + ".idx", idx.substr(0, idx.size() - 8));
  expect_error([&] { IndexedDataset::open(prefix); }, {prefix + ".idx", "truncated"});
  write_bytes(prefix + ".idx", idx.substr(0, 20));
  expect_error([&] { IndexedDataset::open(prefix); }, {prefix + ".idx", "truncated header"});
}

TEST_F(BadData, TrailingIdxBytes) {
  write_bytes(prefix + ".idx", idx + "junk");
  expect_error([&] { IndexedDataset::open(prefix); }, {prefix + ".idx", "trailing bytes"});
}

TEST_F(BadData, TruncatedBin) {
  write_bytes(prefix + ".bin", bin.substr(0, bin.size() - 2));  // last token of the last sequence gone
  expect_error([&] { IndexedDataset::open(prefix); },
               {prefix + ".bin", "sequence 2", "past the end"});
}

TEST_F(BadData, DocumentIndicesNotMonotone) {
  // document_indices = [0, 1, 2, 3] at the end of the file; make it [0, 2, 1, 3]
  const size_t at = idx.size() - 4 * 8;
  int64_t v[4] = {0, 2, 1, 3};
  std::memcpy(&idx[at], v, sizeof(v));
  write_bytes(prefix + ".idx", idx);
  expect_error([&] { IndexedDataset::open(prefix); }, {prefix + ".idx", "not monotone"});
}

TEST_F(BadData, MissingFile) {
  expect_error([&] { IndexedDataset::open(prefix + "_nope"); },
               {prefix + "_nope.idx", "No such file"});
  fs::remove(prefix + ".bin");
  expect_error([&] { IndexedSampleSource({prefix}, {}, 3, 1, false, 10); },
               {prefix + ".bin", "No such file"});
}

TEST_F(BadData, TokenIdBeyondVocab) {
  const std::string p = write_dataset(prefix + "_big", {{1, 2, 3}, {4, 70000, 5}}, kDtypeI32);
  IndexedSampleSource s({p}, {}, 2, 1, false, 32000);
  std::vector<int32_t> out(3);
  s.get(0, out.data());  // tokens 1 2 3 are fine
  expect_error([&] { s.get(1, out.data()); },
               {"token id 70000 >= vocab size 32000 in " + p + ".bin (document 1)"});
}

TEST_F(BadData, WriterRejectsTokenOutsideDtype) {
  IndexedDatasetWriter w(prefix + "_w", kDtypeU16);
  expect_error([&] { w.add_document({1, 65536}); }, {prefix + "_w.bin", "65536", "uint16"});
}

TEST_F(BadData, ConfigErrorsNameKeys) {
  expect_error([&] { make_sample_source({}, {}, 8, true, false, 1, 100); }, {"data.paths"});
  expect_error([&] { make_sample_source({prefix, prefix}, {1.0}, 8, true, false, 1, 100); },
               {"data.weights", "2"});
  expect_error([&] { make_sample_source({prefix}, {-1.0}, 8, true, false, 1, 100); },
               {"data.weights[0]"});
  expect_error([&] { make_sample_source({prefix}, {}, 0, true, false, 1, 100); }, {"data.seq_len"});
}
