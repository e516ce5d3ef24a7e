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

#include <cstdio>
#include <cstring>

#include "models/batch.h"
#include "models/hf_adapter.h"
#include "models/hf_config.h"
#include "models/llama.h"
#include "parallel/communicator.h"
#include "parallel/topology.h"
#include "parallel/zero.h"
#include "runtime/allocator.h"
#include "runtime/ops/elementwise.h"
#include "gpu_nccl_util.h"
#include "util.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

using namespace ievo;

namespace {

class Gpu : public test::GpuTest {
 protected:
  void SetUp() override {
    test::GpuTest::SetUp();
    if (IsSkipped()) return;
#ifdef IEVO_CUDA
    cuda::set_deterministic(true);  // cuDNN attention backward: the same sums every run
#endif
  }
};

struct Trained {
  ParamStore weights;
  ZeroOverlapStats stats;
  ZeroMemory memory;
  int64_t shard_numel = 0;
  ParamStore compute_weights;  // stages 0-2: the weights the model read (f32 copies; stage 3: empty)
  ParamStore reloaded;         // the gathered master after load_state into a new optimiser
};

// Three steps of two micro-batches through the hooks; the gathered master weights.
Trained three_steps(const ModelConfig& mc, const ParamStore& init, Device dev, DType compute, int stage,
                    ZeroConfig::Overlap overlap, Communicator& comm, bool remainders = false) {
  const auto specs = param_specs(mc);
  Llama model(mc);
  ZeroConfig zc{stage, 0.01};
  zc.overlap = overlap;
  zc.param_remainders = remainders;
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
    r.memory = z.memory();
    r.shard_numel = z.layout().shard_numel;
    if (stage <= 2) {
      r.compute_weights = ParamStore(specs, DType::F32, Device::CPU);
      for (size_t i = 0; i < specs.size(); ++i) r.compute_weights[i].copy_from(z.weights()[i].to(Device::CPU).to(DType::F32));
    }
    EXPECT_EQ(z.overlap(), overlap != ZeroConfig::Overlap::Off);  // Auto: on for CUDA
  }
  {  // the gathered state loads back into a fresh optimiser unchanged
    ZeroOptimizer z(specs, model.hook_layers(), compute, dev, comm, zc, AdamWConfig{});
    z.load_state(r.weights, nullptr, nullptr, 3);
    r.reloaded = ParamStore(specs, DType::F32, Device::CPU);
    z.gather_state(&r.reloaded, nullptr, nullptr, 0);
  }
  return r;
}

}  // namespace

TEST_F(Gpu, AsyncCollectivesEqualTheSynchronousOnes) {
  auto comm = test::nccl_world();
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
  auto comm = test::nccl_world();
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

// The master kept as remainders of the bf16 weights (ZeroConfig::param_remainders) at every
// stage: 10 bytes of optimiser state a parameter instead of 12; the weights the model reads are
// the gathered master rounded to nearest; the state survives a gather and load bit for bit; and
// training matches the f32-master run (they differ only where a master value lies exactly
// between two bf16 values: the weight then rounds away from zero instead of to even).
TEST_F(Gpu, MasterRemaindersMatchAnF32Master) {
  const std::string hf = test::fixture_dir("llama_gqa") + "/hf";
  const ModelConfig mc = read_hf_model_config(hf);
  ParamStore init(param_specs(mc), DType::F32, Device::CPU);
  load_hf_weights(hf, mc, init);
  auto comm = test::nccl_world();
  for (int stage = 0; stage <= 3; ++stage) {
    SCOPED_TRACE("ZeRO-" + std::to_string(stage));
    const Trained f32 = three_steps(mc, init, Device::CUDA, DType::BF16, stage, ZeroConfig::Overlap::Auto, *comm);
    const Trained rem = three_steps(mc, init, Device::CUDA, DType::BF16, stage, ZeroConfig::Overlap::Auto, *comm, true);
    EXPECT_EQ(f32.memory.optimizer, 12 * f32.shard_numel);
    EXPECT_EQ(rem.memory.optimizer, 10 * rem.shard_numel);
    EXPECT_EQ(rem.memory.params, f32.memory.params);
    double worst = 0;
    int64_t weights_off = 0, reload_off = 0;
    for (size_t i = 0; i < rem.weights.size(); ++i) {
      const double e = test::rel_l2(rem.weights[i], f32.weights[i]);
      worst = std::max(worst, e);
      EXPECT_LT(e, 1e-3) << rem.weights.spec(i).name;
      const float* master = rem.weights[i].data<float>();
      const float* again = rem.reloaded[i].data<float>();
      for (int64_t k = 0; k < rem.weights[i].numel(); ++k) {
        reload_off += std::memcmp(master + k, again + k, 4) != 0;
        if (stage > 2) continue;
        uint16_t hi;
        int16_t r;
        f32_split_bf16(master[k], hi, r);
        weights_off += bf16_to_f32(hi) != rem.compute_weights[i].data<float>()[k];
      }
    }
    EXPECT_EQ(weights_off, 0) << "bf16 weights that are not the master's rounding";
    EXPECT_EQ(reload_off, 0) << "master values changed by gather + load";
    std::printf("  ZeRO-%d: remainders vs f32 master rel L2 %.1e; optimiser state %lld vs %lld bytes\n", stage,
                worst, static_cast<long long>(rem.memory.optimizer), static_cast<long long>(f32.memory.optimizer));
  }
}

int main(int argc, char** argv) { return test::gpu_mpi_main(argc, argv); }
