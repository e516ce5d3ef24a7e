// KV-cache generation on the GPU against the CPU: attention_decode (device path) and
// Llama::forward_step logits in f32 within 1e-4 relative L2, and the same greedy tokens.
#include <gtest/gtest.h>

#include <cstdio>
#include <vector>

#include "models/generate.h"
#include "runtime/ops/decode_attention.h"
#include "util.h"

#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

using namespace ievo;

namespace {

#define REQUIRE_GPU() IEVO_REQUIRE_GPU()

}  // namespace

TEST(GpuGenerate, DecodeAttentionMatchesCpu) {
  REQUIRE_GPU();
  for (DType dt : {DType::F32, DType::BF16}) {
    const int64_t past = 37, n = 3, total = past + n;
    Tensor q = test::random_tensor({n, 8, 64}, DType::F32, 1);
    Tensor k = test::random_tensor({total, 2, 64}, DType::F32, 2);
    Tensor v = test::random_tensor({total, 2, 64}, DType::F32, 3);
    Tensor ref = Tensor::empty({n, 8, 64}, DType::F32);
    ops::attention_decode(q, k, v, ref);
    Tensor out = Tensor::empty({n, 8, 64}, dt, Device::CUDA);
    ops::attention_decode(q.to(dt).to(Device::CUDA), k.to(dt).to(Device::CUDA),
                          v.to(dt).to(Device::CUDA), out);
    const double e = test::rel_l2(out, ref), limit = dt == DType::F32 ? 1e-5 : 2e-2;
    std::printf("[gpu] attention_decode %s rel_l2 %.3e (limit %.0e)\n", dtype_name(dt), e, limit);
    EXPECT_LE(e, limit);
  }
}

TEST(GpuGenerate, GreedyTokensAndLogitsMatchCpu) {
  REQUIRE_GPU();
  ModelConfig c;
  c.vocab_size = 128;
  c.hidden_size = 64;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 96;
  c.max_position_embeddings = 64;
  c.init_std = 0.3;
  ParamStore cpu(param_specs(c), DType::F32, Device::CPU);
  init_params(c, cpu, 4);
  ParamStore gpu(param_specs(c), DType::F32, Device::CUDA);
  gpu.flat().copy_from(cpu.flat());
  Llama m(c);
  const std::vector<int32_t> prompt = {5, 9, 77, 3};
  SamplingOptions o;
  o.temperature = 0;
  o.max_new_tokens = 16;
  const auto want = generate(m, cpu, prompt, o);
  EXPECT_EQ(generate(m, gpu, prompt, o), want);

  KvCache kc = m.make_kv_cache(8, DType::F32, Device::CPU), kg = m.make_kv_cache(8, DType::F32, Device::CUDA);
  EXPECT_LE(test::rel_l2(m.forward_step(gpu, prompt, kg), m.forward_step(cpu, prompt, kc)), 1e-4);
  EXPECT_LE(test::rel_l2(m.forward_step(gpu, {want[0]}, kg), m.forward_step(cpu, {want[0]}, kc)), 1e-4);
}
