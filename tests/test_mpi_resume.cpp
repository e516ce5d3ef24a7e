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

TEST(MpiResume, SaveUnderDp2Zero2ResumeUnderOtherLayouts) {
  const std::string root = test::shared_dir("mpi_resume");
  const int n = world_size();
  const auto ref = test::train_on(1, test::small_config("test_mpi_resume", root + "/ref", 8, 0, "auto"));
  ASSERT_EQ(ref.size(), 8u);

  // Saved by dp=2 / ZeRO-2: the first 4 steps agree with dp=1 too.
  const auto saved = test::train_on(2, test::small_config("test_mpi_resume", root + "/dp2z2", 4, 2, "auto"));
  test::expect_close(saved, std::vector<StepMetrics>(ref.begin(), ref.begin() + 4), 1, "dp=2 zero=2, steps 1-4");
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
    const auto m = test::train_on(l.ranks, test::small_config("test_mpi_resume", dir, 8, l.zero, ckpt));
    test::expect_close(m, ref, 5, what);  // steps 5..8 only: the run continued from step 4
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
    const auto ref = test::train_on(1, test::small_config("test_mpi_resume", base + "_ref", 6, 0, "auto", {tie}));
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
      const auto saved = test::train_on(sv.ranks, test::small_config("test_mpi_resume", sdir, 3, sv.zero, "auto", sets));
      test::expect_close(saved, std::vector<StepMetrics>(ref.begin(), ref.begin() + 3), 1, "save " + sv.name);
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
        const auto m = test::train_on(rs.ranks, test::small_config("test_mpi_resume", sdir + "_resume_" + rs.name, 6, rs.zero, ckpt, rsets));
        test::expect_close(m, ref, 3, what);
      }
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

#include "mpi_main.h"
