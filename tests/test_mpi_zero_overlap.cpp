// ZeroConfig::overlap on the CPU (MPI; run under mpirun -np 2 and 4). The MPI collectives finish
// at issue, so this checks the bookkeeping of the overlapped path, not concurrency (that is
// tests/test_gpu_zero_overlap.cpp): bucket reductions issued by the backward hooks and completed
// one hook layer later, stages 0-1 reducing during the last declared micro-batch, ZeRO-3
// prefetching the next hook layer's weights, stages 1-2 waiting for each bucket's post-step
// weight gather in the next forward's first hook that reads it. For stages 0-3, two steps of two micro-batches with
// some parameters deferred (and a pre_reduce that scales them): the weights and gradient norms
// with overlap equal those without exactly (the same sums in the same order), the hooks issued
// every non-deferred reduction, every ZeRO-3 prefetch was used, nothing leaked; declaring fewer
// micro-batches than are run is an error naming the bucket.
#include <gtest/gtest.h>
#include <mpi.h>

#include "models/batch.h"
#include "models/hf_adapter.h"
#include "models/hf_config.h"
#include "models/llama.h"
#include "parallel/communicator.h"
#include "parallel/topology.h"
#include "parallel/zero.h"
#include "runtime/allocator.h"
#include "runtime/ops/elementwise.h"
#include "util.h"

using namespace ievo;

namespace {

constexpr int kSteps = 2, kMicro = 2, kB = 2, kT = 16;

Batch micro_batch(const ModelConfig& mc, int step, int micro) {
  std::vector<int32_t> rows(kB * (kT + 1));
  for (size_t i = 0; i < rows.size(); ++i)
    rows[i] = static_cast<int32_t>((i * 5 + 11 * world_rank() + 17 * step + 3 * micro) % mc.vocab_size);
  return make_batch(rows, kB, kT);
}

struct Trained {
  ParamStore weights;
  std::vector<double> norms;
  ZeroOverlapStats stats;
  int non_deferred_buckets = 0, buckets = 0;
};

Trained train(const std::string& variant, int stage, ZeroConfig::Overlap overlap, int declared) {
  const std::string hf = test::fixture_dir(variant) + "/hf";
  const ModelConfig mc = read_hf_model_config(hf);
  const auto specs = param_specs(mc);
  ParamStore init(specs, DType::F32, Device::CPU);
  load_hf_weights(hf, mc, init);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Llama model(mc);
  ZeroConfig zc{stage, 0.004};
  zc.overlap = overlap;
  zc.deferred.assign(specs.size(), false);
  for (size_t i = 0; i < specs.size(); i += 4) zc.deferred[i] = true;
  const std::vector<bool> deferred = zc.deferred;
  zc.pre_reduce = [deferred](ParamStore& g) {
    for (size_t i = 0; i < g.size(); ++i)
      if (deferred[i]) ops::scale(g[i], 0.75);
  };
  AdamWConfig oc;
  oc.weight_decay = 0.1;
  Trained r;
  {
    const int64_t live0 = memory_stats(Device::CPU).live_bytes;
    ZeroOptimizer z(specs, model.hook_layers(), DType::F32, Device::CPU, *comm, zc, oc);
    const int64_t states = memory_stats(Device::CPU).live_bytes - live0;
    EXPECT_EQ(z.overlap(), overlap == ZeroConfig::Overlap::On);
    z.set_weights(init);
    model.set_hooks(&z);
    for (int step = 0; step < kSteps; ++step) {
      z.begin_step(declared);
      for (int j = 0; j < kMicro; ++j)
        model.forward_backward(z.weights(), micro_batch(mc, step, j), 1.0 / (kMicro * kB * kT), z.grads());
      r.norms.push_back(z.finish_gradients());
      z.step(2e-3, 1.0);
      EXPECT_EQ(memory_stats(Device::CPU).live_bytes - live0, states) << "step " << step + 1 << ": buffers left";
    }
    model.set_hooks(nullptr);
    r.weights = ParamStore(specs, DType::F32, Device::CPU);
    z.gather_state(&r.weights, nullptr, nullptr, 0);
    r.stats = z.overlap_stats();
    for (const ZeroBucket& B : z.layout().buckets) r.non_deferred_buckets += !B.deferred;
    r.buckets = static_cast<int>(z.layout().buckets.size());
  }
  return r;
}

}  // namespace

class ZeroOverlap : public ::testing::TestWithParam<std::tuple<const char*, int>> {};

TEST_P(ZeroOverlap, EqualsNoOverlapExactly) {
  const auto [variant, stage] = GetParam();
  SCOPED_TRACE(std::string(variant) + " ZeRO-" + std::to_string(stage));
  const Trained off = train(variant, stage, ZeroConfig::Overlap::Off, 0);
  for (int declared : {kMicro, 0}) {
    SCOPED_TRACE("begin_step(" + std::to_string(declared) + ")");
    const Trained on = train(variant, stage, ZeroConfig::Overlap::On, declared);
    for (int s = 0; s < kSteps; ++s) EXPECT_EQ(on.norms[s], off.norms[s]) << "step " << s + 1;
    if (world_rank() == 0) {
      for (size_t i = 0; i < on.weights.size(); ++i)
        EXPECT_EQ(test::max_abs_diff(on.weights[i], off.weights[i]), 0.0) << on.weights.spec(i).name;
    }
    // Reductions issued by the hooks: stages 2-3 every micro-batch's non-deferred bucket (with
    // or without overlap); stages 0-1 each non-deferred bucket once per step, only when the
    // micro-batches were declared.
    const int64_t per_step = stage >= 2 ? kMicro * on.non_deferred_buckets
                             : declared > 0 ? on.non_deferred_buckets
                                            : 0;
    EXPECT_EQ(on.stats.hook_reductions, kSteps * per_step);
    EXPECT_EQ(off.stats.hook_reductions, stage >= 2 ? kSteps * per_step : 0);
    if (stage == 3) {  // forward 1..L+1 and backward L..0 find their weights prefetched
      EXPECT_GT(on.stats.prefetches, 0);
      EXPECT_GE(on.stats.prefetch_hits, on.stats.prefetches);
      EXPECT_EQ(on.stats.prefetch_misses, 0);
    } else {
      EXPECT_EQ(on.stats.prefetches, 0);
    }
    EXPECT_EQ(off.stats.prefetches, 0);
    // Stages 1-2: every bucket's post-step weight gather was waited for by the next step's first
    // hook layer reading it (the last step's by gather_state).
    EXPECT_EQ(on.stats.weight_gathers_waited, stage == 1 || stage == 2 ? (kSteps - 1) * on.buckets : 0);
    EXPECT_EQ(off.stats.weight_gathers_waited, 0);
    if (world_rank() == 0)
      std::printf("  %s ZeRO-%d begin_step(%d), dp %d: hook reductions %lld, prefetches %lld (hits %lld, "
                  "misses %lld), weights and norms identical\n",
                  variant, stage, declared, world_size(), static_cast<long long>(on.stats.hook_reductions),
                  static_cast<long long>(on.stats.prefetches), static_cast<long long>(on.stats.prefetch_hits),
                  static_cast<long long>(on.stats.prefetch_misses));
  }
}

INSTANTIATE_TEST_SUITE_P(Stages, ZeroOverlap,
                         ::testing::Combine(::testing::Values("llama_gqa", "llama_tied"),
                                            ::testing::Values(0, 1, 2, 3)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) + "_zero" +
                                  std::to_string(std::get<1>(info.param));
                         });

// Stages 0-1 reduce during the last declared micro-batch: a further backward would add to a
// reduced gradient, so it is refused.
TEST(ZeroOverlapErrors, MoreMicroBatchesThanDeclared) {
  const std::string hf = test::fixture_dir("llama_gqa") + "/hf";
  const ModelConfig mc = read_hf_model_config(hf);
  ParamStore init(param_specs(mc), DType::F32, Device::CPU);
  load_hf_weights(hf, mc, init);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Llama model(mc);
  for (int stage : {0, 1}) {
    ZeroConfig zc{stage, 0.004};
    zc.overlap = ZeroConfig::Overlap::On;
    ZeroOptimizer z(param_specs(mc), model.hook_layers(), DType::F32, Device::CPU, *comm, zc, AdamWConfig{});
    z.set_weights(init);
    model.set_hooks(&z);
    z.begin_step(1);
    model.forward_backward(z.weights(), micro_batch(mc, 0, 0), 1e-2, z.grads());
    try {
      model.forward_backward(z.weights(), micro_batch(mc, 0, 1), 1e-2, z.grads());
      ADD_FAILURE() << "ZeRO-" << stage << ": no error for a second micro-batch after begin_step(1)";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("more micro-batches than begin_step(1) declared"), std::string::npos)
          << e.what();
    }
    model.set_hooks(nullptr);
  }
}

#include "mpi_main.h"
