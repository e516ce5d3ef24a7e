// fp16 on the GPU (label gpu; skipped without a GPU).
// Every CUDA op in f16 against the CPU op in f32 on the same f16-rounded inputs (as
// test_gpu_ops.cpp does for bf16), relative L2 error <= 4e-3: f16 keeps 11 significant bits
// (unit roundoff 2^-11 = 4.9e-4, 8x smaller than bf16's), and 4e-3 is 8 units, as
// test_gpu_ops.cpp's bf16 limit of 1e-2 is 2.6 of bf16's units; attention on every backend that
// takes f16 (ievo's flash kernels hd 64/128, cuDNN hd 64/128, the generic kernel hd 32), its
// backward bit-identical when repeated in deterministic mode. Observed errors are printed
// ("[gpu] ...").
// train.precision: fp16, end to end:
//   * a tiny Llama with head dim 64 (so attention runs on the tensor-core kernels: cuDNN where
//     usable, else ievo's flash kernels) trained 20 steps in fp16 with the default loss scale
//     (65536) follows the same run in fp32: step 1's loss within 2e-3 relative (only the forward's
//     fp16 rounding differs), every step within 1e-2, no step skipped, the loss falls at least
//     80% as much as in fp32;
//   * a loss scale far too large (2^36: the scaled gradients overflow fp16's 65504) backs off by
//     half on every overflowing step (hysteresis 1), those steps are skipped and counted, training
//     then proceeds, and the scale grows back by 2x after growth_interval (3) good steps.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "launch/config.h"
#include "launch/trainer.h"
#include "runtime/ops/adamw.h"
#include "runtime/ops/attention.h"
#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/embedding.h"
#include "runtime/ops/matmul.h"
#include "runtime/ops/rmsnorm.h"
#include "runtime/ops/rope.h"
#include "runtime/ops/swiglu.h"
#include "util.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

using namespace ievo;

namespace {

constexpr DType kF16 = DType::F16;
constexpr double kTol = 4e-3;

void expect_close(const std::string& what, const Tensor& got, const Tensor& ref, double limit = kTol) {
  const double e = test::rel_l2(got, ref);
  std::printf("[gpu] f16 %-44s rel_l2 %.3e (limit %.0e)\n", what.c_str(), e, limit);
  EXPECT_LE(e, limit) << what;
}
Tensor rand(const Shape& s, uint64_t seed, double lo = -1, double hi = 1) {
  return test::random_tensor(s, DType::F32, seed, lo, hi);
}
Tensor gpu(const Tensor& cpu) { return cpu.to(kF16).to(Device::CUDA); }  // f32 CPU -> f16 GPU
Tensor seen(const Tensor& cpu) { return cpu.to(kF16).to(DType::F32); }   // what the GPU sees
Tensor host(const Tensor& g) { return g.to(Device::CPU).to(DType::F32); }
Tensor gempty(const Shape& s, DType dt = kF16) { return Tensor::empty(s, dt, Device::CUDA); }
Tensor ids(int64_t n, int32_t vocab, uint32_t seed) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<int32_t>((seed = seed * 1664525u + 1013904223u) >> 8) % vocab;
  return Tensor::from_vector(v, {n});
}
bool bit_equal(const Tensor& a, const Tensor& b) {
  return test::max_abs_diff(a.to(Device::CPU), b.to(Device::CPU)) == 0.0;
}

TEST(GpuF16Ops, MatmulElementwiseAdamW) {
  IEVO_REQUIRE_GPU();
  const int64_t m = 37, k = 100, n = 53;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Tensor a = rand(ta ? Shape{k, m} : Shape{m, k}, 1 + ta), b = rand(tb ? Shape{n, k} : Shape{k, n}, 3 + tb);
      Tensor c = rand({m, n}, 5), ref = seen(c), gc = gpu(c);
      ops::matmul(seen(a), ta, seen(b), tb, ref, 0.5f, 0.25f);
      ops::matmul(gpu(a), ta, gpu(b), tb, gc, 0.5f, 0.25f);
      expect_close(std::string("matmul") + (ta ? " aT" : " a") + (tb ? " bT" : " b"), host(gc), ref);
    }
  Tensor x = rand({1001}, 6), y = rand({1001}, 7);
  Tensor gx = gpu(x), gy = gpu(y), rx = seen(x), ry = seen(y);
  ops::axpy(0.75, gx, gy);
  ops::axpy(0.75, rx, ry);
  expect_close("axpy", host(gy), ry);
  ops::scale(gy, -1.5);
  ops::scale(ry, -1.5);
  expect_close("scale", host(gy), ry);
  Tensor go = gempty({1001}), ro = Tensor::empty({1001}, DType::F32);
  ops::add(gx, gy, go);
  ops::add(rx, ry, ro);
  expect_close("add", host(go), ro);
  Tensor big = rand({1 << 20 | 37}, 8);
  const double ss = ops::sum_squares(gpu(big)), rss = ops::sum_squares(seen(big));
  EXPECT_NEAR(ss, rss, 1e-10 * rss);
  EXPECT_TRUE(ops::all_finite(gpu(big)));
  big.data<float>()[777] = 1e6f;  // above f16's 65504: Inf after the cast
  EXPECT_FALSE(ops::all_finite(gpu(big)));
  // AdamW with f16 gradients writing the f16 copy of the weights (fp16 training's layout).
  ops::AdamWHyper hp;
  hp.lr = 3e-3, hp.weight_decay = 0.1, hp.step = 7, hp.grad_scale = 0.5;
  Tensor p = rand({1003}, 9), g = rand({1003}, 10), mm = rand({1003}, 11, -0.1, 0.1), v = rand({1003}, 12, 0, 0.01);
  Tensor rp = p.clone(), rm = mm.clone(), rv = v.clone(), rlow = Tensor::empty({1003}, kF16);
  ops::adamw_step(rp, seen(g), rm, rv, hp, &rlow);
  Tensor gp = p.to(Device::CUDA), gm = mm.to(Device::CUDA), gv = v.to(Device::CUDA), glow = gempty({1003});
  ops::adamw_step(gp, gpu(g), gm, gv, hp, &glow);
  expect_close("adamw param", host(gp), rp, 1e-5);
  expect_close("adamw m", host(gm), rm, 1e-5);
  expect_close("adamw v", host(gv), rv, 1e-5);
  expect_close("adamw f16 weight copy", host(glow), rlow.to(DType::F32), 1e-3);
}

TEST(GpuF16Ops, EmbeddingRmsNormRopeSwiglu) {
  IEVO_REQUIRE_GPU();
  const int64_t vocab = 1000, d = 100, n = 777;
  Tensor id = ids(n, 50, 1), gid = id.to(Device::CUDA);
  Tensor table = rand({vocab, d}, 20), out = Tensor::empty({n, d}, DType::F32), gout = gempty({n, d});
  ops::embedding_forward(seen(table), id, out);
  ops::embedding_forward(gpu(table), gid, gout);
  EXPECT_EQ(test::max_abs_diff(host(gout), out), 0.0) << "gather is exact";
  Tensor dout = rand({n, d}, 21), dtab = rand({vocab, d}, 22), rdtab = seen(dtab), gdtab = gpu(dtab);
  ops::embedding_backward(seen(dout), id, rdtab);
  ops::embedding_backward(gpu(dout), gid, gdtab);
  expect_close("embedding_backward", host(gdtab), rdtab);

  for (int64_t D : {int64_t{100}, int64_t{2048}, int64_t{3000}}) {
    const std::string tag = " D=" + std::to_string(D);
    Tensor x = rand({37, D}, 23), w = rand({D}, 24, 0.5, 1.5), dy = rand({37, D}, 25);
    Tensor y = Tensor::empty({37, D}, DType::F32), rstd = Tensor::empty({37}, DType::F32);
    ops::rmsnorm_forward(seen(x), seen(w), 1e-5, y, rstd);
    Tensor gx = gpu(x), gw = gpu(w), gy = gempty({37, D}), grstd = gempty({37}, DType::F32);
    ops::rmsnorm_forward(gx, gw, 1e-5, gy, grstd);
    expect_close("rmsnorm_forward y" + tag, host(gy), y);
    expect_close("rmsnorm_forward rstd" + tag, host(grstd), rstd, 1e-5);
    Tensor dx = Tensor::empty({37, D}, DType::F32), dw = Tensor::zeros({D}, DType::F32);
    ops::rmsnorm_backward(seen(dy), seen(x), seen(w), rstd, dx, dw);
    Tensor gdx = gempty({37, D}), gdw = Tensor::zeros({D}, DType::F32, Device::CUDA);
    ops::rmsnorm_backward(gpu(dy), gx, gw, grstd, gdx, gdw);
    expect_close("rmsnorm_backward dx" + tag, host(gdx), dx);
    expect_close("rmsnorm_backward dw (f32)" + tag, host(gdw), dw);
  }

  std::vector<int32_t> pv(37);
  for (int i = 0; i < 37; ++i) pv[static_cast<size_t>(i)] = (i * 97) % 2048;
  Tensor pos = Tensor::from_vector(pv, {37});
  Tensor q = rand({37, 3, 64}, 26), ry = Tensor::empty({37, 3, 64}, DType::F32), gq = gpu(q);
  ops::rope_forward(seen(q), pos, 10000.0, ry);
  ops::rope_forward(gq, pos.to(Device::CUDA), 10000.0, gq);
  expect_close("rope_forward", host(gq), ry);
  Tensor rdx = Tensor::empty({37, 3, 64}, DType::F32), gdx = gempty({37, 3, 64});
  ops::rope_backward(seen(q), pos, 10000.0, rdx);
  ops::rope_backward(gpu(q), pos.to(Device::CUDA), 10000.0, gdx);
  expect_close("rope_backward", host(gdx), rdx);

  Tensor gate = rand({37, 101}, 27, -4, 4), up = rand({37, 101}, 28), dh = rand({37, 101}, 29);
  Tensor h = Tensor::empty({37, 101}, DType::F32), gh = gempty({37, 101});
  ops::swiglu_forward(seen(gate), seen(up), h);
  ops::swiglu_forward(gpu(gate), gpu(up), gh);
  expect_close("swiglu_forward", host(gh), h);
  Tensor dg = Tensor::empty({37, 101}, DType::F32), du = Tensor::empty({37, 101}, DType::F32);
  ops::swiglu_backward(seen(dh), seen(gate), seen(up), dg, du);
  Tensor gg = gpu(gate), gu = gpu(up);
  ops::swiglu_backward(gpu(dh), gg, gu, gg, gu);
  expect_close("swiglu_backward dgate", host(gg), dg);
  expect_close("swiglu_backward dup", host(gu), du);
}

TEST(GpuF16Ops, CrossEntropy) {
  IEVO_REQUIRE_GPU();
  for (int64_t v : {int64_t{1000}, int64_t{1001}}) {
    const std::string tag = " V=" + std::to_string(v);
    Tensor t = ids(37, static_cast<int32_t>(v), 2);
    t.data<int32_t>()[3] = ops::kIgnoreIndex;
    Tensor logits = rand({37, v}, 30, -6, 6), losses = Tensor::empty({37}, DType::F32);
    Tensor gl = gpu(logits), glosses = gempty({37}, DType::F32);
    int64_t count = 0, gcount = 0;
    const double sum = ops::cross_entropy_forward(seen(logits), t, losses, &count);
    const double gsum = ops::cross_entropy_forward(gl, t.to(Device::CUDA), glosses, &gcount);
    EXPECT_EQ(gcount, count);
    EXPECT_NEAR(gsum, sum, 1e-5 * sum) << tag;
    expect_close("cross_entropy_forward losses" + tag, host(glosses), losses, 1e-5);
    Tensor dl = Tensor::empty({37, v}, DType::F32);
    ops::cross_entropy_backward(seen(logits), t, 0.5, dl);
    ops::cross_entropy_backward(gl, t.to(Device::CUDA), 0.5, gl);  // in place
    expect_close("cross_entropy_backward" + tag, host(gl), dl);
  }
}

// Attention: 3 packed sequences (37 < one tile, 150 = several tiles with a ragged end, 64 = one
// tile), GQA, forward and backward against the CPU, then a deterministic repeat of the backward.
struct AttnCase {
  int hd, hq, hkv;
  ops::AttentionBackend backend;
};

class GpuF16Attention : public ::testing::TestWithParam<AttnCase> {
 protected:
  void TearDown() override { ops::set_attention_backend(ops::AttentionBackend::Auto); }
};

TEST_P(GpuF16Attention, MatchesCpuVarlen) {
  IEVO_REQUIRE_GPU();
  const AttnCase c = GetParam();
  const bool cudnn = c.backend == ops::AttentionBackend::Cudnn;
  ops::set_attention_backend(c.backend);
  const std::vector<int32_t> cu_v = {0, 37, 187, 251};
  const int64_t n = 251;
  const int max_seqlen = 150;
  Tensor cu = Tensor::from_vector(cu_v, {4}), gcu = cu.to(Device::CUDA);
  Tensor q = rand({n, c.hq, c.hd}, 40), k = rand({n, c.hkv, c.hd}, 41), v = rand({n, c.hkv, c.hd}, 42);
  Tensor dout = rand({n, c.hq, c.hd}, 43);
  Tensor gq = gpu(q), gk = gpu(k), gv = gpu(v), gdo = gpu(dout);
  Tensor gout = gempty(q.shape()), glse = gempty({c.hq, n}, DType::F32);
  try {
    ops::attention_forward(gq, gk, gv, gcu, max_seqlen, gout, glse);
  } catch (const Error& e) {  // cuDNN attention not built in or not usable on this GPU
    if (cudnn && std::string(e.what()).find("unavailable") != std::string::npos) GTEST_SKIP() << e.what();
    throw;
  }
  Tensor out = Tensor::empty(q.shape(), DType::F32), lse = Tensor::empty({c.hq, n}, DType::F32);
  ops::attention_forward(seen(q), seen(k), seen(v), cu, max_seqlen, out, lse);
  const std::string name = detail::cat(cudnn ? "cudnn" : "flash", " hd", c.hd, " ", c.hq, "x", c.hkv);
  expect_close("attention out " + name, host(gout), out);
  expect_close("attention lse " + name, host(glse), lse, 1e-3);
  Tensor dq = Tensor::empty(q.shape(), DType::F32), dk = Tensor::empty(k.shape(), DType::F32),
         dv = Tensor::empty(v.shape(), DType::F32);
  ops::attention_backward(seen(dout), seen(q), seen(k), seen(v), out, lse, cu, max_seqlen, dq, dk, dv);
  {  // the default path (flash: the fused kernel with atomic dQ)
    Tensor f1 = gempty(q.shape()), f2 = gempty(k.shape()), f3 = gempty(v.shape());
    ops::attention_backward(gdo, gq, gk, gv, gout, glse, gcu, max_seqlen, f1, f2, f3);
    expect_close("attention dq (default) " + name, host(f1), dq);
    expect_close("attention dk (default) " + name, host(f2), dk);
    expect_close("attention dv (default) " + name, host(f3), dv);
  }
#ifdef IEVO_CUDA
  cuda::set_deterministic(true);
#endif
  Tensor a1 = gempty(q.shape()), b1 = gempty(k.shape()), c1 = gempty(v.shape());
  Tensor a2 = gempty(q.shape()), b2 = gempty(k.shape()), c2 = gempty(v.shape());
  ops::attention_backward(gdo, gq, gk, gv, gout, glse, cu, max_seqlen, a1, b1, c1);
  ops::attention_backward(gdo, gq, gk, gv, gout, glse, gcu, max_seqlen, a2, b2, c2);
#ifdef IEVO_CUDA
  cuda::set_deterministic(false);
#endif
  expect_close("attention dq " + name, host(a1), dq);
  expect_close("attention dk " + name, host(b1), dk);
  expect_close("attention dv " + name, host(c1), dv);
  EXPECT_TRUE(bit_equal(a1, a2) && bit_equal(b1, b2) && bit_equal(c1, c2))
      << "attention backward not bit-identical across runs (" << name << ")";
}

std::vector<AttnCase> attn_cases() {
  using B = ops::AttentionBackend;
  std::vector<AttnCase> v;
  for (B b : {B::Flash, B::Cudnn})
    for (int hd : {64, 128}) {
      v.push_back({hd, 8, 2, b});
      v.push_back({hd, 2, 2, b});
    }
  v.push_back({32, 4, 1, B::Flash});  // the generic kernel
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuF16Attention, ::testing::ValuesIn(attn_cases()), [](const auto& i) {
  return detail::cat(i.param.backend == ops::AttentionBackend::Cudnn ? "cudnn" : "flash", "_hd", i.param.hd,
                     "_", i.param.hq, "x", i.param.hkv);
});

// ---- train.precision: fp16 ------------------------------------------------------------------

std::string yaml(const std::string& dir, const std::string& precision, int64_t steps) {
  std::ostringstream os;
  os << "run: {dir: " << dir << ", seed: 11, device: cuda}\n"
     << "model: {arch: llama, vocab_size: 256, hidden_size: 256, num_layers: 2, num_heads: 4,\n"
     << "        num_kv_heads: 2, ffn_hidden_size: 512, max_position_embeddings: 128}\n"
     << "data: {paths: [" << test::source_dir() << "/configs/data/tiny], seq_len: 64}\n"
     << "train: {steps: " << steps << ", global_batch_size: 8, micro_batch_size: 4, precision: "
     << precision << "}\n"
     << "optim: {lr: 1.0e-3}\n"
     << "schedule: {kind: constant}\n"
     << "checkpoint: {at_end: false}\n";
  return os.str();
}

std::vector<StepMetrics> train(const std::string& dir, const std::string& precision, int64_t steps,
                               const std::vector<std::string>& sets = {}) {
  return run_train(load_config_string(yaml(dir, precision, steps), "fp16_test", sets));
}

TEST(GpuFp16, TrainingFollowsFp32) {
  IEVO_REQUIRE_GPU();
  const std::string dir = test::temp_dir("gpu_fp16");
  const auto f32 = train(dir + "/f32", "fp32", 20);
  const auto f16 = train(dir + "/f16", "fp16", 20);
  ASSERT_EQ(f32.size(), 20u);
  ASSERT_EQ(f16.size(), 20u);
  for (size_t i = 0; i < f16.size(); ++i) {
    const double rel = std::fabs(f16[i].loss - f32[i].loss) / f32[i].loss;
    std::printf("[gpu] fp16 step %2lld loss %.5f (fp32 %.5f, rel %.2e) scale %g\n",
                static_cast<long long>(f16[i].step), f16[i].loss, f32[i].loss, rel, f16[i].loss_scale);
    EXPECT_LE(rel, i == 0 ? 2e-3 : 1e-2) << "step " << f16[i].step;
    EXPECT_FALSE(f16[i].skipped) << "step " << f16[i].step;
    EXPECT_EQ(f16[i].loss_scale, 65536.0) << "step " << f16[i].step;  // growth only after 1000
    EXPECT_TRUE(std::isfinite(f16[i].grad_norm));
  }
  const double fell32 = f32.front().loss - f32.back().loss, fell16 = f16.front().loss - f16.back().loss;
  EXPECT_GT(fell32, 0.1);
  EXPECT_GE(fell16, 0.8 * fell32);
}

TEST(GpuFp16, LossScaleBacksOffOnOverflowAndGrowsBack) {
  IEVO_REQUIRE_GPU();
  const std::string dir = test::temp_dir("gpu_fp16_scale");
  const double big = std::ldexp(1.0, 36);
  const auto ms = train(dir, "fp16", 40,
                        {"fp16.initial_scale=68719476736", "fp16.max_scale=68719476736",
                         "fp16.hysteresis=1", "fp16.growth_interval=3"});
  ASSERT_EQ(ms.size(), 40u);
  EXPECT_TRUE(ms[0].skipped) << "2^36 x the gradients must overflow fp16";
  EXPECT_EQ(ms[0].loss_scale, big);
  int64_t skipped = 0, grew = 0, first_good = -1;
  for (size_t i = 0; i < ms.size(); ++i) {
    std::printf("[gpu] fp16 step %2lld scale %-12g skipped %d loss %.4f\n",
                static_cast<long long>(ms[i].step), ms[i].loss_scale, ms[i].skipped ? 1 : 0, ms[i].loss);
    skipped += ms[i].skipped;
    EXPECT_EQ(ms[i].skipped_total, skipped) << "step " << ms[i].step;
    if (!ms[i].skipped && first_good < 0) first_good = static_cast<int64_t>(i);
    if (i + 1 < ms.size()) {
      const double next = ms[i + 1].loss_scale;
      if (ms[i].skipped) {
        EXPECT_EQ(next, ms[i].loss_scale / 2) << "no back-off after step " << ms[i].step;
      } else if (next != ms[i].loss_scale) {
        EXPECT_EQ(next, ms[i].loss_scale * 2) << "step " << ms[i].step;
        // A growth follows exactly growth_interval good steps.
        ASSERT_GE(i, 2u);
        EXPECT_FALSE(ms[i - 1].skipped || ms[i - 2].skipped) << "step " << ms[i].step;
        ++grew;
      }
    }
  }
  ASSERT_GE(first_good, 1) << "the scale never backed off far enough";
  EXPECT_LT(ms[static_cast<size_t>(first_good)].loss_scale, big);
  EXPECT_GE(grew, 1) << "the scale never grew back";
  EXPECT_LT(skipped, 30);
  EXPECT_LT(ms.back().loss, ms[static_cast<size_t>(first_good)].loss);
}

}  // namespace
