// `ievo plan` and the pieces of data parallelism that need no MPI: the ZeRO memory formulas, the
// bucket layout, the batch split, the activation estimate against a measured step, the CLI.
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <set>

#include "launch/config.h"
#include "models/batch.h"
#include "models/llama.h"
#include "parallel/batch_split.h"
#include "parallel/plan.h"
#include "parallel/zero.h"
#include "runtime/allocator.h"
#include "util.h"

using namespace ievo;

namespace {

ModelConfig tinyllama() {  // TinyLlama-1.1B
  ModelConfig c;
  c.vocab_size = 32000;
  c.hidden_size = 2048;
  c.num_layers = 22;
  c.num_heads = 32;
  c.num_kv_heads = 4;
  c.ffn_hidden_size = 5632;
  c.max_position_embeddings = 2048;
  return c;
}

ModelConfig small() {  // odd sizes: padding between tensors and in buckets
  ModelConfig c;
  c.vocab_size = 101;
  c.hidden_size = 48;
  c.num_layers = 3;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 100;
  c.tie_embeddings = true;
  return c;
}

bool has(const std::string& s, const std::string& w) { return s.find(w) != std::string::npos; }

}  // namespace

// The ZeRO paper's table (Ψ = 7.5B, N = 64 in the paper's Figure 1: 120 GB, 31.4 GB, 16.6 GB,
// 1.9 GB) and the fp32 variants.
TEST(ZeroFormula, PaperNumbersAndFp32Variants) {
  const int64_t psi = 7'500'000'000;
  const double want_gb[4] = {120, 31.4, 16.6, 1.88};
  for (int s = 0; s < 4; ++s) {
    const ZeroMemory m = zero_formula(psi, 64, s, DType::BF16);
    EXPECT_NEAR(static_cast<double>(m.total()) / 1e9, want_gb[s], 0.05) << "stage " << s;
  }
  const double P = 1e9, N = 8;
  const double fp32[4] = {16 * P, 8 * P + 8 * P / N, 4 * P + 12 * P / N, 16 * P / N};
  const double mixed[4] = {16 * P, 4 * P + 12 * P / N, 2 * P + 14 * P / N, 16 * P / N};
  for (int s = 0; s < 4; ++s) {
    EXPECT_NEAR(static_cast<double>(zero_formula(1'000'000'000, 8, s, DType::F32).total()), fp32[s], 4) << s;
    EXPECT_NEAR(static_cast<double>(zero_formula(1'000'000'000, 8, s, DType::BF16).total()), mixed[s], 4) << s;
  }
  EXPECT_THROW(zero_formula(psi, 8, 4, DType::F32), Error);
}

// The layout: every tensor in exactly one bucket, buckets padded to N*64 and split evenly, stage 3
// never mixing hook layers; the exact bytes are the formula plus padding.
TEST(ZeroLayoutTest, BucketsCoverEveryTensorAndPadToShards) {
  for (const ModelConfig& mc : {small(), tinyllama()}) {
    Llama model(mc);
    const auto specs = param_specs(mc);
    const auto layers = model.hook_layers();
    for (int stage = 0; stage <= 3; ++stage)
      for (int dp : {1, 3, 8})
        for (double mb : {0.001, 25.0}) {
          SCOPED_TRACE("stage " + std::to_string(stage) + " dp " + std::to_string(dp) + " bucket " + std::to_string(mb));
          const ZeroLayout L = make_zero_layout(specs, layers, ZeroConfig{stage, mb}, dp, DType::BF16);
          EXPECT_EQ(L.shards, stage == 0 ? 1 : dp);
          EXPECT_EQ(L.numel, mc.num_params());
          std::set<size_t> seen;
          int64_t full = 0, shard = 0;
          for (size_t b = 0; b < L.buckets.size(); ++b) {
            const ZeroBucket& B = L.buckets[b];
            EXPECT_EQ(B.padded % (L.shards * ParamStore::kAlign), 0);
            EXPECT_GE(B.padded, B.hi - B.lo);
            EXPECT_LT(B.padded - (B.hi - B.lo), L.shards * ParamStore::kAlign);
            EXPECT_EQ(B.piece * L.shards, B.padded);
            EXPECT_EQ(B.full_offset, full);
            EXPECT_EQ(B.shard_offset, shard);
            full += B.padded;
            shard += B.piece;
            for (size_t i : B.tensors) {
              EXPECT_TRUE(seen.insert(i).second);
              EXPECT_EQ(L.bucket_of[i], static_cast<int>(b));
            }
          }
          EXPECT_EQ(seen.size(), specs.size());
          EXPECT_EQ(L.full_numel, full);
          EXPECT_EQ(L.shard_numel, shard);
          const ZeroMemory exact = zero_memory(L, stage, DType::BF16);
          const ZeroMemory f = zero_formula(L.numel, dp, stage, DType::BF16);
          const int64_t pad = L.full_numel - L.numel;
          EXPECT_GE(exact.total(), f.total());
          EXPECT_LE(exact.total() - f.total(), 16 * pad + 16) << "more than the padding";
          EXPECT_LE(static_cast<double>(exact.total() - f.total()), 0.02 * static_cast<double>(f.total()) + 16.0 * pad);
          // The master as 16-bit remainders: K = 10, 2 bytes of every shard element less.
          const ZeroMemory er = zero_memory(L, stage, DType::BF16, true);
          const ZeroMemory fr = zero_formula(L.numel, dp, stage, DType::BF16, true);
          EXPECT_EQ(er.optimizer, exact.optimizer - 2 * L.shard_numel);
          EXPECT_EQ(er.params + er.grads, exact.params + exact.grads);
          EXPECT_EQ(fr.optimizer, (stage >= 1 ? 10 * L.numel / dp : 10 * L.numel));
          EXPECT_EQ(zero_memory(L, stage, DType::F16, true).total(), zero_memory(L, stage, DType::F16).total())
              << "remainders are for bf16 only";
        }
  }
}

// The activation estimate against the allocator's peak during one measured CPU step (fp32), for
// checkpointing none, selective and full. The estimate counts every tensor the model keeps plus
// the largest temporaries, so it is an upper bound; what it overcounts (temporaries that are not
// alive at the same moment) is at most a quarter of it at this size, hence [0.75, 1] x estimate.
// Selective must save what the estimate says it saves: none - selective = (L - 1) x n(2d + F)
// values (the block whose backward runs has its three tensors back), measured within 10% (the
// differences of two peaks: the temporaries mostly cancel).
TEST(PlanActivations, EstimateBoundsAMeasuredStep) {
  ModelConfig mc = small();
  mc.max_position_embeddings = 512;
  auto comm = make_local_communicator();
  const int64_t B = 3, T = 128;
  std::map<Recompute, double> measured, estimate;
  for (Recompute rc : {Recompute::None, Recompute::Selective, Recompute::Full}) {
    SCOPED_TRACE(std::string("checkpointing ") + recompute_name(rc));
    Llama model(mc, rc);
    ZeroOptimizer z(param_specs(mc), model.hook_layers(), DType::F32, Device::CPU, *comm, ZeroConfig{0, 25},
                    AdamWConfig{});
    ParamStore init(param_specs(mc), DType::F32, Device::CPU);
    init_params(mc, init, 7);
    z.set_weights(init);
    std::vector<int32_t> rows(static_cast<size_t>(B * (T + 1)));
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int32_t>(i * 31 % mc.vocab_size);
    Batch batch = make_batch(rows, B, T);
    PlanInput in;
    in.model = mc;
    in.micro_batch_size = B;
    in.seq_len = T;
    in.recompute = rc;
    const Plan plan = make_plan(in);
    const int64_t live0 = memory_stats(Device::CPU).live_bytes;
    allocator(Device::CPU).reset_peak();
    z.begin_step();
    model.forward_backward(z.weights(), batch, 1.0 / (B * T), z.grads());
    measured[rc] = static_cast<double>(memory_stats(Device::CPU).peak_bytes - live0);
    estimate[rc] = static_cast<double>(plan.activations);
    std::printf("[plan] checkpointing %-9s measured %9.0f B  estimate %9.0f B  ratio %.3f\n",
                recompute_name(rc), measured[rc], estimate[rc], measured[rc] / estimate[rc]);
    EXPECT_LE(measured[rc], estimate[rc]);
    EXPECT_GE(measured[rc], 0.75 * estimate[rc]);
  }
  EXPECT_LT(estimate[Recompute::Full], estimate[Recompute::Selective]);
  EXPECT_LT(estimate[Recompute::Selective], estimate[Recompute::None]);
  const double saved = static_cast<double>((mc.num_layers - 1) * B * T * (2 * mc.hidden_size + mc.ffn_hidden_size) * 4);
  EXPECT_EQ(estimate[Recompute::None] - estimate[Recompute::Selective], saved);
  const double measured_saved = measured[Recompute::None] - measured[Recompute::Selective];
  std::printf("[plan] selective saves %.0f B measured, %.0f B estimated\n", measured_saved, saved);
  EXPECT_NEAR(measured_saved, saved, 0.10 * saved);
}

TEST(PlanFits, GpuMemoryDecidesAndKvCacheIsTheLmdeployArithmetic) {
  PlanInput in;
  in.model = tinyllama();
  in.compute = DType::BF16;
  in.micro_batch_size = 1;
  in.seq_len = 2048;
  in.zero = ZeroConfig{0, 25};
  in.gpu_mem_gib = 80;
  const Plan p = make_plan(in);
  EXPECT_EQ(p.psi, 1'100'048'384);
  EXPECT_EQ(p.exact.total(), 16 * p.psi);  // no padding: every size is a multiple of 64
  EXPECT_TRUE(p.fits);
  in.gpu_mem_gib = 16;  // 16 x 1.1e9 B = 16.4 GiB of model states alone
  EXPECT_FALSE(make_plan(in).fits);
  in.dp = 8;
  in.zero.stage = 3;
  EXPECT_TRUE(make_plan(in).fits);
  // KV cache: 2 (K and V) x 22 layers x 4 kv heads x 64 head_dim x 2 bytes = 22528 B per token.
  EXPECT_EQ(p.kv_per_token, 22528);
  EXPECT_EQ(p.infer_weights, 2.0 * 1'100'048'384);
  EXPECT_EQ(bytes_per_element("int4", "x"), 0.5);
  EXPECT_THROW(bytes_per_element("int3", "--kv-dtype"), Error);
}

TEST(BatchSplitTest, RanksTogetherReadTheOneProcessOrder) {
  for (int64_t dp : {1, 2, 4})
    for (int64_t micro : {1, 2}) {
      const int64_t G = 8;
      std::vector<int64_t> order;
      for (int64_t r = 0; r < dp; ++r) {
        const BatchSplit s = split_batch(G, micro, dp, r);
        EXPECT_EQ(s.accum * micro * dp, G);
        for (int64_t j = 0; j < s.accum; ++j)
          for (int64_t k = 0; k < micro; ++k) order.push_back(s.first_sample(3, j) + k);
      }
      for (int64_t i = 0; i < G; ++i) EXPECT_EQ(order[i], 2 * G + i) << "dp " << dp << " micro " << micro;
    }
}

TEST(BatchSplitTest, ErrorsNameTheKeys) {
  try {
    split_batch(4, 1, 8, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(has(e.what(), "more data-parallel ranks (dp = 8)")) << e.what();
    EXPECT_TRUE(has(e.what(), "train.global_batch_size = 4")) << e.what();
  }
  try {
    split_batch(12, 2, 4, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(has(e.what(), "train.global_batch_size (12)")) << e.what();
    EXPECT_TRUE(has(e.what(), "train.micro_batch_size x data-parallel size (2 x 4 = 8)")) << e.what();
  }
}

TEST(ParallelConfig, KeysValidate) {
  const std::string base = "model: {vocab_size: 64, hidden_size: 32, num_layers: 1, num_heads: 2, ffn_hidden_size: 64}\n"
                           "data: {synthetic: true, seq_len: 8}\ntrain: {steps: 1, global_batch_size: 2, micro_batch_size: 1}\n";
  Config c = load_config_string(base, "t.yaml", {"parallel.zero=3", "parallel.bucket_mb=0.5"});
  EXPECT_EQ(c.parallel.zero, 3);
  EXPECT_EQ(c.parallel.bucket_mb, 0.5);
  EXPECT_EQ(c.parallel.tensor, 1);
  for (auto [set, words] : {std::pair{"parallel.zero=4", "parallel.zero: unknown ZeRO stage 4 (expected 0, 1, 2 or 3)"},
                            std::pair{"parallel.zero=-1", "unknown ZeRO stage -1"},
                            std::pair{"parallel.bucket_mb=0", "parallel.bucket_mb: must be positive"},
                            std::pair{"parallel.tensor=0", "parallel.tensor: must be >= 1"},
                            std::pair{"parallel.timeout_s=-1", "parallel.timeout_s"}}) {
    try {
      load_config_string(base, "t.yaml", {set});
      ADD_FAILURE() << set;
    } catch (const Error& e) {
      EXPECT_TRUE(has(e.what(), words)) << e.what();
    }
  }
}

TEST(PlanCli, PrintsPerRankMemoryAndInference) {
  const std::string cfg = test::source_dir() + "/configs/tinyllama-1.1b.yaml";
  std::string out;
  ASSERT_EQ(test::run_command(test::ievo_binary() + " plan " + cfg +
                                  " --dp 8 --set parallel.zero=2 --set train.global_batch_size=64 --gpu-mem-gib 80"
                                  " --set model.checkpointing=selective",
                              &out),
            0)
      << out;
  for (const char* w : {"Ψ = 1100048384", "ZeRO-2 over dp = N = 8", "2Ψ + 12Ψ/N", "optimizer state",
                        "i16 master remainders", "checkpointing selective",
                        "activations (estimate)", ": fits", "KV cache per token", "22.0 KiB",
                        "train.global_batch_size 64 = micro 8 x accumulation 1 x dp 8"})
    EXPECT_TRUE(has(out, w)) << w << "\n" << out;
  // The master as remainders (optim.param_remainders, the default): 2Ψ + 12Ψ/N for
  // Ψ = 1100048384, N = 8: 2.049 + 1.537 = 3.586 GiB; with an f32 master the paper's 2Ψ + 14Ψ/N:
  // 2.049 + 1.793 = 3.842 GiB.
  EXPECT_TRUE(has(out, "3.586 GiB")) << out;
  ASSERT_EQ(test::run_command(test::ievo_binary() + " plan " + cfg +
                                  " --dp 8 --set parallel.zero=2 --set train.global_batch_size=64"
                                  " --set optim.param_remainders=false",
                              &out),
            0)
      << out;
  EXPECT_TRUE(has(out, "2Ψ + 14Ψ/N")) << out;
  EXPECT_TRUE(has(out, "fp32 master + m + v")) << out;
  EXPECT_TRUE(has(out, "3.842 GiB")) << out;
  ASSERT_NE(test::run_command(test::ievo_binary() + " plan " + cfg + " --set parallel.zero=7", &out), 0);
  EXPECT_TRUE(has(out, "unknown ZeRO stage 7")) << out;
}
