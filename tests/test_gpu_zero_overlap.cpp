// ZeRO's communication overlap on the GPU (ZeroConfig::overlap; NCCL in a world of one, as in
// tests/test_gpu_nccl.cpp). Label gpu; skipped without a GPU or in CPU-only builds.
//   - the async collectives (all_reduce_async, reduce_scatter_async, all_gather_async) give the
//     synchronous results once waited for, in place and not, with many works in flight;
//   - ZeroOptimizer stages 0-3, f32 and bf16, two micro-batches per step (begin_step(2)), some
//     parameters deferred with a pre_reduce: with overlap (bucket reductions on NCCL's stream
//     after an event, waited for one hook layer later; ZeRO-3 gathers prefetched one layer ahead)
//     the weights after three steps equal those without overlap within 1e-6 relative L2 (the
//     same kernels in the same order: any stream race shows up as a difference), and the f32 ones
//     the CPU run within 1e-5. Every ZeRO-3 prefetch is claimed; live memory is the same after
//     every step (no buffer of a collective outlives it).
#include <gtest/gtest.h>

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
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

using namespace ievo;

namespace {

std::unique_ptr<Communicator> nccl() {
#ifdef IEVO_CUDA
  return make_nccl_communicator(MPI_COMM_WORLD);
#else
  IEVO_FAIL("a CPU-only build has no NCCL");
#endif
}

class Gpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::gpu_available()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
#ifdef IEVO_CUDA
    cuda::set_deterministic(true);  // cuDNN attention backward: the same sums every run
#endif
  }
};

struct Trained {
  ParamStore weights;
  ZeroOverlapStats stats;
};

// Three steps of two micro-batches through the hooks; the gathered master weights.
Trained three_steps(const ModelConfig& mc, const ParamStore& init, Device dev, DType compute, int stage,
                    ZeroConfig::Overlap overlap, Communicator& comm) {
  const auto specs = param_specs(mc);
  Llama model(mc);
  ZeroConfig zc{stage, 0.01};
  zc.overlap = overlap;
  zc.deferred.assign(specs.size(), false);
  for (size_t i = 0; i < specs.size(); i += 4) zc.deferred[i] = true;
  const std::vector<bool> deferred = zc.deferred;
  zc.pre_reduce = [deferred](ParamStore& g) {
    for (size_t i = 0; i < g.size(); ++i)
      if (deferred[i]) ops::scale(g[i], 0.75);
  };
  Trained r;
  {
    ZeroOptimizer z(specs, model.hook_layers(), compute, dev, comm, zc, AdamWConfig{});
    int64_t after_first = 0;  // (library workspaces may stay allocated after the first step)
    z.set_weights(init);
    model.set_hooks(&z);
    for (int s = 0; s < 3; ++s) {
      z.begin_step(2);
      for (int j = 0; j < 2; ++j) {
        std::vector<int32_t> rows(2 * 33);
        for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int32_t>((i * 13 + 7 * j + s) % mc.vocab_size);
        Batch b = make_batch(rows, 2, 32);
        if (dev != Device::CPU) b = b.to(dev);
        model.forward_backward(z.weights(), b, 1.0 / 128, z.grads());
      }
      z.finish_gradients();
      z.step(1e-3, 1.0);
      const int64_t live = memory_stats(dev).live_bytes;
      if (s == 0) {
        after_first = live;
      } else {
        EXPECT_EQ(live, after_first) << "step " << s + 1 << ": buffers left";
      }
    }
    model.set_hooks(nullptr);
    r.weights = ParamStore(specs, DType::F32, Device::CPU);
    z.gather_state(&r.weights, nullptr, nullptr, 0);
    r.stats = z.overlap_stats();
    EXPECT_EQ(z.overlap(), overlap != ZeroConfig::Overlap::Off);  // Auto: on for CUDA
  }
  return r;
}

}  // namespace

TEST_F(Gpu, AsyncCollectivesEqualTheSynchronousOnes) {
  auto comm = nccl();
  ASSERT_EQ(comm->size(), 1);
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const Tensor host = test::random_tensor({4096}, DType::F32, 7).to(dt);
    Tensor a = host.to(Device::CUDA), out = Tensor::zeros({4096}, dt, Device::CUDA);
    Tensor g = Tensor::zeros({4096}, dt, Device::CUDA);
    std::vector<std::unique_ptr<CommWork>> works;
    works.push_back(comm->all_reduce_async(a));
    works.push_back(comm->reduce_scatter_async(a, out));
    works.push_back(comm->reduce_scatter_async(out, out));  // in place
    works.push_back(comm->all_gather_async(out, g));
    for (int k = 0; k < 64; ++k) works.push_back(comm->all_gather_async(g, g));  // many in flight
    works.back()->wait();  // one communicator's works complete in order
    EXPECT_EQ(test::max_abs_diff(g.to(Device::CPU), host), 0.0);
    works.clear();  // destroyed after the wait: their events go back to the pool
    Tensor c = host.to(Device::CUDA);
    auto w = comm->all_reduce_async(c);
    w->wait();
    w->wait();  // waiting twice is fine
    EXPECT_EQ(test::max_abs_diff(c.to(Device::CPU), host), 0.0);
  }
}

TEST_F(Gpu, OverlapEqualsNoOverlapAndTheCpu) {
  const std::string hf = test::fixture_dir("llama_gqa") + "/hf";
  const ModelConfig mc = read_hf_model_config(hf);
  ParamStore init(param_specs(mc), DType::F32, Device::CPU);
  load_hf_weights(hf, mc, init);
  auto local = make_local_communicator();
  auto comm = nccl();
  const Trained cpu = three_steps(mc, init, Device::CPU, DType::F32, 0, ZeroConfig::Overlap::Off, *local);
  for (int stage = 0; stage <= 3; ++stage) {
    for (DType dt : {DType::F32, DType::BF16}) {
      SCOPED_TRACE("ZeRO-" + std::to_string(stage) + " " + dtype_name(dt));
      const Trained off = three_steps(mc, init, Device::CUDA, dt, stage, ZeroConfig::Overlap::Off, *comm);
      const Trained on = three_steps(mc, init, Device::CUDA, dt, stage, ZeroConfig::Overlap::Auto, *comm);
      double worst = 0, worst_cpu = 0;
      for (size_t i = 0; i < on.weights.size(); ++i) {
        const double e = test::rel_l2(on.weights[i], off.weights[i]);
        worst = std::max(worst, e);
        EXPECT_LT(e, 1e-6) << on.weights.spec(i).name;
        const double ec = test::rel_l2(on.weights[i], cpu.weights[i]);
        worst_cpu = std::max(worst_cpu, ec);
        EXPECT_LT(ec, dt == DType::F32 ? 1e-5 : 2e-2) << "vs CPU " << on.weights.spec(i).name;
      }
      EXPECT_GT(on.stats.hook_reductions, 0);
      if (stage == 3) {
        EXPECT_GT(on.stats.prefetches, 0);
        EXPECT_EQ(on.stats.prefetch_misses, 0);
      }
      std::printf("  ZeRO-%d %s: overlap vs none rel L2 %.1e, vs CPU f32 %.1e; hook reductions %lld, "
                  "prefetches %lld\n",
                  stage, dtype_name(dt), worst, worst_cpu, static_cast<long long>(on.stats.hook_reductions),
                  static_cast<long long>(on.stats.prefetches));
    }
  }
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!test::gpu_available()) return RUN_ALL_TESTS();  // every test skips; no MPI needed
  MpiSession mpi(&argc, &argv, /*force=*/true);  // a singleton world when not under mpirun
  return RUN_ALL_TESTS();
}
