// Sharded checkpoints (format version 3, launch/checkpoint_shards.h), under mpirun -np 2 and 4:
//   * saves under dp=2 / ZeRO-2, tp=2 (ZeRO-1) and pp=2 (np 4 also tp=2 x dp=2 / ZeRO-2 and dp=4
//     / ZeRO-3) leave one model-rank<R>.h5 per writing rank and no model.h5; no file holds the
//     whole model (each is smaller than 0.75 of the one-process model.h5; together 0.9-1.6 of it,
//     the pieces' attributes being the overhead); ZeRO-0 under dp=2: one file (dp rank 0's);
//   * CheckpointReader (and `ievo convert to-hf`) assembles from the pieces the same global tensors (params and both Adam
//     moments) as the uninterrupted one-process run's checkpoint, rel L2 <= 1e-6 per tensor;
//   * the dp=2 save resumes under dp=1 / ZeRO-0 and dp=N / ZeRO-3, every step within 1e-5;
//   * a flipped byte in, a deleted and a truncated model-rank00001.h5 are detected with the file
//     named, and auto-resume falls back to the previous checkpoint (steps within 1e-5);
//   * checkpoint.async (each rank writes its file in a background thread, finished collectively
//     at a later step) saves the same tensors;
//   * a save that fails on rank 1 only (IEVO_TEST_FAIL_SAVE), sync or async, fails every rank,
//     removes step_<N>.tmp and leaves the previous checkpoint and `latest` untouched.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "launch/checkpoint.h"
#include "launch/checkpoint_shards.h"
#include "launch/config.h"
#include "launch/convert.h"
#include "launch/trainer.h"
#include "models/hf_adapter.h"
#include "models/model_config.h"
#include "mpi_util.h"
#include "util.h"

using namespace ievo;
namespace fs = std::filesystem;

namespace {


// Every tensor of every group of `got` against `ref` (rank 0 only); returns the largest rel L2.
double compare_checkpoints(const std::string& got, const std::string& ref, const std::string& what) {
  CheckpointReader g(got), r(ref);
  EXPECT_EQ(g.format_version(), 3) << what;
  EXPECT_EQ(g.state().step, r.state().step) << what;
  EXPECT_EQ(g.state().consumed_samples, r.state().consumed_samples) << what;
  EXPECT_EQ(g.tensor_names("params").size(), r.tensor_names("params").size()) << what;
  double worst = 0;
  for (const char* grp : {"params", "exp_avg", "exp_avg_sq"})
    for (const std::string& name : r.tensor_names(grp)) {
      const Tensor a = g.read(grp, name), b = r.read(grp, name);
      EXPECT_EQ(a.shape(), b.shape()) << what << " " << grp << "/" << name;
      if (a.shape() != b.shape()) continue;
      const double e = test::rel_l2(a, b);
      EXPECT_LE(e, 1e-6) << what << " " << grp << "/" << name;
      worst = std::max(worst, e);
    }
  return worst;
}

// The shard files: count == writers, none larger than 0.75 of the whole model.h5 (several
// writers), together between 0.9 and 1.6 of it.
void expect_shard_files(const std::string& ckpt, int writers, const std::string& ref_h5,
                        const std::string& what) {
  EXPECT_FALSE(fs::exists(ckpt + "/model.h5")) << what;
  const double whole = static_cast<double>(fs::file_size(ref_h5));
  double sum = 0;
  int files = 0;
  for (auto& e : fs::directory_iterator(ckpt)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("model-rank", 0) != 0) continue;
    ++files;
    const double sz = static_cast<double>(fs::file_size(e.path()));
    sum += sz;
    if (writers > 1) {
      EXPECT_LT(sz, 0.75 * whole) << what << " " << n << " holds most of the model";
    }
    std::printf("  %s: %s %.0f bytes (%.2f of the one-process model.h5)\n", what.c_str(), n.c_str(),
                sz, sz / whole);
  }
  EXPECT_EQ(files, writers) << what;
  EXPECT_GT(sum, 0.9 * whole) << what;
  EXPECT_LT(sum, 1.6 * whole) << what;  // each piece's dataset has its own attributes
  for (int r = 0; r < writers; ++r) EXPECT_TRUE(fs::exists(ckpt + "/" + shard_file_name(r))) << what;
}

bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

// CheckpointReader opening and reading everything: the error, or "".
std::string load_error(const std::string& ckpt) {
  try {
    CheckpointReader r(ckpt);
    for (const std::string& g : r.groups())
      for (const std::string& n : r.tensor_names(g)) r.read(g, n);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(MpiCheckpointShards, EveryRankWritesItsPieces) {
  const std::string root = test::shared_dir("mpi_ckpt_shards");
  const int n = world_size();
  const auto ref = test::train_on(1, test::small_config("test_mpi_checkpoint_shards", root + "/ref", 6, 0, "auto"));
  ASSERT_EQ(ref.size(), 6u);
  const std::string ref_h5 = root + "/ref/checkpoints/step_2/model.h5";

  struct Layout {
    int ranks, zero, writers;
    std::vector<std::string> sets;
    std::string name;
  };
  std::vector<Layout> saves = {{2, 2, 2, {}, "dp2_z2"},
                               {2, 1, 2, {"parallel.tensor=2"}, "tp2_z1"},
                               {2, 0, 2, {"parallel.pipeline=2"}, "pp2"},
                               {2, 0, 1, {}, "dp2_z0"},  // ZeRO-0: only dp rank 0 writes
                               {2, 2, 2, {"checkpoint.async=true"}, "dp2_z2_async"}};
  if (n == 4) {
    saves.push_back({4, 2, 4, {"parallel.tensor=2"}, "tp2_dp2_z2"});
    saves.push_back({4, 3, 4, {}, "dp4_z3"});
    saves.push_back({4, 1, 4, {"parallel.tensor=2", "parallel.pipeline=2"}, "tp2_pp2_z1"});
  }
  for (const Layout& l : saves) {
    const std::string dir = root + "/" + l.name;
    const auto m = test::train_on(l.ranks, test::small_config("test_mpi_checkpoint_shards", dir, 2, l.zero, "auto", l.sets));
    test::expect_close(m, std::vector<StepMetrics>(ref.begin(), ref.begin() + 2), 1, l.name);
    if (world_rank() == 0) {
      expect_shard_files(dir + "/checkpoints/step_2", l.writers, ref_h5, l.name);
      const double worst = compare_checkpoints(dir + "/checkpoints/step_2",
                                               root + "/ref/checkpoints/step_2", l.name);
      std::printf("  %s: largest rel L2 vs one process over every tensor: %.3g\n", l.name.c_str(), worst);
      // ievo convert to-hf of the sharded checkpoint: the one-process weights.
      convert_to_hf(dir + "/checkpoints/step_2", dir + "/hf", DType::F32, std::nullopt);
      const ModelConfig mc = read_checkpoint_model_config(dir + "/checkpoints/step_2");
      ParamStore hf(param_specs(mc), DType::F32, Device::CPU), want(param_specs(mc), DType::F32, Device::CPU);
      load_hf_weights(dir + "/hf", mc, hf);
      CheckpointReader(root + "/ref/checkpoints/step_2").read_into("params", want);
      for (size_t i = 0; i < hf.size(); ++i)
        EXPECT_LE(test::rel_l2(hf[i], want[i]), 1e-6) << l.name << " to-hf " << hf.spec(i).name;
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(MpiCheckpointShards, ResumeCorruptionAndFailedSaves) {
  const std::string root = test::shared_dir("mpi_ckpt_shards_fail");
  const int n = world_size();
  const auto ref = test::train_on(1, test::small_config("test_mpi_checkpoint_shards", root + "/ref", 6, 0, "auto"));
  ASSERT_EQ(ref.size(), 6u);
  const std::string saved = root + "/dp2z2";
  test::train_on(2, test::small_config("test_mpi_checkpoint_shards", saved, 4, 2, "auto"));
  if (world_rank() == 0)
    compare_checkpoints(saved + "/checkpoints/step_4", root + "/ref/checkpoints/step_4", "dp2_z2 step 4");

  // Resume the sharded checkpoint under other layouts.
  for (auto [ranks, zero] : {std::pair{1, 0}, std::pair{n, 3}}) {
    const std::string what = "resume dp=" + std::to_string(ranks) + " zero=" + std::to_string(zero);
    const auto m = test::train_on(ranks, test::small_config("test_mpi_checkpoint_shards", root + "/resume_" + std::to_string(ranks), 6, zero,
                                          saved + "/checkpoints/step_4"));
    test::expect_close(m, ref, 5, what);
  }

  // Damaged shard files of step_4: detected naming the file; auto-resume takes step_2.
  struct Damage {
    std::string name;
    void (*apply)(const std::string& file);
    std::string expect;  // in the error
  };
  const std::vector<Damage> damages = {
      {"flipped byte",
       [](const std::string& f) {
         std::fstream s(f, std::ios::in | std::ios::out | std::ios::binary);
         const auto at = static_cast<std::streamoff>(fs::file_size(f) / 2);
         s.seekg(at);
         char c = 0;
         s.read(&c, 1);
         c = static_cast<char>(c ^ 0x5a);
         s.seekp(at);
         s.write(&c, 1);
       },
       "model-rank00001.h5"},
      {"deleted", [](const std::string& f) { fs::remove(f); }, "missing shard file"},
      {"truncated", [](const std::string& f) { fs::resize_file(f, fs::file_size(f) / 2); },
       "model-rank00001.h5"}};
  for (const Damage& d : damages) {
    const std::string run = root + "/damaged_" + std::to_string(&d - damages.data());
    if (world_rank() == 0) {
      fs::copy(saved, run, fs::copy_options::recursive);
      const std::string file = run + "/checkpoints/step_4/" + shard_file_name(1);
      d.apply(file);
      const std::string err = load_error(run + "/checkpoints/step_4");
      EXPECT_TRUE(has(err, d.expect) && has(err, "model-rank00001.h5")) << d.name << ": " << err;
      std::printf("  %s: %s\n", d.name.c_str(), err.c_str());
      EXPECT_EQ(load_error(run + "/checkpoints/step_2"), "") << d.name;
    }
    MPI_Barrier(MPI_COMM_WORLD);
    const auto m = test::train_on(2, test::small_config("test_mpi_checkpoint_shards", run, 6, 2, "auto"));  // falls back to step_2
    test::expect_close(m, ref, 3, d.name + ": auto-resume from step_2");
  }

  // A save failing on rank 1 only (a simulated full disk half-way through its file), written
  // synchronously and in the background (checkpoint.async: reported when the run waits for it).
  for (const bool async : {false, true}) {
    const std::string failing = root + (async ? "/failing_async" : "/failing");
    if (world_rank() == 1) setenv("IEVO_TEST_FAIL_SAVE", "4", 1);
    std::string error;
    test::train_on(2, test::small_config("test_mpi_checkpoint_shards", failing, 4, 2, "auto", {std::string("checkpoint.async=") + (async ? "true" : "false")}),
             &error);
    if (world_rank() == 1) unsetenv("IEVO_TEST_FAIL_SAVE");
    EXPECT_FALSE(error.empty()) << "the save of step 4 failed on rank 1 but the run succeeded";
    if (world_rank() == 0) {
      std::printf("  failed save (async %d), rank 0's error: %s\n", async, error.c_str());
      EXPECT_TRUE(has(error, "failed on 1 other rank")) << error;
      EXPECT_EQ(has(error, "checkpoint.async"), async) << error;
      EXPECT_FALSE(fs::exists(failing + "/checkpoints/step_4.tmp"));
      EXPECT_FALSE(fs::exists(failing + "/checkpoints/step_4"));
      EXPECT_EQ(test::read_file(failing + "/checkpoints/latest"), "step_2\n");
      EXPECT_EQ(load_error(failing + "/checkpoints/step_2"), "");
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

#include "mpi_main.h"
