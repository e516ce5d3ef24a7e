// ZeroConfig::deferred / pre_reduce / norm_weight (parallel/zero.h), run under mpirun -np 2 and 4.
//
// Every rank trains an HF fixture model for two steps of two micro-batches (its own tokens) with
// ZeRO stage 0-3 over the world, some parameters deferred (every third, so deferred and ordinary
// buckets alternate) and a pre_reduce that changes the deferred gradients: g <- 0.5 g + K (K a
// known tensor per parameter, the same on every rank). The reference is computed without ZeRO:
// each rank's whole local gradient, the same change, MPI_Allreduce, then AdamW on whole stores.
// Checked: inside pre_reduce the deferred gradients are bound and equal the rank's local
// gradient (1e-6 relative L2); the returned squared norm equals sum_i w_i |G_i|^2 of the reduced
// gradient G with the configured norm_weight (1e-6 relative); after each step every weight
// (gathered) equals the reference within 1e-6 relative L2, while the change of the gradient moves
// the deferred weights by far more than that (so the test sees it). Also the layout: no bucket
// mixes deferred and other parameters, and at stages 2-3 the gradient bytes count the whole
// deferred buckets.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>

#include "models/batch.h"
#include "models/hf_adapter.h"
#include "models/hf_config.h"
#include "models/llama.h"
#include "optim/adamw.h"
#include "parallel/communicator.h"
#include "parallel/topology.h"
#include "parallel/zero.h"
#include "runtime/ops/elementwise.h"
#include "util.h"

using namespace ievo;

namespace {

constexpr int kSteps = 2, kMicro = 2, kB = 2, kT = 16;
constexpr double kLr = 3e-3, kGradScale = 1.0 / (kMicro * kB * kT);

Batch micro_batch(const ModelConfig& mc, int step, int micro) {
  std::vector<int32_t> rows(kB * (kT + 1));
  for (size_t i = 0; i < rows.size(); ++i)
    rows[i] = static_cast<int32_t>((i * 7 + 13 * world_rank() + 31 * step + 5 * micro) % mc.vocab_size);
  return make_batch(rows, kB, kT);
}

// The known tensor pre_reduce adds to deferred parameter i (same on every rank).
Tensor known(const ParamSpec& s, size_t i) {
  return test::random_tensor(s.shape, DType::F32, 1000 + i, -1e-3, 1e-3);
}

void modify(ParamStore& g, const std::vector<bool>& deferred) {
  for (size_t i = 0; i < g.size(); ++i)
    if (deferred[i]) {
      ops::scale(g[i], 0.5);
      ops::axpy(1.0, known(g.spec(i), i), g[i]);
    }
}

void all_reduce(ParamStore& s) {
  MPI_Allreduce(MPI_IN_PLACE, s.flat().data<float>(), static_cast<int>(s.flat().numel()), MPI_FLOAT, MPI_SUM,
                MPI_COMM_WORLD);
}

double weighted_sum_squares(const ParamStore& g, const std::vector<double>& w) {
  double sum = 0;
  for (size_t i = 0; i < g.size(); ++i) sum += (w.empty() ? 1.0 : w[i]) * ops::sum_squares(g[i]);
  return sum;
}

struct Fixture {
  ModelConfig mc;
  std::vector<ParamSpec> specs;
  ParamStore init;
  explicit Fixture(const std::string& variant) {
    const std::string hf = test::fixture_dir(variant) + "/hf";
    mc = read_hf_model_config(hf);
    specs = param_specs(mc);
    init = ParamStore(specs, DType::F32, Device::CPU);
    load_hf_weights(hf, mc, init);
  }
};

// Whole-store reference: weights after each step, the local (pre-change) gradient of each step,
// and the squared norms of the reduced gradient (weighted, unweighted).
struct Reference {
  std::vector<ParamStore> weights, local_grads;
  std::vector<double> norm2_weighted, norm2;
};

Reference reference(const Fixture& f, const std::vector<bool>& deferred, const std::vector<double>& w,
                    bool change) {
  Llama model(f.mc);
  ParamStore p(f.specs, DType::F32, Device::CPU), g(f.specs, DType::F32, Device::CPU);
  p.flat().copy_from(f.init.flat());
  AdamWConfig oc;
  oc.weight_decay = 0.1;
  AdamW opt(p, oc);
  Reference r;
  for (int step = 0; step < kSteps; ++step) {
    g.zero();
    for (int j = 0; j < kMicro; ++j) model.forward_backward(p, micro_batch(f.mc, step, j), kGradScale, g);
    ParamStore local(f.specs, DType::F32, Device::CPU);
    local.flat().copy_from(g.flat());
    r.local_grads.push_back(std::move(local));
    if (change) modify(g, deferred);
    all_reduce(g);
    r.norm2_weighted.push_back(weighted_sum_squares(g, w));
    r.norm2.push_back(weighted_sum_squares(g, {}));
    opt.step(p, g, kLr, 1.0);
    ParamStore snap(f.specs, DType::F32, Device::CPU);
    snap.flat().copy_from(p.flat());
    r.weights.push_back(std::move(snap));
  }
  return r;
}

}  // namespace

class ZeroDeferred : public ::testing::TestWithParam<std::tuple<const char*, int>> {};

TEST_P(ZeroDeferred, EqualsWholeStoreReference) {
  const auto [variant, stage] = GetParam();
  const Fixture f(variant);
  const size_t n = f.specs.size();
  std::vector<bool> deferred(n);
  std::vector<double> norm_weight(n);
  for (size_t i = 0; i < n; ++i) {
    deferred[i] = i % 3 == 0;
    norm_weight[i] = 0.25 * static_cast<double>(i % 4);  // 0, 1/4, 1/2, 3/4
  }
  const Reference ref = reference(f, deferred, norm_weight, true);
  const Reference plain = reference(f, deferred, norm_weight, false);

  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Llama model(f.mc);
  AdamWConfig oc;
  oc.weight_decay = 0.1;
  for (bool weighted : {true, false}) {
    SCOPED_TRACE(std::string(variant) + " ZeRO-" + std::to_string(stage) + (weighted ? " weighted" : ""));
    ZeroConfig zc{stage, 0.004};  // small buckets: several per layer
    zc.deferred = deferred;
    if (weighted) zc.norm_weight = norm_weight;
    int step = 0, calls = 0;
    double worst_local = 0;
    zc.pre_reduce = [&](ParamStore& g) {
      ++calls;
      for (size_t i = 0; i < n; ++i) {
        if (!deferred[i]) continue;
        ASSERT_TRUE(g[i].defined()) << "deferred " << g.spec(i).name << " not bound in pre_reduce";
        const double e = test::rel_l2(g[i], ref.local_grads[step][i]);
        worst_local = std::max(worst_local, e);
        EXPECT_LT(e, 1e-6) << "local gradient of " << g.spec(i).name << ", step " << step + 1;
      }
      modify(g, deferred);
    };
    ZeroOptimizer z(f.specs, model.hook_layers(), DType::F32, Device::CPU, *comm, zc, oc);
    z.set_weights(f.init);
    model.set_hooks(&z);

    // Layout: deferred buckets hold only deferred parameters (every stage); gradient bytes.
    const ZeroLayout& L = z.layout();
    int deferred_buckets = 0;
    for (const ZeroBucket& B : L.buckets) {
      for (size_t i : B.tensors) EXPECT_EQ(deferred[i], B.deferred) << f.specs[i].name;
      deferred_buckets += B.deferred;
    }
    EXPECT_GT(deferred_buckets, 0);
    ZeroConfig plain_zc{stage, 0.004}, big{stage, 25}, big_plain{stage, 25};
    big.deferred = deferred;
    const ZeroLayout L0 = make_zero_layout(f.specs, model.hook_layers(), plain_zc, world_size(), DType::F32);
    const ZeroLayout Lb = make_zero_layout(f.specs, model.hook_layers(), big, world_size(), DType::F32);
    const ZeroLayout Lb0 = make_zero_layout(f.specs, model.hook_layers(), big_plain, world_size(), DType::F32);
    EXPECT_GE(L.buckets.size(), L0.buckets.size());
    // Large buckets: split where deferral changes (every third tensor), never mixed.
    EXPECT_GT(Lb.buckets.size(), Lb0.buckets.size());
    EXPECT_GE(Lb.buckets.size(), f.specs.size() / 3 * 2);
    for (const ZeroBucket& B : Lb.buckets) {
      for (size_t i : B.tensors) EXPECT_EQ(deferred[i], B.deferred) << f.specs[i].name << " (25 MiB buckets)";
    }
    if (stage >= 2) {  // the deferred buckets' whole gradients on top of the shard
      EXPECT_EQ(z.memory().grads, (L.shard_numel + L.deferred_numel) * 4);
    } else {
      EXPECT_EQ(z.memory().grads, L.full_numel * 4);
    }
    EXPECT_EQ(zero_memory(L, stage, DType::F32).grads, z.memory().grads);

    double worst_w = 0, worst_norm = 0, least_change = 1e30;
    for (step = 0; step < kSteps; ++step) {
      z.begin_step();
      for (int j = 0; j < kMicro; ++j) model.forward_backward(z.weights(), micro_batch(f.mc, step, j), kGradScale, z.grads());
      const double norm2 = z.finish_gradients();
      const double want = weighted ? ref.norm2_weighted[step] : ref.norm2[step];
      EXPECT_NEAR(norm2, want, 1e-6 * want) << "step " << step + 1;
      worst_norm = std::max(worst_norm, std::fabs(norm2 - want) / want);
      z.step(kLr, 1.0);

      ParamStore got(f.specs, DType::F32, Device::CPU);
      z.gather_state(&got, nullptr, nullptr, 0);  // every rank passes a store; rank 0 fills it
      if (world_rank() != 0) continue;
      for (size_t i = 0; i < n; ++i) {
        const double e = test::rel_l2(got[i], ref.weights[step][i]);
        worst_w = std::max(worst_w, e);
        EXPECT_LT(e, 1e-6) << f.specs[i].name << ", step " << step + 1;
        if (deferred[i])
          least_change = std::min(least_change, test::rel_l2(plain.weights[step][i], ref.weights[step][i]));
      }
    }
    model.set_hooks(nullptr);
    EXPECT_EQ(calls, kSteps);
    EXPECT_GT(ref.norm2_weighted[0], 0);
    EXPECT_NE(ref.norm2_weighted[0], ref.norm2[0]);
    if (world_rank() == 0) {
      EXPECT_GT(least_change, 100 * std::max(worst_w, 1e-9)) << "the change of the gradients is not visible";
      std::printf("  %s ZeRO-%d%s dp %d: weights rel L2 %.1e, norm rel %.1e, local grads %.1e (change moves "
                  "deferred weights >= %.1e)\n",
                  variant, stage, weighted ? " weighted" : "", world_size(), worst_w, worst_norm, worst_local,
                  least_change);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Stages, ZeroDeferred,
                         ::testing::Combine(::testing::Values("llama_gqa", "llama_tied"),
                                            ::testing::Values(0, 1, 2, 3)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) + "_zero" +
                                  std::to_string(std::get<1>(info.param));
                         });

// A deferred parameter without its pre_reduce still trains like any other (the reduction of its
// whole gradient just happens later): ZeRO-3 with every parameter deferred equals ZeRO-0.
TEST(ZeroDeferredPlain, AllDeferredEqualsStageZero) {
  const Fixture f("llama_gqa");
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Llama model(f.mc);
  std::vector<ParamStore> out;
  for (int stage : {0, 3}) {
    ZeroConfig zc{stage, 0.004};
    if (stage == 3) zc.deferred.assign(f.specs.size(), true);
    ZeroOptimizer z(f.specs, model.hook_layers(), DType::F32, Device::CPU, *comm, zc, AdamWConfig{});
    z.set_weights(f.init);
    model.set_hooks(&z);
    for (int step = 0; step < kSteps; ++step) {
      z.begin_step();
      for (int j = 0; j < kMicro; ++j) model.forward_backward(z.weights(), micro_batch(f.mc, step, j), kGradScale, z.grads());
      z.finish_gradients();
      z.step(kLr, 1.0);
    }
    model.set_hooks(nullptr);
    out.emplace_back(f.specs, DType::F32, Device::CPU);
    z.gather_state(&out.back(), nullptr, nullptr, 0);
    if (stage == 3) {
      EXPECT_EQ(z.memory().peak_grad_buckets, 0) << "deferred buckets are not hook buckets";
      EXPECT_EQ(z.memory().grads, (z.layout().shard_numel + z.layout().full_numel) * 4);
    }
  }
  if (world_rank() == 0) {
    for (size_t i = 0; i < f.specs.size(); ++i) EXPECT_LT(test::rel_l2(out[1][i], out[0][i]), 1e-6) << f.specs[i].name;
  }
}

#include "mpi_main.h"
