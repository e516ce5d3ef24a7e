// Resharding on resume, under mpirun -np 2 and -np 4 (every rank runs every test). Checkpoints
// hold global tensors, so a run saved under one data-parallel layout resumes under any other:
//   save: dp=2, ZeRO-2 (ranks 0-1), 4 steps;
//   resume from its step_4 under dp=1 / ZeRO-0 (rank 0), dp=N / ZeRO-3 and dp=N / ZeRO-0
//   (N = the world size: 2 or 4), to step 8;
// every step's loss and grad norm within 1e-5 relative of an uninterrupted dp=1 run (the
// reductions are ordered differently across layouts, so not bit-identical), and the data
// position is exact (steps 5..8 read the same samples: a skipped or repeated batch would move
// the loss by far more than 1e-5).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <string>
#include <vector>

#include "launch/checkpoint.h"
#include "launch/config.h"
#include "launch/trainer.h"
#include "mpi_util.h"
#include "util.h"

using namespace ievo;

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

Config config(const std::string& run_dir, int64_t steps, int zero, const std::string& resume,
              std::vector<std::string> sets = {}) {
  const std::string yaml =
      "run: {seed: 11}\n"
      "model: {arch: llama, vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4,\n"
      "        num_kv_heads: 2, ffn_hidden_size: 64, max_position_embeddings: 64}\n"
      "data: {paths: [" + test::source_dir() + "/configs/data/tiny], seq_len: 32}\n"
      "train: {global_batch_size: 8, micro_batch_size: 2, log_every: 100}\n"
      "optim: {lr: 1.0e-3}\n"
      "schedule: {kind: constant, warmup_steps: 2}\n"  // the LR does not depend on train.steps
      "checkpoint: {every: 2}\n";
  sets.insert(sets.begin(), {"run.dir=" + run_dir, "train.steps=" + std::to_string(steps),
                             "parallel.zero=" + std::to_string(zero), "checkpoint.resume=" + resume});
  return load_config_string(yaml, "test_mpi_resume", sets);
}

// Trains on the first `ranks` ranks of the world (the others wait); every rank gets rank 0's
// metrics.
std::vector<StepMetrics> train_on(int ranks, const Config& cfg) {
  MPI_Comm sub = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() < ranks ? 0 : MPI_UNDEFINED, world_rank(), &sub);
  std::vector<StepMetrics> m;
  if (sub != MPI_COMM_NULL) {
    m = run_train(cfg, sub);
    MPI_Comm_free(&sub);
  }
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

void expect_close(const std::vector<StepMetrics>& got, const std::vector<StepMetrics>& ref,
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

}  // namespace

TEST(MpiResume, SaveUnderDp2Zero2ResumeUnderOtherLayouts) {
  const std::string root = test::shared_dir("mpi_resume");
  const int n = world_size();
  const auto ref = train_on(1, config(root + "/ref", 8, 0, "auto"));
  ASSERT_EQ(ref.size(), 8u);

  // Saved by dp=2 / ZeRO-2: the first 4 steps agree with dp=1 too.
  const auto saved = train_on(2, config(root + "/dp2z2", 4, 2, "auto"));
  expect_close(saved, std::vector<StepMetrics>(ref.begin(), ref.begin() + 4), 1, "dp=2 zero=2, steps 1-4");
  const std::string ckpt = root + "/dp2z2/checkpoints/step_4";
  if (world_rank() == 0) {
    CheckpointReader r(ckpt);
    EXPECT_EQ(r.state().step, 4);
    EXPECT_EQ(r.state().consumed_samples, 32);
    // Global tensors whatever the layout: the full embedding, not a shard.
    EXPECT_EQ(r.read("exp_avg", "model.embed_tokens.weight").shape(), (Shape{256, 32}));
  }

  struct Layout {
    int ranks, zero;
  };
  for (const Layout l : {Layout{1, 0}, Layout{n, 3}, Layout{n, 0}}) {
    const std::string what = "resume under dp=" + std::to_string(l.ranks) + " zero=" + std::to_string(l.zero);
    const std::string dir = root + "/resume_dp" + std::to_string(l.ranks) + "_z" + std::to_string(l.zero);
    const auto m = train_on(l.ranks, config(dir, 8, l.zero, ckpt));
    expect_close(m, ref, 5, what);  // steps 5..8 only: the run continued from step 4
    if (world_rank() == 0) {
      CheckpointReader r(dir + "/checkpoints/step_8");
      EXPECT_EQ(r.state().consumed_samples, 64) << what;
      CheckpointReader rr(root + "/ref/checkpoints/step_8");
      for (const char* g : {"params", "exp_avg", "exp_avg_sq"})
        EXPECT_LT(test::rel_l2(r.read(g, "model.layers.1.mlp.down_proj.weight"),
                               rr.read(g, "model.layers.1.mlp.down_proj.weight")),
                  1e-5)
            << what << " " << g;
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// Tensor and pipeline layouts (parallel.tensor / parallel.pipeline) save the same global tensors:
// saved under tp=2 (ZeRO-1) and under pp=2 (tied embeddings, 1F1B), resumed under dp=1, the
// other model-parallel layout, and the whole world as tp x pp (np 4: tp 2 x pp 2; np 2: dp 2 with
// ZeRO-3); every continued step within 1e-5 of the uninterrupted one-process run.
TEST(MpiResume, TensorAndPipelineLayoutsReshard) {
  const std::string root = test::shared_dir("mpi_resume_mp");
  const int n = world_size();
  for (const bool tied : {false, true}) {
    const std::string tie = std::string("model.tie_embeddings=") + (tied ? "true" : "false");
    const std::string base = root + (tied ? "/tied" : "/untied");
    const auto ref = train_on(1, config(base + "_ref", 6, 0, "auto", {tie}));
    ASSERT_EQ(ref.size(), 6u);
    struct Layout {
      int ranks, zero;
      std::vector<std::string> sets;
      std::string name;
    };
    const std::vector<Layout> saves = {{2, 1, {"parallel.tensor=2"}, "tp2_z1"},
                                       {2, 0, {"parallel.pipeline=2"}, "pp2"}};
    std::vector<Layout> resumes = {{1, 0, {}, "dp1"},
                                   {2, 0, {"parallel.pipeline=2", "parallel.schedule=gpipe"}, "pp2_gpipe"},
                                   {2, 2, {"parallel.tensor=2", "parallel.sequence=megatron"}, "tp2_sp_z2"}};
    if (n == 4)
      resumes.push_back({4, 1, {"parallel.tensor=2", "parallel.pipeline=2"}, "tp2_pp2_z1"});
    else
      resumes.push_back({2, 3, {}, "dp2_z3"});
    for (const Layout& sv : saves) {
      auto sets = sv.sets;
      sets.push_back(tie);
      const std::string sdir = base + "_save_" + sv.name;
      const auto saved = train_on(sv.ranks, config(sdir, 3, sv.zero, "auto", sets));
      expect_close(saved, std::vector<StepMetrics>(ref.begin(), ref.begin() + 3), 1, "save " + sv.name);
      const std::string ckpt = sdir + "/checkpoints/step_2";  // checkpoint.every 2
      if (world_rank() == 0) {
        CheckpointReader r(ckpt);
        EXPECT_EQ(r.read("params", "model.layers.0.self_attn.q_proj.weight").shape(), (Shape{32, 32}));
        EXPECT_EQ(r.read("exp_avg", "model.embed_tokens.weight").shape(), (Shape{256, 32}));
      }
      for (const Layout& rs : resumes) {
        auto rsets = rs.sets;
        rsets.push_back(tie);
        const std::string what = std::string(tied ? "tied" : "untied") + ": saved " + sv.name +
                                 ", resumed " + rs.name;
        const auto m = train_on(rs.ranks, config(sdir + "_resume_" + rs.name, 6, rs.zero, ckpt, rsets));
        expect_close(m, ref, 3, what);
      }
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

#include "mpi_main.h"
