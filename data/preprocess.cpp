// ievo preprocess: see preprocess.h for the formats and guarantees. The pipeline is
//   reader (serial: splits files into raw documents with their first line number)
//   -> workers (OpenMP, `workers` threads: UTF-8 check, JSON parse, SentencePiece encode + EOD)
//   -> writer (serial, in input order: IndexedDatasetWriter, then the manifest).
// Documents go through in batches, so memory stays bounded and the order is the input order.
#include "data/preprocess.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>

#include <nlohmann/json.hpp>

#include "data/indexed_dataset.h"
#include "runtime/error.h"

namespace fs = std::filesystem;

namespace ievo {

int64_t utf8_error_offset(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const int64_t n = static_cast<int64_t>(s.size());
  for (int64_t i = 0; i < n;) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else return i;  // a continuation byte or 0xF8..0xFF where a sequence should start
    if (i + len > n) return i;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return -1;
}

namespace {

bool is_json_file(const std::string& path) {
  const std::string ext = fs::path(path).extension().string();
  return ext == ".jsonl" || ext == ".json" || ext == ".ndjson";
}

bool is_blank(const std::string& line) {
  return line.find_first_not_of(" \t\r") == std::string::npos;
}

// One document as read, before parsing.
struct RawDoc {
  int file = 0;
  int64_t line = 0;  // 1-based line of its first byte
  std::string raw;   // the JSON line, or the text lines joined with '\n'
};

// Splits the input files into raw documents, in order.
class Reader {
 public:
  explicit Reader(const std::vector<std::string>& files) : files_(files) {
    for (const auto& f : files_) {
      std::error_code ec;
      if (!fs::is_regular_file(f, ec)) IEVO_FAIL("input file ", f, ": not found (or not a file)");
      total_bytes_ += static_cast<int64_t>(fs::file_size(f));
    }
  }

  // The next document, or false at the end of the last file.
  bool next(RawDoc* d) {
    for (;;) {
      if (!in_) {
        if (file_ >= static_cast<int>(files_.size())) return false;
        in_ = std::make_unique<std::ifstream>(files_[file_], std::ios::binary);
        if (!*in_) IEVO_FAIL("input file ", files_[file_], ": cannot open");
        json_ = is_json_file(files_[file_]);
        line_ = 0;
      }
      if (json_ ? next_json(d) : next_text(d)) return true;
      in_.reset();
      ++file_;
    }
  }

  const std::string& file_name(int i) const { return files_[i]; }
  int64_t total_bytes() const { return total_bytes_; }
  int64_t bytes_read() const { return bytes_read_; }

 private:
  bool getline(std::string& s) {
    if (!std::getline(*in_, s)) return false;
    ++line_;
    bytes_read_ += static_cast<int64_t>(s.size()) + 1;
    return true;
  }
  bool next_json(RawDoc* d) {
    std::string s;
    while (getline(s)) {
      if (is_blank(s)) continue;
      *d = {file_, line_, std::move(s)};
      return true;
    }
    return false;
  }
  bool next_text(RawDoc* d) {
    std::string s;
    bool started = false;
    while (getline(s)) {
      if (!s.empty() && s.back() == '\r') s.pop_back();
      if (is_blank(s)) {
        if (started) return true;
        continue;
      }
      if (!started) *d = {file_, line_, {}}, started = true;
      else d->raw += '\n';
      d->raw += s;
    }
    return started;
  }

  std::vector<std::string> files_;
  std::unique_ptr<std::ifstream> in_;
  int file_ = 0;
  bool json_ = false;
  int64_t line_ = 0, total_bytes_ = 0, bytes_read_ = 0;
};

// The text of a raw document, or an error message (without the FILE:LINE prefix, which
// `line_of_error` completes).
struct Parsed {
  std::string text;
  std::string error;
  int64_t error_line = 0;  // line within the document, 0-based
};

Parsed parse_doc(const RawDoc& d, bool json, const std::string& key) {
  Parsed p;
  if (const int64_t off = utf8_error_offset(d.raw); off >= 0) {
    // The line holding the offset, and the offset within that line.
    const int64_t nl = static_cast<int64_t>(std::count(d.raw.begin(), d.raw.begin() + off, '\n'));
    const size_t line_start = nl ? d.raw.rfind('\n', static_cast<size_t>(off)) + 1 : 0;
    p.error_line = nl;
    p.error = detail::cat("not valid UTF-8 (byte ", off - static_cast<int64_t>(line_start),
                          " of the line)");
    return p;
  }
  if (!json) {
    p.text = d.raw;
  } else {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(d.raw);
    } catch (const nlohmann::json::parse_error& e) {
      std::string m = e.what();
      if (auto k = m.find("] "); k != std::string::npos) m = m.substr(k + 2);
      p.error = "invalid JSON: " + m;
      return p;
    }
    if (!j.is_object()) {
      p.error = detail::cat("expected a JSON object with key \"", key, "\", got ", j.type_name());
      return p;
    }
    auto it = j.find(key);
    if (it == j.end()) {
      p.error = detail::cat("JSON object has no key \"", key, "\" (set --json-key)");
      return p;
    }
    if (!it->is_string()) {
      p.error = detail::cat("\"", key, "\" is a ", it->type_name(), ", expected a string");
      return p;
    }
    p.text = it->get<std::string>();
  }
  if (p.text.find_first_not_of(" \t\r\n\f\v") == std::string::npos) p.error = "empty document";
  return p;
}

std::string where(const Reader& r, const RawDoc& d, int64_t line_in_doc = 0) {
  return detail::cat(r.file_name(d.file), ":", d.line + line_in_doc);
}

// FNV-1a 64 of a file's bytes (the tokenizer's identity in the manifest).
uint64_t file_fnv1a(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  uint64_t h = 0xcbf29ce484222325ull;
  char buf[1 << 16];
  while (in) {
    in.read(buf, sizeof buf);
    for (std::streamsize i = 0; i < in.gcount(); ++i)
      h = (h ^ static_cast<unsigned char>(buf[i])) * 0x100000001b3ull;
  }
  return h;
}

nlohmann::json file_stamp(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return nullptr;
  return {{"path", fs::absolute(path).lexically_normal().string()},
          {"bytes", static_cast<int64_t>(st.st_size)},
          {"mtime_ns", static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec}};
}

// What an up-to-date output must have been made from.
nlohmann::json manifest_key(const PreprocessOptions& o) {
  nlohmann::json inputs = nlohmann::json::array();
  for (const auto& f : o.inputs) inputs.push_back(file_stamp(f));
  return {{"format", "ievo-preprocess"},
          {"version", 1},
          {"inputs", inputs},
          {"json_key", o.json_key},
          {"on_error", o.on_error == OnError::Skip ? "skip" : "stop"},
          {"train_tokenizer_vocab", o.train_tokenizer_vocab}};
}

std::string manifest_path(const std::string& prefix) { return prefix + ".json"; }

void write_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.flush();
    if (!f) IEVO_FAIL("cannot write ", tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) IEVO_FAIL("cannot rename ", tmp, " to ", path, ": ", ec.message());
}

// True when PREFIX.{bin,idx,json} exist, the manifest matches and the tokenizer is unchanged.
bool up_to_date(const PreprocessOptions& o, PreprocessResult* r) {
  const std::string mp = manifest_path(o.output_prefix);
  std::error_code ec;
  if (!fs::exists(o.output_prefix + ".bin", ec) || !fs::exists(o.output_prefix + ".idx", ec) ||
      !fs::exists(mp, ec) || !fs::exists(o.tokenizer, ec))
    return false;
  nlohmann::json m;
  try {
    std::ifstream f(mp);
    m = nlohmann::json::parse(f);
    const nlohmann::json want = manifest_key(o);
    for (const auto& [k, v] : want.items())
      if (m.at(k) != v) return false;
    if (m.at("tokenizer").at("fnv1a64").get<uint64_t>() != file_fnv1a(o.tokenizer)) return false;
    r->documents = m.at("documents");
    r->tokens = m.at("tokens");
    r->skipped = m.at("skipped");
    r->vocab_size = m.at("vocab_size");
    r->dtype_code = m.at("dtype_code");
    r->eod_id = m.at("eod_id");
  } catch (const nlohmann::json::exception&) {
    return false;  // unreadable or older manifest: redo
  }
  return true;
}

// "\r"-updated line on a terminal, a line every few seconds otherwise.
class Progress {
 public:
  explicit Progress(bool on) : on_(on), tty_(on && isatty(fileno(stderr))) {}
  void update(int64_t docs, int64_t bytes, int64_t total, bool final = false) {
    if (!on_) return;
    const auto now = Clock::now();
    const double since = std::chrono::duration<double>(now - last_).count();
    if (!final && since < (tty_ ? 0.5 : 5.0)) return;
    last_ = now;
    const double t = std::max(1e-9, std::chrono::duration<double>(now - t0_).count());
    std::fprintf(stderr, "%spreprocess: %lld docs | %.1f MB of %.1f MB (%.0f%%) | %.0f docs/s | %.2f MB/s | %.0f s%s",
                 tty_ ? "\r" : "", static_cast<long long>(docs), static_cast<double>(bytes) / 1e6,
                 static_cast<double>(total) / 1e6, total ? 100.0 * static_cast<double>(bytes) / static_cast<double>(total) : 100.0,
                 static_cast<double>(docs) / t, static_cast<double>(bytes) / 1e6 / t, t,
                 tty_ && !final ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool on_, tty_;
  Clock::time_point t0_ = Clock::now(), last_ = Clock::now();
};

// Feeds the valid documents of the inputs to the SentencePiece trainer.
class DocIterator : public sentencepiece::SentenceIterator {
 public:
  DocIterator(const std::vector<std::string>& inputs, const std::string& key)
      : reader_(inputs), key_(key) {
    Next();
  }
  bool done() const override { return done_; }
  void Next() override {
    RawDoc d;
    while (reader_.next(&d)) {
      Parsed p = parse_doc(d, is_json_file(reader_.file_name(d.file)), key_);
      if (!p.error.empty()) continue;  // reported by the tokenizing pass
      value_ = std::move(p.text);
      return;
    }
    done_ = true;
  }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  Reader reader_;
  std::string key_, value_;
  bool done_ = false;
};

}  // namespace

void train_tokenizer(const std::vector<std::string>& inputs, const std::string& json_key,
                     int64_t vocab_size, const std::string& model_path, int threads) {
  IEVO_CHECK(vocab_size > 0, "--train-tokenizer: vocabulary size must be > 0, got ", vocab_size);
  IEVO_CHECK(!model_path.empty(), "--train-tokenizer needs --tokenizer PATH to write the model to");
  DocIterator it(inputs, json_key);
  // Llama-style BPE: identity normalisation (text, newlines and runs of spaces are kept as they
  // are), digits split, unknown characters as bytes (<0x..> pieces), ids unk 0, <s> 1, </s> 2.
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"character_coverage", "0.9999"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"split_digits", "true"},
      {"byte_fallback", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"max_sentence_length", "65536"},   // bytes; longer documents are left out of training
      {"input_sentence_size", "2000000"},  // documents sampled for training
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(std::max(1, threads))},
      {"minloglevel", "2"},
  };
  std::string proto;
  const auto st = sentencepiece::SentencePieceTrainer::Train(args, &it, &proto);
  if (!st.ok())
    IEVO_FAIL("training the tokenizer (vocab ", vocab_size, ") failed: ", st.ToString());
  if (auto dir = fs::path(model_path).parent_path(); !dir.empty()) fs::create_directories(dir);
  write_atomic(model_path, proto);
}

PreprocessResult preprocess(const PreprocessOptions& opt) {
  IEVO_CHECK(!opt.inputs.empty(), "preprocess: no --input files");
  IEVO_CHECK(!opt.output_prefix.empty(), "preprocess: --output-prefix is empty");
  IEVO_CHECK(!opt.tokenizer.empty(), "preprocess: --tokenizer is empty");
  IEVO_CHECK(opt.workers >= 1, "preprocess: --workers must be >= 1, got ", opt.workers);
  PreprocessResult r;
  Reader reader(opt.inputs);  // checks the inputs exist
  if (!opt.force && up_to_date(opt, &r)) {
    r.up_to_date = true;
    r.bytes_read = reader.total_bytes();
    return r;
  }
  std::error_code ec;
  fs::remove(manifest_path(opt.output_prefix), ec);  // the old output is about to be replaced

  if (opt.train_tokenizer_vocab > 0) {
    if (opt.progress)
      std::fprintf(stderr, "preprocess: training a %lld-piece BPE tokenizer -> %s\n",
                   static_cast<long long>(opt.train_tokenizer_vocab), opt.tokenizer.c_str());
    train_tokenizer(opt.inputs, opt.json_key, opt.train_tokenizer_vocab, opt.tokenizer, opt.workers);
    r.trained_tokenizer = true;
  }
  if (!fs::is_regular_file(opt.tokenizer, ec))
    IEVO_FAIL("tokenizer ", opt.tokenizer, ": not found (a SentencePiece .model; "
              "or pass --train-tokenizer VOCAB_SIZE to train one)");
  sentencepiece::SentencePieceProcessor sp;
  if (const auto st = sp.Load(opt.tokenizer); !st.ok())
    IEVO_FAIL("tokenizer ", opt.tokenizer, ": cannot load as a SentencePiece model: ", st.ToString());
  r.vocab_size = sp.GetPieceSize();
  r.eod_id = sp.eos_id();
  if (r.eod_id < 0)
    IEVO_FAIL("tokenizer ", opt.tokenizer, " has no </s> (eos) piece to end documents with");
  r.dtype_code = best_dtype_code(r.vocab_size);
  if (auto dir = fs::path(opt.output_prefix).parent_path(); !dir.empty())
    fs::create_directories(dir);

  IndexedDatasetWriter writer(opt.output_prefix, r.dtype_code);
  Progress progress(opt.progress);
  constexpr size_t kMaxReported = 20;
  const size_t batch_docs = 256 * static_cast<size_t>(opt.workers);
  std::vector<RawDoc> batch;
  std::vector<Parsed> parsed;
  std::vector<std::vector<int>> ids;
  for (bool more = true; more;) {
    batch.clear();
    RawDoc d;
    while (batch.size() < batch_docs && (more = reader.next(&d))) batch.push_back(std::move(d));
    parsed.assign(batch.size(), {});
    ids.assign(batch.size(), {});
    const int64_t n = static_cast<int64_t>(batch.size());
#pragma omp parallel for schedule(dynamic, 16) num_threads(opt.workers)
    for (int64_t i = 0; i < n; ++i) {
      parsed[i] = parse_doc(batch[i], is_json_file(reader.file_name(batch[i].file)), opt.json_key);
      if (parsed[i].error.empty()) {
        // SentencePieceProcessor::Encode is const and safe to call from several threads.
        const auto st = sp.Encode(parsed[i].text, &ids[i]);
        if (!st.ok()) parsed[i].error = "tokenizer failed: " + st.ToString();
      }
    }
    for (int64_t i = 0; i < n; ++i) {  // in input order
      if (!parsed[i].error.empty()) {
        std::string msg = where(reader, batch[i], parsed[i].error_line) + ": " + parsed[i].error;
        if (opt.on_error == OnError::Stop)
          IEVO_FAIL(msg, " (--on-error stop; use --on-error skip to leave such documents out)");
        if (r.problems.size() < kMaxReported && opt.progress)
          std::fprintf(stderr, "preprocess: skipped %s\n", msg.c_str());
        r.problems.push_back(std::move(msg));
        ++r.skipped;
        continue;
      }
      std::vector<int32_t>& tok = ids[i];
      tok.push_back(r.eod_id);
      writer.add_document(tok);
      ++r.documents;
      r.tokens += static_cast<int64_t>(tok.size());
    }
    progress.update(r.documents, reader.bytes_read(), reader.total_bytes());
  }
  r.bytes_read = reader.bytes_read();
  progress.update(r.documents, reader.bytes_read(), reader.total_bytes(), true);
  if (r.documents == 0) IEVO_FAIL("preprocess: no valid documents in the input; nothing written");
  writer.finalize();

  nlohmann::json m = manifest_key(opt);
  m["tokenizer"] = file_stamp(opt.tokenizer);
  m["tokenizer"]["fnv1a64"] = file_fnv1a(opt.tokenizer);
  m["documents"] = r.documents;
  m["tokens"] = r.tokens;
  m["skipped"] = r.skipped;
  m["vocab_size"] = r.vocab_size;
  m["dtype_code"] = r.dtype_code;
  m["eod_id"] = r.eod_id;
  write_atomic(manifest_path(opt.output_prefix), m.dump(2) + "\n");
  return r;
}

}  // namespace ievo
