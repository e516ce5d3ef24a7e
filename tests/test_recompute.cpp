// Activation checkpointing (model.checkpointing, models/llama.h Recompute): full and selective
// recomputation give the same loss and gradients as keeping every activation, and hold less
// memory at the peak (CPU allocator statistics).
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "models/batch.h"
#include "models/llama.h"
#include "runtime/allocator.h"
#include "util.h"

using namespace ievo;

namespace {

constexpr int64_t kB = 4, kT = 32;

ModelConfig model() {
  ModelConfig c;
  c.vocab_size = 50;
  c.hidden_size = 32;
  c.num_layers = 3;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 48;
  c.max_position_embeddings = 64;
  c.init_std = 0.2;
  return c;
}

struct Result {
  double loss = 0;
  int64_t count = 0;
  Tensor grads;       // flat f32 gradients
  int64_t peak = 0;   // allocator peak above the live bytes at the start of forward_backward
};

Result run(Recompute mode, int64_t head_chunk_tokens = 0, bool joint = true) {
  const ModelConfig c = model();
  Llama::set_joint_linears(joint);
  ParamStore p(param_specs(c), DType::F32, Device::CPU);
  init_params(c, p, 3);
  ParamStore g(param_specs(c), DType::F32, Device::CPU);
  g.zero();
  std::vector<int32_t> rows(kB * (kT + 1));
  uint64_t x = 17;
  for (auto& t : rows) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<int32_t>((x >> 33) % 50);
  }
  const Batch b = make_batch(rows, kB, kT);
  Llama m(c, mode);
  if (head_chunk_tokens > 0) m.head_chunk_tokens = head_chunk_tokens;  // model.head_chunk_tokens
  Allocator& a = allocator(Device::CPU);
  const int64_t live = a.stats().live_bytes;
  a.reset_peak();
  Result r;
  const LossSum ls = m.forward_backward(p, b, 1.0 / static_cast<double>(kB * kT), g);
  r.peak = a.stats().peak_bytes - live;
  r.loss = ls.sum;
  r.count = ls.count;
  r.grads = g.flat();
  Llama::set_joint_linears(true);
  return r;
}

}  // namespace

// The joint projections (q/k/v and gate/up as one GEMM each over their adjacent weights, forward
// and backward) against one GEMM per projection: the same loss and gradients up to the order of
// f32 sums, under every checkpointing mode. The store lays the weights, and the gradients, out
// back to back, which the joint path needs.
TEST(Recompute, JointProjectionsMatchOneGemmEach) {
  const ModelConfig c = model();
  ParamStore p(param_specs(c), DType::F32, Device::CPU);
  auto w = [&](const std::string& n) { return p.get("model.layers.1." + n); };
  EXPECT_TRUE(adjacent_view({w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight")}, 0).defined());
  EXPECT_TRUE(adjacent_view({w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")}, 0).defined());
  for (Recompute mode : {Recompute::None, Recompute::Full, Recompute::Selective}) {
    const Result joint = run(mode), split = run(mode, 0, false);
    EXPECT_EQ(joint.count, split.count);
    EXPECT_NEAR(joint.loss, split.loss, 1e-6 * std::abs(split.loss));
    EXPECT_LE(test::rel_l2(joint.grads, split.grads), 1e-6);
    EXPECT_GT(test::max_abs_diff(split.grads, Tensor::zeros(split.grads.shape(), DType::F32)), 0.0);
  }
}

TEST(Recompute, FullAndSelectiveMatchNoneAndSaveMemory) {
  const Result none = run(Recompute::None), full = run(Recompute::Full), sel = run(Recompute::Selective);
  ASSERT_EQ(none.count, kB * kT);
  for (const Result* r : {&full, &sel}) {
    EXPECT_EQ(r->count, none.count);
    // The same kernels on the same inputs: equal up to f32 rounding of a reordered BLAS at most.
    EXPECT_NEAR(r->loss, none.loss, 1e-6 * std::abs(none.loss));
    EXPECT_LE(test::rel_l2(r->grads, none.grads), 1e-6);
  }
  // Selective drops the two norm outputs and the SwiGLU product of every block ((2d + F) floats a
  // token); at the peak (the last block's backward, after its recomputation) those of the other
  // L - 1 blocks are missing.
  const ModelConfig c = model();
  const int64_t dropped = (c.num_layers - 1) * (2 * c.hidden_size + c.ffn_hidden_size) * kB * kT * 4;
  EXPECT_GE(none.peak - sel.peak, dropped) << "none " << none.peak << " selective " << sel.peak;
  // Full keeps only each block's input.
  EXPECT_LT(full.peak, sel.peak) << "full " << full.peak << " selective " << sel.peak;
}

// model.head_chunk_tokens: the fused head + loss in chunks of 8, 40 (a partial last chunk) or 128
// of the 128 tokens gives the loss and gradients of the default (one chunk here).
TEST(Recompute, HeadChunkSizeDoesNotChangeResults) {
  const Result ref = run(Recompute::None);
  for (int64_t chunk : {8, 40, 128}) {
    const Result r = run(Recompute::None, chunk);
    EXPECT_EQ(r.count, ref.count) << chunk;
    EXPECT_NEAR(r.loss, ref.loss, 1e-6 * std::abs(ref.loss)) << chunk;
    EXPECT_LE(test::rel_l2(r.grads, ref.grads), 1e-6) << chunk;
  }
}

// The automatic chunk (model.head_chunk_tokens: 0): the largest power of two in [1024, 4096]
// with at most 2^29 logits, for the vocabularies in use.
TEST(Recompute, DefaultHeadChunkBySizeOfTheVocabulary) {
  EXPECT_EQ(Llama::default_head_chunk_tokens(32000), 4096);   // Llama 2, TinyLlama
  EXPECT_EQ(Llama::default_head_chunk_tokens(92544), 4096);   // InternLM2
  EXPECT_EQ(Llama::default_head_chunk_tokens(128256), 4096);  // Llama 3: 525M logits
  EXPECT_EQ(Llama::default_head_chunk_tokens(152064), 2048);  // Qwen2
  EXPECT_EQ(Llama::default_head_chunk_tokens(262144), 2048);  // exactly 2^29 at 2048
  EXPECT_EQ(Llama::default_head_chunk_tokens(1 << 20), 1024);  // never below 1024
  EXPECT_EQ(Llama::default_head_chunk_tokens(100), 4096);     // never above 4096
}
