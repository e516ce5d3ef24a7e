// TensorBoard event files (launch/tensorboard.h): CRC-32C test vectors, and a run of `ievo train`
// with metrics.tensorboard: true read back by an independent little reader (TFRecord framing with
// its CRCs, then the Event / Summary / Value protobuf fields by number), its scalars checked
// against metrics.jsonl; a run killed and resumed shows each step once (SessionLog START).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "launch/metrics.h"
#include "launch/tensorboard.h"
#include "util.h"

namespace fs = std::filesystem;
using namespace ievo;

namespace {

TEST(TensorBoard, Crc32cTestVectors) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  // RFC 3720 (iSCSI) B.4: 32 bytes of zeros, of 0xff, and 0..31.
  std::string zeros(32, '\0'), ones(32, '\xff'), inc(32, '\0');
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<char>(i);
  EXPECT_EQ(crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(crc32c(inc.data(), 32), 0x46DD794Eu);
  // Incremental = one shot.
  EXPECT_EQ(crc32c("56789", 5, crc32c("1234", 4)), 0xE3069283u);
  // Masking: rotate right by 15, add 0xa282ead8.
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

// ---- an independent reader ------------------------------------------------------------------

struct Event {
  double wall_time = 0;
  int64_t step = 0;
  std::string file_version;
  std::map<std::string, float> scalars;
  int session_status = -1;  // SessionLog.status (1 = START); -1: no session_log
};

struct Reader {
  const std::string& s;
  size_t p = 0;
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (p >= s.size()) throw std::runtime_error("truncated varint");
      const auto b = static_cast<unsigned char>(s[p++]);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
  }
  template <class T>
  T fixed() {
    T v;
    if (p + sizeof(T) > s.size()) throw std::runtime_error("truncated fixed");
    std::memcpy(&v, s.data() + p, sizeof(T));
    p += sizeof(T);
    return v;
  }
  std::string bytes() {
    const uint64_t n = varint();
    if (p + n > s.size()) throw std::runtime_error("truncated bytes");
    std::string out = s.substr(p, n);
    p += n;
    return out;
  }
  bool done() const { return p >= s.size(); }
};

std::pair<std::string, float> parse_value(const std::string& b) {
  Reader r{b};
  std::pair<std::string, float> v{"", NAN};
  while (!r.done()) {
    const uint64_t key = r.varint();
    if (key == (1 << 3 | 2)) v.first = r.bytes();        // tag
    else if (key == (2 << 3 | 5)) v.second = r.fixed<float>();  // simple_value
    else throw std::runtime_error("unexpected Value field " + std::to_string(key));
  }
  return v;
}

Event parse_event(const std::string& b) {
  Reader r{b};
  Event e;
  while (!r.done()) {
    const uint64_t key = r.varint();
    if (key == (1 << 3 | 1)) e.wall_time = r.fixed<double>();
    else if (key == (2 << 3 | 0)) e.step = static_cast<int64_t>(r.varint());
    else if (key == (3 << 3 | 2)) e.file_version = r.bytes();
    else if (key == (5 << 3 | 2)) {
      const std::string summary = r.bytes();
      Reader sr{summary};
      while (!sr.done()) {
        if (sr.varint() != (1 << 3 | 2)) throw std::runtime_error("unexpected Summary field");
        e.scalars.insert(parse_value(sr.bytes()));
      }
    } else if (key == (7 << 3 | 2)) {  // session_log: SessionLog { status = 1 (varint) }
      const std::string log = r.bytes();
      Reader lr{log};
      e.session_status = 0;
      while (!lr.done()) {
        if (lr.varint() != (1 << 3 | 0)) throw std::runtime_error("unexpected SessionLog field");
        e.session_status = static_cast<int>(lr.varint());
      }
    } else {
      throw std::runtime_error("unexpected Event field " + std::to_string(key));
    }
  }
  return e;
}

// TFRecords: uint64 length, masked crc of the length, data, masked crc of the data.
std::vector<Event> read_events(const std::string& path) {
  const std::string f = test::read_file(path);
  std::vector<Event> out;
  size_t p = 0;
  auto masked = [](const char* d, size_t n) {
    const uint32_t c = crc32c(d, n);
    return ((c >> 15) | (c << 17)) + 0xa282ead8u;
  };
  while (p < f.size()) {
    uint64_t len;
    uint32_t len_crc, data_crc;
    EXPECT_LE(p + 12, f.size());
    std::memcpy(&len, f.data() + p, 8);
    std::memcpy(&len_crc, f.data() + p + 8, 4);
    EXPECT_EQ(len_crc, masked(f.data() + p, 8)) << "record at byte " << p;
    EXPECT_LE(p + 12 + len + 4, f.size());
    const std::string data = f.substr(p + 12, len);
    std::memcpy(&data_crc, f.data() + p + 12 + len, 4);
    EXPECT_EQ(data_crc, masked(data.data(), data.size())) << "record at byte " << p;
    out.push_back(parse_event(data));
    p += 12 + len + 4;
  }
  return out;
}

TEST(TensorBoard, EncodedEventRoundTrips) {
  const std::string ev = encode_event(1234.5, 300, "", {{"train/loss", 2.5f}, {"train/lr", 1e-3f}});
  const Event e = parse_event(ev);
  EXPECT_EQ(e.wall_time, 1234.5);
  EXPECT_EQ(e.step, 300);
  EXPECT_EQ(e.file_version, "");
  ASSERT_EQ(e.scalars.size(), 2u);
  EXPECT_EQ(e.scalars.at("train/loss"), 2.5f);
  EXPECT_EQ(e.scalars.at("train/lr"), 1e-3f);
  // The exact bytes of a small event: wall_time 0 (key 0x09), step 1 (0x10 0x01), one value.
  const std::string small = encode_event(0.0, 1, "", {{"a", 1.0f}});
  const std::string expect = std::string("\x09\0\0\0\0\0\0\0\0\x10\x01\x2a\x0a\x0a\x08\x0a\x01"
                                         "a\x15\0\0\x80\x3f",
                                         23);
  EXPECT_EQ(small, expect);
  // SessionLog START at step 5: field 7 (key 0x3a), length 2, status (key 0x08) = 1.
  EXPECT_EQ(encode_session_start(0.0, 5), std::string("\x09\0\0\0\0\0\0\0\0\x10\x05\x3a\x02\x08\x01", 15));
  EXPECT_EQ(parse_event(encode_session_start(2.0, 7)).session_status, 1);
}

TEST(TensorBoard, TrainingRunMatchesMetricsJsonl) {
  const std::string dir = test::temp_dir("tensorboard");
  const std::string cfg = dir + "/tiny.yaml";
  std::ofstream(cfg) << "run: {dir: " << dir << "/run, seed: 3}\n"
                     << "model: {arch: llama, vocab_size: 256, hidden_size: 32, num_layers: 2,\n"
                     << "        num_heads: 4, num_kv_heads: 2, ffn_hidden_size: 64,\n"
                     << "        max_position_embeddings: 64}\n"
                     << "data: {paths: [" << test::source_dir() << "/configs/data/tiny], seq_len: 32,\n"
                     << "       valid_paths: [" << test::source_dir() << "/configs/data/tiny]}\n"
                     << "train: {steps: 6, global_batch_size: 4, micro_batch_size: 2,\n"
                     << "        eval_every: 3, eval_batches: 1, log_every: 2}\n"
                     << "metrics: {tensorboard: true}\n"
                     << "debug: {nan_at_step: 2}\n";
  std::string out;
  ASSERT_EQ(test::run_command(test::ievo_binary() + " train " + cfg, &out), 0) << out;

  // One event file, named as TensorBoard globs for.
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir + "/run"))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0)
      files.push_back(e.path().string());
  ASSERT_EQ(files.size(), 1u);
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  EXPECT_TRUE(std::regex_match(fs::path(files[0]).filename().string(),
                               std::regex(std::string("events\\.out\\.tfevents\\.[0-9]{10}\\.") +
                                          std::regex_replace(host, std::regex("[.]"), "\\."))))
      << files[0];

  const std::vector<Event> events = read_events(files[0]);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events[0].file_version, "brain.Event:2");
  EXPECT_TRUE(events[0].scalars.empty());
  // SessionLog START at the first step trained (here 1: a fresh start).
  EXPECT_EQ(events[1].session_status, 1);
  EXPECT_EQ(events[1].step, 1);
  EXPECT_TRUE(events[1].scalars.empty());

  // Every metrics.jsonl line has an event at its step with the same values (as float).
  std::ifstream in(dir + "/run/metrics.jsonl");
  size_t ev = 2, step_lines = 0, val_lines = 0;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    ASSERT_LT(ev, events.size()) << "no event for " << line;
    const Event& e = events[ev++];
    EXPECT_EQ(e.step, j["step"].get<int64_t>());
    EXPECT_GT(e.wall_time, 1.7e9);  // seconds since 1970
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!it.value().is_number() || it.key() == "step" || it.key() == "tokens") continue;
      std::string key = it.key(), tag = MetricsLogger::tensorboard_tag(key);
      double v = it.value().get<double>();
      if (key == "peak_mem_bytes") tag = "train/peak_mem_gib", v /= 1024.0 * 1024.0 * 1024.0;
      ASSERT_TRUE(e.scalars.count(tag)) << tag << " missing at step " << e.step;
      EXPECT_EQ(e.scalars.at(tag), static_cast<float>(v)) << tag << " at step " << e.step;
    }
    if (j.contains("loss")) {
      ++step_lines;
      EXPECT_EQ(e.scalars.count("train/loss"), 1u);
      // Step 2 is poisoned (debug.nan_at_step): its NaN norm (null in JSON) is not written.
      EXPECT_EQ(e.scalars.count("train/grad_norm"), j["grad_norm"].is_null() ? 0u : 1u);
      EXPECT_EQ(e.scalars.at("train/skipped_total"), e.step >= 2 ? 1.0f : 0.0f);
    }
    if (j.contains("val_loss")) {
      ++val_lines;
      EXPECT_EQ(e.scalars.at("val/loss"), static_cast<float>(j["val_loss"].get<double>()));
    }
  }
  EXPECT_EQ(step_lines, 6u);
  EXPECT_EQ(val_lines, 2u);  // after steps 3 and 6
  EXPECT_EQ(ev, events.size()) << "events without a metrics.jsonl line";

  // The rank log has the progress lines (log_every 2) with a timestamp.
  const std::string log = test::read_file(dir + "/run/logs/rank_0.log");
  EXPECT_TRUE(std::regex_search(log, std::regex("\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\dZ step "
                                                "4/6 \\| loss [0-9.]+ \\| grad_norm [0-9.]+ \\| lr "
                                                "[0-9.e+-]+ \\| [0-9.K]+ tok/s \\| mem [0-9.]+ "
                                                "GiB \\| ETA 0:00:0[0-9] \\| skipped 1")))
      << log;
}

// What TensorBoard shows of a run directory: the event files in name order, each event's scalars
// by (tag, step), where a SessionLog START at step s first purges every point at a step >= s
// (tensorboard/backend/event_processing: _CheckForRestartAndMaybePurge with by_tags=False).
// Returns tag -> step -> values (more than one value: a duplicate the user would see).
std::map<std::string, std::map<int64_t, std::vector<float>>> tensorboard_view(const std::string& run,
                                                                              bool purge) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(run))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0)
      files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  std::map<std::string, std::map<int64_t, std::vector<float>>> view;
  for (const auto& f : files)
    for (const Event& e : read_events(f)) {
      if (purge && e.session_status == 1)
        for (auto& [tag, points] : view) points.erase(points.lower_bound(e.step), points.end());
      for (const auto& [tag, v] : e.scalars) view[tag][e.step].push_back(v);
    }
  return view;
}

// kill -9 after step 5's metrics (the last checkpoint is step 4), then auto-resume: metrics.jsonl
// has each step once, and the event files, read as TensorBoard reads them, too, with the values of
// metrics.jsonl; without the purge step 5 would be there twice.
TEST(TensorBoard, ResumedRunShowsEachStepOnce) {
  const std::string dir = test::temp_dir("tensorboard_resume");
  const std::string cfg = dir + "/tiny.yaml";
  std::ofstream(cfg) << "run: {dir: " << dir << "/run, seed: 3}\n"
                     << "model: {arch: llama, vocab_size: 256, hidden_size: 32, num_layers: 2,\n"
                     << "        num_heads: 4, num_kv_heads: 2, ffn_hidden_size: 64,\n"
                     << "        max_position_embeddings: 64}\n"
                     << "data: {paths: [" << test::source_dir() << "/configs/data/tiny], seq_len: 32}\n"
                     << "train: {steps: 8, global_batch_size: 4, micro_batch_size: 2}\n"
                     << "checkpoint: {every: 2}\n"
                     << "metrics: {tensorboard: true}\n";
  std::string out;
  EXPECT_NE(test::run_command("IEVO_TEST_KILL_AT_STEP=5 " + test::ievo_binary() + " train " + cfg, &out), 0)
      << out;
  ASSERT_EQ(test::read_file(dir + "/run/checkpoints/latest").substr(0, 6), "step_4");
  ASSERT_EQ(test::run_command(test::ievo_binary() + " train " + cfg, &out), 0) << out;
  ASSERT_NE(out.find("resuming from"), std::string::npos) << out;

  std::map<int64_t, nlohmann::json> lines;
  std::ifstream in(dir + "/run/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_TRUE(lines.emplace(j["step"].get<int64_t>(), j).second) << "step twice: " << line;
  }
  ASSERT_EQ(lines.size(), 8u);

  const auto raw = tensorboard_view(dir + "/run", /*purge=*/false);
  EXPECT_EQ(raw.at("train/loss").at(5).size(), 2u) << "the interrupted run's step 5 is in its file";
  const auto view = tensorboard_view(dir + "/run", /*purge=*/true);
  const auto& loss = view.at("train/loss");
  ASSERT_EQ(loss.size(), 8u);
  for (const auto& [step, values] : loss) {
    ASSERT_EQ(values.size(), 1u) << "step " << step << " shown " << values.size() << " times";
    EXPECT_EQ(values[0], static_cast<float>(lines.at(step)["loss"].get<double>())) << "step " << step;
  }
  // The resumed run's START is at step 5 (checkpoint 4 + 1).
  std::vector<std::pair<std::string, int64_t>> starts;
  for (const auto& e : fs::directory_iterator(dir + "/run"))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0)
      for (const Event& ev : read_events(e.path().string()))
        if (ev.session_status == 1) starts.emplace_back(e.path().filename().string(), ev.step);
  std::sort(starts.begin(), starts.end());
  ASSERT_EQ(starts.size(), 2u);
  std::vector<int64_t> start_steps = {starts[0].second, starts[1].second};
  std::sort(start_steps.begin(), start_steps.end());
  EXPECT_EQ(start_steps, (std::vector<int64_t>{1, 5}));
}

TEST(TensorBoard, ProgressLine) {
  StepMetrics m;
  m.step = 10;
  m.loss = 2.34567;
  m.grad_norm = 0.5;
  m.lr = 3e-4;
  m.tokens_per_s = 123456;
  m.mfu = 0.415;
  m.peak_mem_bytes = int64_t(3) << 30;
  EXPECT_EQ(MetricsLogger::progress_line(m, 100, 83),
            "step 10/100 | loss 2.3457 | grad_norm 0.500 | lr 3.000e-04 | 123.5K tok/s | MFU 41.5% | "
            "mem 3.00 GiB | ETA 0:01:23");
  m.skipped = true;
  m.skipped_total = 2;
  m.loss_scale = 32768;
  EXPECT_EQ(MetricsLogger::progress_line(m, 100, -1),
            "step 10/100 | loss 2.3457 | grad_norm 0.500 | lr 3.000e-04 | 123.5K tok/s | MFU 41.5% | "
            "mem 3.00 GiB | skipped 2 (this step) | scale 32768");
}

}  // namespace
