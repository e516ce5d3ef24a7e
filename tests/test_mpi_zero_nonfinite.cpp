// Naming the non-finite gradient when gradients are sharded (run under mpirun -np 2 and 4):
// ZeroOptimizer::first_nonfinite_gradient (every rank scans its own pieces, the ranks agree on the
// lowest parameter index) and poison_gradient (the debug.nan_at_step hook on shards).
//   - For ZeRO stages 0-3, with and without overlap, some parameters deferred: after poisoning
//     one gradient (a 1-D norm weight, a matrix spread over several ranks' pieces, a deferred
//     one) the squared norm is NaN on every rank and every rank names that parameter;
//     two poisoned: the lower index; none: -1 and a finite norm.
//   - The trainer with parallel.zero 1-3 over the world and debug.nan_at_step: the poisoned steps
//     are skipped on every rank, and train.max_skips_in_a_row aborts with the step and the
//     poisoned tensor named (before this, ZeRO-2/3 runs refused debug.nan_at_step).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>

#include "launch/config.h"
#include "launch/trainer.h"
#include "models/batch.h"
#include "models/hf_adapter.h"
#include "models/hf_config.h"
#include "models/llama.h"
#include "parallel/communicator.h"
#include "parallel/topology.h"
#include "parallel/zero.h"
#include "runtime/error.h"
#include "mpi_util.h"
#include "util.h"

using namespace ievo;

namespace {

const char* kPoisoned = "model.layers.1.mlp.down_proj.weight";

// Every rank's value equals rank 0's.
bool same_on_every_rank(int64_t v) {
  int64_t lo = v, hi = v;
  MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
  return lo == hi;
}

}  // namespace

class ZeroNonfinite : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(ZeroNonfinite, EveryRankNamesTheLowestPoisonedParameter) {
  const auto [stage, overlap] = GetParam();
  const std::string hf = test::fixture_dir("llama_gqa") + "/hf";
  const ModelConfig mc = read_hf_model_config(hf);
  const auto specs = param_specs(mc);
  ParamStore init(specs, DType::F32, Device::CPU);
  load_hf_weights(hf, mc, init);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Llama model(mc);
  ZeroConfig zc{stage, 0.004};
  zc.overlap = overlap ? ZeroConfig::Overlap::On : ZeroConfig::Overlap::Off;
  auto index_of = [&](const std::string& name) {
    for (size_t i = 0; i < specs.size(); ++i)
      if (specs[i].name == name) return i;
    ADD_FAILURE() << "no parameter " << name;
    return size_t{0};
  };
  const size_t matrix = index_of(kPoisoned);
  const size_t norm = index_of("model.layers.1.post_attention_layernorm.weight");
  const size_t deferred = index_of("model.layers.0.self_attn.o_proj.weight");
  zc.deferred.assign(specs.size(), false);
  zc.deferred[deferred] = true;
  ZeroOptimizer z(specs, model.hook_layers(), DType::F32, Device::CPU, *comm, zc, AdamWConfig{});
  z.set_weights(init);
  model.set_hooks(&z);
  std::vector<int32_t> rows(2 * 33);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int32_t>((i * 7 + 3 * world_rank()) % mc.vocab_size);
  const Batch batch = make_batch(rows, 2, 32);

  // Sharded: the matrix spans several ranks' pieces (the 64-element norm weight is in at most two).
  const ZeroLayout& L = z.layout();
  if (stage >= 1) {
    EXPECT_GT(shape_numel(specs[matrix].shape), L.buckets[L.bucket_of[matrix]].piece);
  }
  const std::vector<std::vector<size_t>> cases = {{}, {norm}, {matrix}, {deferred}, {matrix, norm}, {norm, deferred}};
  for (const auto& poisoned : cases) {
    std::string what = "poisoned:";
    for (size_t i : poisoned) what += " " + specs[i].name;
    SCOPED_TRACE("ZeRO-" + std::to_string(stage) + (overlap ? " overlap, " : ", ") + what);
    z.begin_step(1);
    model.forward_backward(z.weights(), batch, 1.0 / 64, z.grads());
    for (size_t i : poisoned) z.poison_gradient(i);
    const double norm2 = z.finish_gradients();
    const int64_t first = z.first_nonfinite_gradient();
    EXPECT_TRUE(same_on_every_rank(first));
    if (poisoned.empty()) {
      EXPECT_TRUE(std::isfinite(norm2));
      EXPECT_GT(norm2, 0);
      EXPECT_EQ(first, -1);
    } else {
      EXPECT_TRUE(std::isnan(norm2)) << norm2;
      const size_t want = *std::min_element(poisoned.begin(), poisoned.end());
      EXPECT_EQ(first, static_cast<int64_t>(want)) << "named " << (first >= 0 ? specs[first].name : "nothing");
    }
  }
  model.set_hooks(nullptr);
}

INSTANTIATE_TEST_SUITE_P(Stages, ZeroNonfinite, ::testing::Combine(::testing::Values(0, 1, 2, 3), ::testing::Bool()),
                         [](const auto& info) {
                           return "zero" + std::to_string(std::get<0>(info.param)) +
                                  (std::get<1>(info.param) ? "_overlap" : "");
                         });

TEST(ZeroNonfiniteTrainer, SkipsAndAbortsNamingTheShardedTensor) {
  const std::string fx = test::fixture_dir("llama_gqa");
  const std::string base = test::shared_dir("zero_nonfinite");
  for (int zero : {1, 2, 3}) {
    SCOPED_TRACE("ZeRO-" + std::to_string(zero) + ", dp " + std::to_string(world_size()));
    auto config = [&](const std::string& dir, std::vector<std::string> sets) {
      sets.insert(sets.begin(), {"model.init_from_hf=" + fx + "/hf", "data.paths=[" + fx + "/data]", "run.dir=" + dir,
                                 "train.log_every=1000", "parallel.zero=" + std::to_string(zero),
                                 "parallel.bucket_mb=0.004", "train.micro_batch_size=1"});
      return load_config(fx + "/train.yaml", sets);
    };
    // Steps 2 and 3 poisoned, 2 skips allowed in a row: skipped, then training goes on.
    const auto ms = run_train(config(base + "/skip_z" + std::to_string(zero),
                                     {"debug.nan_at_step=2", "debug.nan_steps=2", "train.max_skips_in_a_row=3",
                                      std::string("debug.nan_param=") + kPoisoned}),
                              MPI_COMM_WORLD);
    ASSERT_EQ(ms.size(), 6u);
    for (const StepMetrics& m : ms) {
      const bool poisoned = m.step == 2 || m.step == 3;
      EXPECT_EQ(m.skipped, poisoned) << "step " << m.step;
      EXPECT_EQ(std::isfinite(m.grad_norm), !poisoned) << "step " << m.step;
      EXPECT_TRUE(std::isfinite(m.loss)) << "step " << m.step;
    }
    EXPECT_EQ(ms.back().skipped_total, 2);
    // Poisoned from step 2 on, 2 in a row allowed: step 3 aborts on every rank, naming the tensor.
    try {
      run_train(config(base + "/abort_z" + std::to_string(zero),
                       {"debug.nan_at_step=2", "debug.nan_steps=100", "train.max_skips_in_a_row=2",
                        std::string("debug.nan_param=") + kPoisoned}),
                MPI_COMM_WORLD);
      ADD_FAILURE() << "no abort";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("step 3: 2 steps in a row skipped"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::string("first non-finite gradient: ") + kPoisoned), std::string::npos) << msg;
      if (world_rank() == 0 && zero == 3) std::printf("  ZeRO-3 dp %d: %s\n", world_size(), msg.c_str());
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
}

#include "mpi_main.h"
