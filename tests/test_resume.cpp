// Checkpoints users can trust, through the real `ievo train` binary on the CPU:
//   * kill -9 at random steps (and in the middle of a checkpoint write, between the rename and the
//     `latest` update, after a complete save; sync and async writers), then checkpoint.resume:
//     auto: metrics.jsonl (loss, grad_norm, lr) and the final weights are bit-identical to an
//     uninterrupted run, with exactly one metrics line per step;
//   * truncated model.h5, flipped bytes (tensor data, state.json), missing `latest`, `latest`
//     naming a missing directory, missing state.json: auto skips to the previous checkpoint (and
//     continues bit-identically), an explicit PATH fails naming the file;
//   * keep_last, resume: none (refusal / overwrite), resume from another run's checkpoint;
//   * SIGTERM / SIGUSR1 / SIGINT: checkpoint of the last step, clean exit (0 / 0 / 130);
//   * a save that fails (simulated disk full, a real RLIMIT_FSIZE "File too large", an
//     unwritable `latest`; sync and async): the run fails naming the file, the previous
//     checkpoint survives and no step_<N>.tmp is left;
//   * `ievo convert to-hf` of a resumed, async-written checkpoint equals the uninterrupted one.
// The CPU ops are deterministic (static OpenMP partitions, OMP_NUM_THREADS fixed by ctest), so
// "identical" means equal doubles, not a tolerance.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "launch/checkpoint.h"
#include "launch/checkpointer.h"
#include "launch/config.h"
#include "launch/resume.h"
#include "models/params.h"
#include "util.h"

namespace fs = std::filesystem;
using namespace ievo;

namespace {

constexpr int64_t kSteps = 10;

// A tiny Llama on the shipped byte-level data; 10 steps of 4 sequences take about a second.
std::string write_config(const std::string& dir, const std::string& schedule = "cosine") {
  const std::string path = dir + "/tiny.yaml";
  std::ofstream(path) << "run: {seed: 7}\n"
                         "model: {arch: llama, vocab_size: 256, hidden_size: 32, num_layers: 2,\n"
                         "        num_heads: 4, num_kv_heads: 2, ffn_hidden_size: 64,\n"
                         "        max_position_embeddings: 64}\n"
                         "data: {paths: ["
                      << test::source_dir()
                      << "/configs/data/tiny], seq_len: 32}\n"
                         "train: {steps: "
                      << kSteps
                      << ", global_batch_size: 4, micro_batch_size: 2, log_every: 1}\n"
                         "optim: {lr: 1.0e-3, min_lr: 1.0e-4}\n"
                         "schedule: {kind: "
                      << schedule
                      << ", warmup_steps: 2}\n"
                         "checkpoint: {every: 2}\n";
  return path;
}

struct Result {
  int status = -1;  // the exit status; 128 + N when killed by signal N
  std::string out;
};

// `env ievo train CONFIG --set run.dir=RUN --set ...` through the shell.
Result train(const std::string& config, const std::string& run, const std::vector<std::string>& sets = {},
             const std::string& env = "") {
  std::string cmd = env + " " + test::ievo_binary() + " train " + config + " --set run.dir=" + run;
  for (auto& s : sets) cmd += " --set " + s;
  Result r;
  // In a group, so that the shell's own "Killed" note lands in the output too.
  test::run_command("{ (" + cmd + ") 2>&1; echo \"[exit $?]\"; }", &r.out);
  const auto at = r.out.rfind("[exit ");
  if (at != std::string::npos) r.status = std::atoi(r.out.c_str() + at + 6);
  return r;
}

std::string kill_env(int64_t step, const std::string& point) {
  return "IEVO_TEST_KILL_AT_STEP=" + std::to_string(step) + " IEVO_TEST_KILL_POINT=" + point;
}

// Complete lines of RUN/metrics.jsonl so far (while the run is writing it).
size_t metrics_lines(const std::string& run) {
  std::ifstream f(run + "/metrics.jsonl");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return static_cast<size_t>(std::count(s.begin(), s.end(), '\n'));
}

std::vector<nlohmann::json> metrics(const std::string& run) {
  std::vector<nlohmann::json> out;
  std::ifstream f(run + "/metrics.jsonl");
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// Steps first..last of `run` equal `ref`'s exactly, one line per step.
void expect_same_curve(const std::string& run, const std::vector<nlohmann::json>& ref,
                       int64_t first = 1, const std::string& what = "") {
  auto m = metrics(run);
  ASSERT_EQ(static_cast<int64_t>(m.size()), static_cast<int64_t>(ref.size()) - first + 1)
      << what << ": metrics.jsonl of " << run;
  for (size_t i = 0; i < m.size(); ++i) {
    const auto& r = ref[static_cast<size_t>(first - 1) + i];
    EXPECT_EQ(m[i]["step"].get<int64_t>(), r["step"].get<int64_t>()) << what;
    EXPECT_EQ(m[i]["loss"].get<double>(), r["loss"].get<double>()) << what << " step " << r["step"];
    EXPECT_EQ(m[i]["grad_norm"].get<double>(), r["grad_norm"].get<double>())
        << what << " step " << r["step"];
    EXPECT_EQ(m[i]["lr"].get<double>(), r["lr"].get<double>()) << what << " step " << r["step"];
  }
}

// Every tensor of every group of two checkpoints is bitwise equal.
void expect_same_checkpoint(const std::string& a, const std::string& b, const std::string& what) {
  CheckpointReader ra(a), rb(b);
  ASSERT_EQ(ra.groups(), rb.groups()) << what;
  EXPECT_EQ(ra.state().step, rb.state().step) << what;
  EXPECT_EQ(ra.state().consumed_samples, rb.state().consumed_samples) << what;
  int compared = 0;
  for (auto& g : ra.groups())
    for (auto& n : ra.tensor_names(g)) {
      Tensor x = ra.read(g, n), y = rb.read(g, n);
      ASSERT_EQ(x.nbytes(), y.nbytes()) << what << " " << g << "/" << n;
      EXPECT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0) << what << " " << g << "/" << n;
      ++compared;
    }
  EXPECT_GE(compared, 3 * 11) << what;  // params, exp_avg, exp_avg_sq of a 2-layer model
}

std::string latest_of(const std::string& run) {
  std::string s = test::read_file(run + "/checkpoints/latest");
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::vector<std::string> checkpoint_dirs(const std::string& run) {
  std::vector<std::string> out;
  for (auto& e : fs::directory_iterator(run + "/checkpoints"))
    if (e.is_directory()) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// The uninterrupted reference run, shared by the tests.
class Resume : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = test::temp_dir("resume");
    config_ = write_config(root_);
    ref_run_ = root_ + "/ref";
    Result r = train(config_, ref_run_);
    ASSERT_EQ(r.status, 0) << r.out;
    ref_ = metrics(ref_run_);
    ASSERT_EQ(static_cast<int64_t>(ref_.size()), kSteps);
  }
  std::string fresh(const std::string& name) { return root_ + "/" + name; }

  static std::string root_, config_, ref_run_;
  static std::vector<nlohmann::json> ref_;
};
std::string Resume::root_, Resume::config_, Resume::ref_run_;
std::vector<nlohmann::json> Resume::ref_;

}  // namespace

// ---- kill -9 and auto-resume ------------------------------------------------------------------

TEST_F(Resume, KillAtRandomStepsThenAutoResumeIsBitIdentical) {
  struct Trial {
    std::vector<std::pair<int64_t, std::string>> kills;  // (step, point), one run each
    bool async;
  };
  std::vector<Trial> trials;
  std::mt19937 rng(20261125);  // fixed: a failure reproduces
  std::uniform_int_distribution<int64_t> any_step(1, kSteps - 1);
  for (int i = 0; i < 3; ++i) trials.push_back({{{any_step(rng), "step"}}, i == 2});
  trials.push_back({{{4, "write"}}, false});    // half of model.h5 written
  trials.push_back({{{6, "renamed"}}, false});  // step_6 complete, `latest` still says step_4
  trials.push_back({{{8, "saved"}}, false});
  trials.push_back({{{4, "write"}}, true});     // in the background writer, training ahead
  trials.push_back({{{3, "step"}, {7, "step"}}, false});  // killed twice

  int n = 0;
  for (const auto& t : trials) {
    const std::string run = fresh("kill" + std::to_string(n++));
    std::string what = run + (t.async ? " (async)" : "");
    std::vector<std::string> sets = {"checkpoint.async=" + std::string(t.async ? "true" : "false")};
    for (auto& [step, point] : t.kills) {
      what += " kill@" + std::to_string(step) + ":" + point;
      Result k = train(config_, run, sets, kill_env(step, point));
      ASSERT_EQ(k.status, 128 + SIGKILL) << what << "\n" << k.out;
    }
    // Killed before any checkpoint was complete (step 1, or an async write still in flight):
    // a fresh start; otherwise a resume.
    const bool had_checkpoint = !latest_checkpoint(run).empty();
    Result r = train(config_, run, sets);
    ASSERT_EQ(r.status, 0) << what << "\n" << r.out;
    EXPECT_EQ(has(r.out, "resuming from"), had_checkpoint) << what << "\n" << r.out;
    expect_same_curve(run, ref_, 1, what);
    expect_same_checkpoint(run + "/checkpoints/step_10", ref_run_ + "/checkpoints/step_10", what);
    EXPECT_EQ(latest_of(run), "step_10") << what;
    for (auto& d : checkpoint_dirs(run)) EXPECT_FALSE(has(d, ".tmp")) << what << ": " << d;
  }
  // The "renamed" trial resumed from step_4 (what `latest` said), not from step_6.
}

TEST_F(Resume, ConvertToHfReadsAResumedAsyncCheckpoint) {
  const std::string run = fresh("convert");
  ASSERT_EQ(train(config_, run, {"checkpoint.async=true"}, kill_env(5, "step")).status, 128 + SIGKILL);
  ASSERT_EQ(train(config_, run, {"checkpoint.async=true"}).status, 0);
  std::string out;
  ASSERT_EQ(test::run_command(test::ievo_binary() + " convert to-hf " + run + "/checkpoints/step_10 " +
                                  run + "/hf", &out), 0) << out;
  ASSERT_EQ(test::run_command(test::ievo_binary() + " convert to-hf " + ref_run_ +
                                  "/checkpoints/step_10 " + run + "/hf_ref", &out), 0) << out;
  const std::string a = test::read_file(run + "/hf/model.safetensors");
  EXPECT_GT(a.size(), 100000u);
  EXPECT_EQ(a, test::read_file(run + "/hf_ref/model.safetensors"));
}

// ---- damaged checkpoints ----------------------------------------------------------------------

TEST_F(Resume, DamagedCheckpointsAreDetectedAndSkipped) {
  // A run killed right after step 6's checkpoint: step_2, step_4, step_6, latest = step_6.
  const std::string base = fresh("damaged_base");
  ASSERT_EQ(train(config_, base, {}, kill_env(6, "saved")).status, 128 + SIGKILL);
  ASSERT_EQ(latest_of(base), "step_6");
  std::string data_name = "model.layers.1.mlp.down_proj.weight";

  struct Case {
    std::string name;
    std::function<void(const std::string& ck)> damage;  // ck = RUN/checkpoints
    int64_t resumed;             // the step auto resumes from
    std::string auto_says;       // in the auto run's log
    std::string path_error;      // resume: PATH=step_6 fails naming this ("" : PATH not tried)
  };
  auto flip = [](const std::string& file, size_t at) {
    std::string bytes = test::read_file(file);
    ASSERT_LT(at, bytes.size());
    bytes[at] = static_cast<char>(bytes[at] ^ 0x20);
    std::ofstream(file, std::ios::binary) << bytes;
  };
  const std::vector<Case> cases = {
      {"truncated model.h5",
       [](const std::string& ck) { fs::resize_file(ck + "/step_6/model.h5", fs::file_size(ck + "/step_6/model.h5") / 2); },
       4, "step_6/model.h5", "step_6/model.h5"},
      {"flipped byte in a tensor",
       [&](const std::string& ck) {
         // The byte offset of one dataset's data, from the file's own layout.
         Tensor t = CheckpointReader(ck + "/step_6").read("params", data_name);
         const std::string bytes = test::read_file(ck + "/step_6/model.h5");
         const std::string needle(static_cast<const char*>(t.raw()), 64);
         const size_t at = bytes.find(needle);
         ASSERT_NE(at, std::string::npos);
         flip(ck + "/step_6/model.h5", at + 17);
       },
       4, "/params/" + data_name + " is corrupt", "/params/" + data_name + " is corrupt"},
      {"flipped byte in state.json",
       [&](const std::string& ck) {  // a plausible silent corruption: 24 -> 25, still JSON
         std::string s = test::read_file(ck + "/step_6/state.json");
         const size_t at = s.find("\"consumed_samples\": 24");
         ASSERT_NE(at, std::string::npos);
         s[at + 21] = '5';
         std::ofstream(ck + "/step_6/state.json", std::ios::binary) << s;
       },
       4, "step_6/state.json is corrupt", "step_6/state.json"},
      {"state.json missing",
       [](const std::string& ck) { fs::remove(ck + "/step_6/state.json"); }, 4,
       "step_6: no state.json", "step_6: no state.json"},
      {"latest missing", [](const std::string& ck) { fs::remove(ck + "/latest"); }, 6,
       "latest is missing", ""},
      {"latest names a missing directory",
       [](const std::string& ck) { fs::remove_all(ck + "/step_6"); }, 4,
       "names step_6, which does not exist", "no such directory"},
  };
  int n = 0;
  for (const auto& c : cases) {
    const std::string run = fresh("damaged" + std::to_string(n++));
    fs::copy(base, run, fs::copy_options::recursive);
    c.damage(run + "/checkpoints");
    if (!c.path_error.empty()) {  // explicit PATH: an error naming the file, nothing trained
      Result p = train(config_, run, {"checkpoint.resume=" + run + "/checkpoints/step_6"});
      EXPECT_EQ(p.status, 1) << c.name << "\n" << p.out;
      EXPECT_TRUE(has(p.out, c.path_error)) << c.name << "\n" << p.out;
      EXPECT_FALSE(has(p.out, "step 7/")) << c.name;
    }
    Result r = train(config_, run);
    ASSERT_EQ(r.status, 0) << c.name << "\n" << r.out;
    EXPECT_TRUE(has(r.out, c.auto_says)) << c.name << "\n" << r.out;
    EXPECT_TRUE(has(r.out, "resuming from " + run + "/checkpoints/step_" + std::to_string(c.resumed)))
        << c.name << "\n" << r.out;
    expect_same_curve(run, ref_, 1, c.name);  // never wrong numbers
    expect_same_checkpoint(run + "/checkpoints/step_10", ref_run_ + "/checkpoints/step_10", c.name);
  }

  // Every checkpoint damaged: auto refuses (it would otherwise silently start over).
  const std::string run = fresh("damaged_all");
  fs::copy(base, run, fs::copy_options::recursive);
  for (int s : {2, 4, 6}) fs::remove(run + "/checkpoints/step_" + std::to_string(s) + "/model.h5");
  Result r = train(config_, run);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_TRUE(has(r.out, "none of the checkpoints")) << r.out;
  for (int s : {2, 4, 6}) EXPECT_TRUE(has(r.out, "step_" + std::to_string(s) + ": no model.h5")) << r.out;
}

// ---- keep_last, resume: none / PATH ---------------------------------------------------------

TEST_F(Resume, KeepLastRemovesOlderCheckpointsOnlyAfterANewOneIsComplete) {
  for (const char* async : {"false", "true"}) {
    const std::string run = fresh(std::string("keep_") + async);
    Result r = train(config_, run, {"checkpoint.every=1", "checkpoint.keep_last=3",
                                    std::string("checkpoint.async=") + async});
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_EQ(checkpoint_dirs(run), (std::vector<std::string>{"step_10", "step_8", "step_9"})) << async;
    EXPECT_EQ(latest_of(run), "step_10");
    // Killed between step 6's rename and its `latest`: nothing was pruned for step 6 yet.
    const std::string k = fresh(std::string("keep_kill_") + async);
    ASSERT_EQ(train(config_, k, {"checkpoint.every=1", "checkpoint.keep_last=2",
                                 std::string("checkpoint.async=") + async},
                    kill_env(6, "renamed")).status, 128 + SIGKILL);
    EXPECT_EQ(checkpoint_dirs(k), (std::vector<std::string>{"step_4", "step_5", "step_6"})) << async;
    EXPECT_EQ(latest_of(k), "step_5");
    Result rk = train(config_, k, {"checkpoint.every=1", "checkpoint.keep_last=2"});
    ASSERT_EQ(rk.status, 0) << rk.out;
    EXPECT_TRUE(has(rk.out, "resuming from " + k + "/checkpoints/step_5")) << rk.out;
    expect_same_curve(k, ref_, 1, "keep_last kill");
    EXPECT_EQ(checkpoint_dirs(k), (std::vector<std::string>{"step_10", "step_9"}));
  }
}

TEST_F(Resume, NoneRefusesARunDirWithCheckpointsUnlessOverwrite) {
  const std::string run = fresh("none");
  ASSERT_EQ(train(config_, run, {}, kill_env(5, "step")).status, 128 + SIGKILL);
  Result r = train(config_, run, {"checkpoint.resume=none"});
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_TRUE(has(r.out, "checkpoint.resume: none, but " + run + "/checkpoints already has checkpoints (newest: step_4)")) << r.out;
  EXPECT_TRUE(has(r.out, "--set checkpoint.overwrite=true")) << r.out;
  EXPECT_EQ(latest_of(run), "step_4");  // untouched
  Result o = train(config_, run, {"checkpoint.resume=none", "checkpoint.overwrite=true"});
  ASSERT_EQ(o.status, 0) << o.out;
  EXPECT_FALSE(has(o.out, "resuming from")) << o.out;
  expect_same_curve(run, ref_, 1, "overwrite");  // a fresh start: 10 lines, the same numbers
}

TEST_F(Resume, PathResumesFromAnotherRunsCheckpoint) {
  const std::string run = fresh("path");
  Result r = train(config_, run, {"checkpoint.resume=" + ref_run_ + "/checkpoints/step_4"});
  ASSERT_EQ(r.status, 0) << r.out;
  expect_same_curve(run, ref_, 5, "resume: PATH");  // this run's metrics start at step 5
  expect_same_checkpoint(run + "/checkpoints/step_10", ref_run_ + "/checkpoints/step_10", "PATH");
  Result bad = train(config_, fresh("path_bad"), {"checkpoint.resume=" + run + "/checkpoints/step_3"});
  EXPECT_EQ(bad.status, 1);
  EXPECT_TRUE(has(bad.out, "checkpoint.resume: " + run + "/checkpoints/step_3: checkpoint " + run +
                               "/checkpoints/step_3: no state.json (no such directory)")) << bad.out;
}

// ---- signals ----------------------------------------------------------------------------------

namespace {
// Starts `ievo train` directly (no shell, so the signal reaches ievo), output into `log`.
pid_t spawn_train(const std::string& config, const std::vector<std::string>& sets, const std::string& log) {
  std::vector<std::string> args = {test::ievo_binary(), "train", config};
  for (auto& s : sets) args.insert(args.end(), {"--set", s});
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}
}  // namespace

TEST(Signals, SigtermSigusr1SigintSaveTheStepAndExit) {
  const std::string root = test::temp_dir("signals");
  // A constant schedule, so that a shorter reference run has the same learning rates.
  const std::string config = write_config(root, "constant");
  for (int sig : {SIGTERM, SIGUSR1, SIGINT}) {
    const std::string run = root + "/run" + std::to_string(sig), log = run + ".log";
    const pid_t pid = spawn_train(config, {"run.dir=" + run, "train.steps=100000", "checkpoint.every=0"}, log);
    ASSERT_GT(pid, 0);
    // Wait for a few steps (the handlers are installed before the first step).
    for (int i = 0; i < 600 && metrics_lines(run) < 3; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ASSERT_GE(metrics_lines(run), 3u) << test::read_file(log);
    ASSERT_EQ(::kill(pid, sig), 0);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    const std::string out = test::read_file(log);
    ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status) << "\n" << out;
    EXPECT_EQ(WEXITSTATUS(status), sig == SIGINT ? 130 : 0) << out;
    const int64_t steps = static_cast<int64_t>(metrics(run).size());
    const std::string step_dir = "step_" + std::to_string(steps);
    EXPECT_TRUE(has(out, std::string(sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : "SIGINT") +
                             " received: saved step " + std::to_string(steps) + ", exiting")) << out;
    EXPECT_EQ(latest_of(run), step_dir);
    EXPECT_EQ(CheckpointReader(run + "/checkpoints/" + step_dir).state().step, steps);
    if (sig != SIGTERM) continue;
    // The resumed run continues exactly: compare with an uninterrupted run of steps + 2.
    const std::string total = "train.steps=" + std::to_string(steps + 2);
    Result ref = train(config, root + "/sig_ref", {total});
    ASSERT_EQ(ref.status, 0) << ref.out;
    Result res = train(config, run, {total});
    ASSERT_EQ(res.status, 0) << res.out;
    expect_same_curve(run, metrics(root + "/sig_ref"), 1, "after SIGTERM");
  }
}

// ---- failing saves ----------------------------------------------------------------------------

TEST_F(Resume, AFailedSaveIsReportedAndThePreviousCheckpointSurvives) {
  auto expect_survivor = [&](const std::string& run, const std::string& what) {
    EXPECT_EQ(latest_of(run), "step_2") << what;
    EXPECT_EQ(checkpoint_dirs(run), std::vector<std::string>{"step_2"}) << what;  // no step_4.tmp
    expect_same_checkpoint(run + "/checkpoints/step_2", ref_run_ + "/checkpoints/step_2", what);
    Result r = train(config_, run);  // and the run continues from it exactly
    ASSERT_EQ(r.status, 0) << what << "\n" << r.out;
    EXPECT_TRUE(has(r.out, "resuming from " + run + "/checkpoints/step_2")) << r.out;
    expect_same_curve(run, ref_, 1, what);
  };
  // Simulated disk full half-way through model.h5, sync and async.
  for (const char* async : {"false", "true"}) {
    const std::string run = fresh(std::string("enospc_") + async);
    Result r = train(config_, run, {std::string("checkpoint.async=") + async}, "IEVO_TEST_FAIL_SAVE=4");
    EXPECT_EQ(r.status, 1) << r.out;
    EXPECT_TRUE(has(r.out, "write to " + run + "/checkpoints/step_4.tmp/model.h5 failed: No space left on device"))
        << r.out;
    if (std::string(async) == "true") {
      EXPECT_TRUE(has(r.out, "the background checkpoint write failed")) << r.out;
    }
    expect_survivor(run, std::string("simulated ENOSPC, async=") + async);
  }
  // A real write error: the file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes write() fail
  // with EFBIG once model.h5 passes 200 KiB (it is ~400 KiB); root cannot bypass it.
  {
    const std::string run = fresh("efbig");
    ASSERT_EQ(train(config_, run, {}, kill_env(2, "saved")).status, 128 + SIGKILL);
    Result r = train(config_, run, {}, "ulimit -f 200; trap '' XFSZ;");
    EXPECT_EQ(r.status, 1) << r.out;
    EXPECT_TRUE(has(r.out, run + "/checkpoints/step_4.tmp/model.h5")) << r.out;
    expect_survivor(run, "RLIMIT_FSIZE");
  }
  // `latest` cannot be replaced (a directory is in its way): the error names it; step_4 itself
  // is complete, and auto finds it by scanning.
  {
    const std::string run = fresh("latest_blocked");
    ASSERT_EQ(train(config_, run, {}, kill_env(2, "saved")).status, 128 + SIGKILL);
    fs::remove(run + "/checkpoints/latest");
    fs::create_directories(run + "/checkpoints/latest/x");
    Result r = train(config_, run);
    EXPECT_EQ(r.status, 1) << r.out;
    EXPECT_TRUE(has(r.out, run + "/checkpoints/latest")) << r.out;
    fs::remove_all(run + "/checkpoints/latest");
    Result again = train(config_, run);
    ASSERT_EQ(again.status, 0) << again.out;
    EXPECT_TRUE(has(again.out, "resuming from " + run + "/checkpoints/step_4")) << again.out;
    expect_same_curve(run, ref_, 1, "latest blocked");
  }
}

// ---- the pieces, directly ---------------------------------------------------------------------

TEST(ResumeUnits, TruncateMetricsKeepsStepsUpToTheResumedOneAndDropsATornLine) {
  const std::string run = test::temp_dir("trunc");
  std::ofstream(run + "/metrics.jsonl") << "{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"loss\":2.4}\n"
                                           "{\"step\":2,\"val_loss\":2.6}\n{\"step\":3,\"loss\":2.3}\n"
                                           "{\"step\":4,\"lo";  // killed mid-write
  truncate_metrics(run, 2);
  EXPECT_EQ(test::read_file(run + "/metrics.jsonl"),
            "{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"loss\":2.4}\n{\"step\":2,\"val_loss\":2.6}\n");
  truncate_metrics(run, 0);
  EXPECT_EQ(test::read_file(run + "/metrics.jsonl"), "");
  truncate_metrics(run + "/nothing_here", 3);  // no file: nothing to do
}

TEST(ResumeUnits, PruneKeepsTheNewestAndLeavesNewerOnesAlone) {
  const std::string run = test::temp_dir("prune");
  for (int s : {1, 2, 3, 5, 8, 9}) fs::create_directories(run + "/checkpoints/step_" + std::to_string(s));
  fs::create_directories(run + "/checkpoints/step_7.tmp");
  EXPECT_EQ(prune_checkpoints(run, 5, 0), std::vector<int64_t>{});  // 0: keep all
  EXPECT_EQ(prune_checkpoints(run, 5, 2), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(checkpoint_dirs(run), (std::vector<std::string>{"step_3", "step_5", "step_7.tmp", "step_8", "step_9"}));
  EXPECT_EQ(list_checkpoints(run).front().first, 9);
}

TEST(ResumeUnits, ChangedConfigKeysIgnoresKeysThatMayChange) {
  const std::string a = "run:\n  dir: x\n  seed: 1\ntrain:\n  steps: 10  # c\n  global_batch_size: 4\n"
                        "data:\n  paths: [a, b]\ncheckpoint:\n  every: 2\n";
  const std::string b = "run:\n  dir: y\n  seed: 2\ntrain:\n  steps: 20\n  global_batch_size: 4\n"
                        "data:\n  paths: [a, c]\ncheckpoint:\n  every: 5\nparallel:\n  zero: 3\n";
  EXPECT_EQ(changed_config_keys(a, b), (std::vector<std::string>{"data.paths", "run.seed"}));
  EXPECT_TRUE(changed_config_keys(a, a).empty());
}

TEST(ResumeUnits, ConfigKeys) {
  const std::string base = "model: {vocab_size: 256, hidden_size: 32, num_layers: 1, num_heads: 4, "
                           "ffn_hidden_size: 64}\ndata: {synthetic: true, seq_len: 16}\n"
                           "train: {steps: 2, global_batch_size: 2, micro_batch_size: 1}\n";
  Config c = load_config_string(base, "x.yaml");
  EXPECT_EQ(c.checkpoint.resume, "auto");
  EXPECT_EQ(c.checkpoint.keep_last, 0);
  EXPECT_FALSE(c.checkpoint.async);
  EXPECT_FALSE(c.checkpoint.overwrite);
  c = load_config_string(base, "x.yaml", {"checkpoint.resume=/a/step_3", "checkpoint.keep_last=2",
                                          "checkpoint.async=true", "checkpoint.overwrite=true"});
  EXPECT_EQ(c.checkpoint.resume, "/a/step_3");
  EXPECT_EQ(c.checkpoint.keep_last, 2);
  EXPECT_TRUE(c.checkpoint.async && c.checkpoint.overwrite);
  try {
    load_config_string(base, "x.yaml", {"checkpoint.keep_last=-1"});
    ADD_FAILURE() << "keep_last=-1 accepted";
  } catch (const Error& e) {
    EXPECT_TRUE(has(e.what(), "checkpoint.keep_last: must be >= 0")) << e.what();
  }
  EXPECT_TRUE(has(config_to_yaml(c), "resume: /a/step_3"));
}

TEST(ResumeUnits, AsyncWriterSavesTheStateAtTheCallAndReportsAFailureLater) {
  ModelConfig c;
  c.vocab_size = 32, c.hidden_size = 16, c.num_layers = 2, c.num_heads = 4, c.num_kv_heads = 2;
  c.ffn_hidden_size = 24, c.max_position_embeddings = 64;
  ParamStore p(param_specs(c), DType::F32, Device::CPU);
  for (size_t i = 0; i < p.size(); ++i) p[i].copy_from(test::random_tensor(p.spec(i).shape, DType::F32, 40 + i));
  const ParamStore before = [&] {
    ParamStore b(param_specs(c), DType::F32, Device::CPU);
    b.flat().copy_from(p.flat());
    return b;
  }();
  const std::string run = test::temp_dir("async_unit");
  {
    Checkpointer ck(run, c, /*keep_last=*/1, /*async=*/true);
    CheckpointState st;
    st.step = 1;
    ck.save(st, {checkpoint_group("params", p)});  // a host copy is taken here...
    p.flat().zero_();                              // ... so this does not reach the file
    ck.wait();
    CheckpointReader r(checkpoint_dir(run, 1));
    for (size_t i = 0; i < p.size(); ++i) {
      Tensor t = r.read("params", p.spec(i).name);
      EXPECT_EQ(std::memcmp(t.raw(), before[i].raw(), t.nbytes()), 0) << p.spec(i).name;
    }
    // A failing background write: reported at the next sync point, step_1 survives.
    ::setenv("IEVO_TEST_FAIL_SAVE", "2", 1);
    st.step = 2;
    ck.save(st, {checkpoint_group("params", p)});
    try {
      ck.wait();
      ADD_FAILURE() << "the failed write was not reported";
    } catch (const Error& e) {
      EXPECT_TRUE(has(e.what(), "the background checkpoint write failed: write to " + run +
                                    "/checkpoints/step_2.tmp/model.h5 failed"))
          << e.what();
    }
    ::unsetenv("IEVO_TEST_FAIL_SAVE");
    ck.poll();  // reported once
    EXPECT_EQ(checkpoint_dirs(run), std::vector<std::string>{"step_1"});
    EXPECT_EQ(latest_of(run), "step_1");
    // keep_last = 1: step_1 goes only once step_3 is complete.
    st.step = 3;
    ck.save(st, {checkpoint_group("params", p)});
    ck.wait();
    EXPECT_EQ(checkpoint_dirs(run), std::vector<std::string>{"step_3"});
  }
}
