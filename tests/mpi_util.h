// Helpers shared by the MPI tests (tests/test_mpi_*.cpp, run under mpirun -np 2 and -np 4).
#pragma once
#include <mpi.h>

#include <cmath>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "launch/checkpoint.h"
#include "launch/config.h"
#include "launch/trainer.h"
#include "parallel/topology.h"
#include "util.h"

namespace ievo::test {

// A fresh directory made by world rank 0, the same path on every rank (collective).
inline std::string shared_dir(const std::string& tag) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::string d = rank == 0 ? temp_dir(tag) : "";
  int n = static_cast<int>(d.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  d.resize(static_cast<size_t>(n));
  MPI_Bcast(d.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
  return d;
}


// A training run of a test, as this rank saw it: its metrics, its run directory, the last step's
// checkpoint and the model trained.
struct TrainRun {
  std::vector<StepMetrics> metrics;
  std::string checkpoint, dir;
  ModelConfig model;
};

inline TrainRun train_run(const Config& cfg, MPI_Comm comm) {
  TrainRun r;
  r.metrics = run_train(cfg, comm);
  r.checkpoint = checkpoint_dir(cfg.run.dir, cfg.train.steps);
  r.dir = cfg.run.dir;
  r.model = cfg.model.model;
  return r;
}

// val_loss of every evaluation in RUN_DIR/metrics.jsonl (written by world rank 0 of the run), in order.
inline std::vector<double> val_losses(const std::string& run_dir) {
  std::vector<double> out;
  std::istringstream in(read_file(run_dir + "/metrics.jsonl"));
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("val_loss")) out.push_back(j["val_loss"].get<double>());
  }
  return out;
}

// The one-process reference run NAME on this rank (MPI_COMM_SELF), trained once per test binary:
// make(dir) gives its config for the directory <shared_dir(tag)>/NAME_rank<r>. The first call of
// a tag is collective (shared_dir).
inline const TrainRun& one_process_run(const std::string& tag, const std::string& name,
                                       const std::function<Config(const std::string& dir)>& make) {
  static std::map<std::string, std::string> bases;
  static std::map<std::string, TrainRun> runs;
  auto base = bases.find(tag);
  if (base == bases.end()) base = bases.emplace(tag, shared_dir(tag)).first;
  const std::string key = tag + "/" + name;
  auto it = runs.find(key);
  if (it != runs.end()) return it->second;
  const std::string dir = base->second + "/" + name + "_rank" + std::to_string(world_rank());
  return runs.emplace(key, train_run(make(dir), MPI_COMM_SELF)).first->second;
}

// A 2-layer Llama on the shipped tiny data (vocab 256, d 32, 4 heads / 2 kv heads, T 32, global batch 8
// of micro-batches of 2, constant LR after 2 warm-up steps, a checkpoint every 2 steps).
inline Config small_config(const std::string& tag, const std::string& run_dir, int64_t steps, int zero,
                           const std::string& resume, std::vector<std::string> sets = {}) {
  const std::string yaml =
      "run: {seed: 11}\n"
      "model: {arch: llama, vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4,\n"
      "        num_kv_heads: 2, ffn_hidden_size: 64, max_position_embeddings: 64}\n"
      "data: {paths: [" + test::source_dir() + "/configs/data/tiny], seq_len: 32}\n"
      "train: {global_batch_size: 8, micro_batch_size: 2, log_every: 100}\n"
      "optim: {lr: 1.0e-3}\n"
      "schedule: {kind: constant, warmup_steps: 2}\n"
      "checkpoint: {every: 2}\n";
  sets.insert(sets.begin(), {"run.dir=" + run_dir, "train.steps=" + std::to_string(steps),
                             "parallel.zero=" + std::to_string(zero), "checkpoint.resume=" + resume});
  return load_config_string(yaml, tag, sets);
}

// Trains on the first `ranks` ranks of the world (the others wait); every rank gets rank 0's metrics and the
// error of a failed run (rank 0's, else "failed").
inline std::vector<StepMetrics> train_on(int ranks, const Config& cfg, std::string* error = nullptr) {
  MPI_Comm sub = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() < ranks ? 0 : MPI_UNDEFINED, world_rank(), &sub);
  std::vector<StepMetrics> m;
  std::string err;
  if (sub != MPI_COMM_NULL) {
    try {
      m = run_train(cfg, sub);
    } catch (const std::exception& e) {
      err = e.what();
      m.clear();
    }
    MPI_Comm_free(&sub);
  }
  int failed = err.empty() ? 0 : 1;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (error) *error = failed ? (world_rank() == 0 ? err : "failed") : "";
  else EXPECT_EQ(failed, 0) << err;
  int64_t n = static_cast<int64_t>(m.size());
  MPI_Bcast(&n, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
  std::vector<double> v(static_cast<size_t>(3 * n));
  for (size_t i = 0; i < m.size() && world_rank() == 0; ++i)
    v[3 * i] = static_cast<double>(m[i].step), v[3 * i + 1] = m[i].loss, v[3 * i + 2] = m[i].grad_norm;
  MPI_Bcast(v.data(), static_cast<int>(v.size()), MPI_DOUBLE, 0, MPI_COMM_WORLD);
  m.resize(static_cast<size_t>(n));
  for (size_t i = 0; i < m.size(); ++i)
    m[i].step = static_cast<int64_t>(v[3 * i]), m[i].loss = v[3 * i + 1], m[i].grad_norm = v[3 * i + 2];
  return m;
}

inline void expect_close(const std::vector<StepMetrics>& got, const std::vector<StepMetrics>& ref,
                  int64_t first_step, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size() - static_cast<size_t>(first_step - 1)) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    const StepMetrics& r = ref[static_cast<size_t>(first_step - 1) + i];
    EXPECT_EQ(got[i].step, r.step) << what;
    EXPECT_LE(std::fabs(got[i].loss - r.loss), 1e-5 * std::fabs(r.loss)) << what << " step " << r.step;
    EXPECT_LE(std::fabs(got[i].grad_norm - r.grad_norm), 1e-5 * std::fabs(r.grad_norm))
        << what << " step " << r.step;
  }
}

}  // namespace ievo::test
