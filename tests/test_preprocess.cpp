// ievo preprocess: SentencePiece round trip, Megatron .bin/.idx bytes, bad input with file:line,
// worker-count independence, the up-to-date check, tokenizer training.
#include <gtest/gtest.h>

#include <sentencepiece_processor.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "data/indexed_dataset.h"
#include "data/preprocess.h"
#include "util.h"

using namespace ievo;
namespace fs = std::filesystem;

namespace {

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string json_line(const std::string& text) {
  std::string s = "{\"id\": 7, \"text\": \"";
  for (char c : text) {
    if (c == '\n') s += "\\n";
    else if (c == '"') s += "\\\"";
    else if (c == '\\') s += "\\\\";
    else s += c;
  }
  return s + "\"}\n";
}

// A deterministic English-like corpus: sentences from a small word list.
std::vector<std::string> make_docs(int n, uint64_t seed) {
  static const char* words[] = {"the",   "dictionary", "of",    "word",  "a",      "noun",
                                "verb",  "apple",      "tree",  "fruit", "which",  "is",
                                "used",  "in",         "sense", "old",   "English", "from",
                                "Latin", "meaning",    "see",   "also",  "plant",  "small"};
  std::mt19937_64 rng(seed);
  std::vector<std::string> docs;
  for (int d = 0; d < n; ++d) {
    std::string s;
    const int sentences = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < sentences; ++k) {
      if (k) s += (rng() % 3 == 0) ? "\n   " : " ";
      const int len = 3 + static_cast<int>(rng() % 9);
      for (int w = 0; w < len; ++w) {
        if (w) s += ' ';
        s += words[rng() % (sizeof words / sizeof *words)];
      }
      s += rng() % 5 == 0 ? "; 1913 caf\xC3\xA9." : ".";
    }
    docs.push_back(s);
  }
  return docs;
}

// One small tokenizer for the whole suite (trained once: a few seconds).
class Preprocess : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(test::temp_dir("preprocess"));
    docs_ = new std::vector<std::string>(make_docs(600, 1));
    std::string jsonl;
    for (const auto& d : *docs_) jsonl += json_line(d);
    write_file(*dir_ + "/corpus.jsonl", jsonl);
    train_tokenizer({*dir_ + "/corpus.jsonl"}, "text", kVocab, *dir_ + "/tok.model", 2);
  }
  static void TearDownTestSuite() {
    delete dir_;
    delete docs_;
  }
  static std::string tok() { return *dir_ + "/tok.model"; }
  static PreprocessOptions options(const std::vector<std::string>& inputs, const std::string& out) {
    PreprocessOptions o;
    o.inputs = inputs;
    o.output_prefix = out;
    o.tokenizer = tok();
    o.progress = false;
    return o;
  }

  static constexpr int64_t kVocab = 400;
  static std::string* dir_;
  static std::vector<std::string>* docs_;
};
std::string* Preprocess::dir_ = nullptr;
std::vector<std::string>* Preprocess::docs_ = nullptr;

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "no ievo::Error thrown (expected one naming " << parts.at(0) << ")";
}

}  // namespace

TEST_F(Preprocess, TrainedTokenizerHasTheRequestedVocabulary) {
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(tok()).ok());
  EXPECT_EQ(sp.GetPieceSize(), kVocab);
  EXPECT_EQ(sp.eos_id(), 2);
  EXPECT_EQ(sp.IdToPiece(2), "</s>");
  // Identity normalisation: newlines and runs of spaces survive encode + decode.
  std::vector<int> ids;
  ASSERT_TRUE(sp.Encode("a tree\n   of  apple", &ids).ok());
  std::string back;
  ASSERT_TRUE(sp.Decode(ids, &back).ok());
  EXPECT_EQ(back, "a tree\n   of  apple");
}

TEST_F(Preprocess, JsonRoundTripMatchesSentencePiece) {
  const std::string out = *dir_ + "/rt";
  PreprocessOptions o = options({*dir_ + "/corpus.jsonl"}, out);
  o.workers = 3;
  const PreprocessResult r = preprocess(o);
  EXPECT_FALSE(r.up_to_date);
  EXPECT_EQ(r.documents, 600);
  EXPECT_EQ(r.skipped, 0);
  EXPECT_EQ(r.eod_id, 2);
  EXPECT_EQ(r.dtype_code, kDtypeU16);

  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(tok()).ok());
  auto ds = IndexedDataset::open(out);
  ASSERT_EQ(ds->num_documents(), 600);
  ASSERT_EQ(ds->num_sequences(), 600);
  EXPECT_EQ(ds->dtype_code(), kDtypeU16);
  int64_t total = 0;
  for (int64_t d = 0; d < 600; ++d) {
    std::vector<int> want;
    ASSERT_TRUE(sp.Encode((*docs_)[d], &want).ok());
    want.push_back(2);
    const std::vector<int32_t> got = ds->document(d);
    ASSERT_EQ(got, std::vector<int32_t>(want.begin(), want.end())) << "document " << d;
    std::string text;
    ASSERT_TRUE(sp.Decode(std::vector<int>(got.begin(), got.end() - 1), &text).ok());
    EXPECT_EQ(text, (*docs_)[d]);
    total += static_cast<int64_t>(got.size());
  }
  EXPECT_EQ(r.tokens, total);
  EXPECT_EQ(ds->num_tokens(), total);
}

TEST_F(Preprocess, BytesMatchMegatronLayout) {
  // Three documents; the .idx and .bin must be exactly what Megatron's IndexedDatasetBuilder
  // writes for them (uint16 tokens, one sequence per document, document_indices = 0..S).
  const std::vector<std::string> texts = {"apple tree", "the old noun.", "see also"};
  std::string jsonl;
  for (const auto& t : texts) jsonl += json_line(t);
  write_file(*dir_ + "/small.jsonl", jsonl);
  const std::string out = *dir_ + "/small";
  preprocess(options({*dir_ + "/small.jsonl"}, out));

  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(tok()).ok());
  std::string idx, bin;
  auto put = [](std::string& s, auto v) { s.append(reinterpret_cast<const char*>(&v), sizeof v); };
  idx.append("MMIDIDX\0\0", 9);
  put(idx, uint64_t{1});
  put(idx, uint8_t{8});  // uint16
  put(idx, uint64_t{3});  // sequences
  put(idx, uint64_t{4});  // document_indices entries
  std::vector<int32_t> lengths;
  for (const auto& t : texts) {
    std::vector<int> ids;
    ASSERT_TRUE(sp.Encode(t, &ids).ok());
    ids.push_back(2);
    for (int id : ids) put(bin, static_cast<uint16_t>(id));
    lengths.push_back(static_cast<int32_t>(ids.size()));
  }
  for (int32_t l : lengths) put(idx, l);
  int64_t ptr = 0;
  for (int32_t l : lengths) put(idx, ptr), ptr += 2 * l;
  for (int64_t d = 0; d <= 3; ++d) put(idx, d);
  EXPECT_EQ(test::read_file(out + ".idx"), idx);
  EXPECT_EQ(test::read_file(out + ".bin"), bin);
}

TEST_F(Preprocess, PlainTextDocumentsAreBlankLineSeparated) {
  write_file(*dir_ + "/plain.txt", "\n\nfirst apple\r\n  tree line\n\n \t\nsecond\n\n\nthird.");
  const std::string out = *dir_ + "/plain";
  const PreprocessResult r = preprocess(options({*dir_ + "/plain.txt"}, out));
  EXPECT_EQ(r.documents, 3);
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(tok()).ok());
  auto ds = IndexedDataset::open(out);
  const std::vector<std::string> want = {"first apple\n  tree line", "second", "third."};
  for (int d = 0; d < 3; ++d) {
    const auto got = ds->document(d);
    EXPECT_EQ(got.back(), 2);
    std::string text;
    ASSERT_TRUE(sp.Decode(std::vector<int>(got.begin(), got.end() - 1), &text).ok());
    EXPECT_EQ(text, want[d]);
  }
}

TEST_F(Preprocess, SameBytesWithAnyNumberOfWorkers) {
  PreprocessOptions o = options({*dir_ + "/corpus.jsonl", *dir_ + "/plain.txt"}, *dir_ + "/w1");
  write_file(*dir_ + "/plain.txt", "one apple\n\ntwo\n");
  o.workers = 1;
  preprocess(o);
  o.workers = 4;
  o.output_prefix = *dir_ + "/w4";
  preprocess(o);
  EXPECT_EQ(test::read_file(*dir_ + "/w1.bin"), test::read_file(*dir_ + "/w4.bin"));
  EXPECT_EQ(test::read_file(*dir_ + "/w1.idx"), test::read_file(*dir_ + "/w4.idx"));
  EXPECT_EQ(IndexedDataset::open(*dir_ + "/w4")->num_documents(), 602);
}

TEST_F(Preprocess, BadInputIsReportedWithFileAndLine) {
  const std::string f = *dir_ + "/bad.jsonl";
  write_file(f, json_line("good apple") +         // 1
                    "\n" +                          // 2: blank, skipped silently
                    "{\"text\": \"caf\xC3\"}\n" +  // 3: truncated UTF-8 sequence
                    "{\"body\": \"no text key\"}\n" +  // 4
                    "{\"text\": \"unterminated}\n" +   // 5: invalid JSON
                    "{\"text\": \"  \"}\n" +           // 6: empty document
                    "[1, 2]\n" +                       // 7: not an object
                    "{\"text\": 12}\n" +               // 8: not a string
                    json_line("good tree"));           // 9
  PreprocessOptions o = options({f}, *dir_ + "/bad");
  o.on_error = OnError::Skip;
  const PreprocessResult r = preprocess(o);
  EXPECT_EQ(r.documents, 2);
  EXPECT_EQ(r.skipped, 6);
  ASSERT_EQ(r.problems.size(), 6u);
  const std::vector<std::pair<std::string, std::string>> want = {
      {f + ":3:", "not valid UTF-8"}, {f + ":4:", "no key \"text\""},
      {f + ":5:", "invalid JSON"},    {f + ":6:", "empty document"},
      {f + ":7:", "expected a JSON object"}, {f + ":8:", "expected a string"}};
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(r.problems[i].rfind(want[i].first, 0), 0u) << r.problems[i];
    EXPECT_NE(r.problems[i].find(want[i].second), std::string::npos) << r.problems[i];
  }
  EXPECT_EQ(IndexedDataset::open(*dir_ + "/bad")->num_documents(), 2);

  // Stop: the first problem, in input order, whatever the number of workers.
  o.on_error = OnError::Stop;
  o.workers = 4;
  o.output_prefix = *dir_ + "/bad_stop";
  expect_error([&] { preprocess(o); }, {f + ":3:", "not valid UTF-8", "--on-error"});
  EXPECT_FALSE(fs::exists(*dir_ + "/bad_stop.idx"));
  EXPECT_FALSE(fs::exists(*dir_ + "/bad_stop.bin.tmp"));

  // Plain text: the exact line of a bad byte inside a multi-line document.
  const std::string t = *dir_ + "/bad.txt";
  write_file(t, "fine text\n\nline one\nline \xFF two\n");
  o.inputs = {t};
  expect_error([&] { preprocess(o); }, {t + ":4:", "not valid UTF-8 (byte 5"});

  // Missing files name themselves.
  o.inputs = {*dir_ + "/nope.jsonl"};
  expect_error([&] { preprocess(o); }, {"nope.jsonl", "not found"});
  o.inputs = {f};
  o.tokenizer = *dir_ + "/missing.model";
  expect_error([&] { preprocess(o); }, {"missing.model", "not found"});
}

TEST_F(Preprocess, CommandLineReportsAndExits) {
  const std::string f = *dir_ + "/cli.jsonl";
  write_file(f, json_line("apple") + "{\"txt\": \"x\"}\n" + json_line("tree"));
  const std::string base = test::ievo_binary() + " preprocess --quiet --input " + f +
                           " --output-prefix " + *dir_ + "/cli --tokenizer " + tok();
  std::string out;
  EXPECT_EQ(test::run_command(base, &out), 1) << out;
  EXPECT_NE(out.find(f + ":2: JSON object has no key \"text\""), std::string::npos) << out;
  EXPECT_EQ(test::run_command(base + " --on-error skip", &out), 0) << out;
  EXPECT_NE(out.find("2 documents"), std::string::npos) << out;
  EXPECT_NE(out.find("1 bad documents skipped"), std::string::npos) << out;
  EXPECT_EQ(test::run_command(base + " --on-error skip", &out), 0) << out;
  EXPECT_NE(out.find("up to date"), std::string::npos) << out;
  EXPECT_EQ(test::run_command(base + " --json-key txt --on-error skip", &out), 0) << out;
  EXPECT_NE(out.find("wrote"), std::string::npos) << out;
  EXPECT_NE(out.find("1 documents"), std::string::npos) << out;
}

TEST_F(Preprocess, UpToDateUnlessInputsOrTokenizerChange) {
  const std::string f = *dir_ + "/utd.jsonl";
  write_file(f, json_line("apple tree") + json_line("old word"));
  PreprocessOptions o = options({f}, *dir_ + "/utd");
  EXPECT_FALSE(preprocess(o).up_to_date);
  const std::string idx_before = test::read_file(*dir_ + "/utd.idx");
  PreprocessResult again = preprocess(o);
  EXPECT_TRUE(again.up_to_date);
  EXPECT_EQ(again.documents, 2);
  o.force = true;
  EXPECT_FALSE(preprocess(o).up_to_date);
  o.force = false;
  write_file(f, json_line("apple tree") + json_line("old word") + json_line("a noun"));
  EXPECT_FALSE(preprocess(o).up_to_date);
  EXPECT_EQ(IndexedDataset::open(*dir_ + "/utd")->num_documents(), 3);
  o.json_key = "body";  // other options: not up to date (and here: every line lacks the key)
  expect_error([&] { preprocess(o); }, {f + ":1:", "no key \"body\""});
  // The failed run removed the manifest: the old output is no longer taken as up to date.
  o.json_key = "text";
  EXPECT_FALSE(preprocess(o).up_to_date);
  EXPECT_TRUE(preprocess(o).up_to_date);
}

TEST(Utf8, Validation) {
  EXPECT_EQ(utf8_error_offset("plain ascii"), -1);
  EXPECT_EQ(utf8_error_offset("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"), -1);
  EXPECT_EQ(utf8_error_offset("ab\x80"), 2);           // stray continuation byte
  EXPECT_EQ(utf8_error_offset("a\xC3"), 1);            // truncated
  EXPECT_EQ(utf8_error_offset("\xC0\xAF"), 0);         // overlong '/'
  EXPECT_EQ(utf8_error_offset("x\xED\xA0\x80"), 1);    // surrogate U+D800
  EXPECT_EQ(utf8_error_offset("\xF4\x90\x80\x80"), 0);  // above U+10FFFF
}
