// Model shards (models/shard.h): tensor-parallel slices tile the global tensors, and a model run
// as pipeline stages (Llama::stage_forward / stage_backward, one process, outputs handed on by
// hand) gives the whole model's loss and gradients — plain, interleaved (two chunks a rank),
// tied and untied, with and without activation checkpointing. f64, so "equal" is 1e-12.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "models/batch.h"
#include "models/llama.h"
#include "util.h"

using namespace ievo;

namespace {

ModelConfig model(bool tied, int64_t layers = 4) {
  ModelConfig c;
  c.vocab_size = 48;
  c.hidden_size = 32;
  c.num_layers = layers;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 40;
  c.max_position_embeddings = 64;
  c.init_std = 0.2;
  c.tie_embeddings = tied;
  return c;
}

Batch batch(const ModelConfig& c, int64_t B, int64_t T) {
  std::mt19937 rng(7);
  std::vector<int32_t> rows(B * (T + 1));
  for (auto& t : rows) t = static_cast<int32_t>(rng() % c.vocab_size);
  return make_batch(rows, B, T);
}

// The shard's parameters cut from the whole model's.
ParamStore cut(const ParamStore& whole, const std::vector<ParamSpec>& specs) {
  ParamStore s(specs, whole.dtype(), Device::CPU);
  for (size_t i = 0; i < specs.size(); ++i) s[i].copy_from(slice_for(specs[i], whole.get(specs[i].name)));
  return s;
}

TEST(Shard, TensorParallelSlicesTileTheGlobalTensors) {
  for (int T : {2, 4}) {
    const ModelConfig c = model(false);
    ParamStore whole(param_specs(c), DType::F64, Device::CPU);
    init_params(c, whole, 3);
    ParamStore rebuilt(param_specs(c), DType::F64, Device::CPU);
    int64_t local_total = 0;  // each slice counted once: elements / replicas over all ranks
    for (int t = 0; t < T; ++t) {
      ModelShard sh;
      sh.tp = T;
      sh.tp_rank = t;
      const auto specs = param_specs(c, sh);
      ASSERT_EQ(specs.size(), whole.size());
      for (const ParamSpec& s : specs) {
        local_total += shape_numel(s.shape) / s.replicas;
        Tensor& g = rebuilt.get(s.name);
        place_slice(s, slice_for(s, whole.get(s.name)), g);
      }
      // k/v: 2 heads over 4 ranks are replicated on 2 ranks each.
      const ParamSpec& k = specs[whole.index_of("model.layers.0.self_attn.k_proj.weight")];
      EXPECT_EQ(k.replicas, T == 4 ? 2 : 1);
      EXPECT_EQ(k.shape[0], c.hd());
    }
    // Every element placed back, and the local sizes add up (replicas counted once each).
    EXPECT_EQ(test::max_abs_diff(rebuilt.flat(), whole.flat()), 0.0);
    int64_t global_total = 0;
    for (const auto& s : param_specs(c)) global_total += shape_numel(s.shape);
    EXPECT_EQ(local_total, global_total);
  }
}

TEST(Shard, BadTensorParallelSizesNameTheKey) {
  ModelShard sh;
  sh.tp = 3;
  try {
    param_specs(model(false), sh);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.tensor (3) must divide model.num_heads"), std::string::npos)
        << e.what();
  }
}

struct Grads {
  double loss = 0;
  ParamStore g;  // whole-model layout
};

// Stages: per stage its chunks; the model runs chunk by chunk in model order (stage s holds
// model chunks s, s + P, ...), handing each chunk's output to the next and the gradients back.
Grads run_pipeline(const ModelConfig& c, const ParamStore& whole, const Batch& b, int P, int V,
                   Recompute rc) {
  const int64_t per = c.num_layers / (P * V);
  std::vector<std::unique_ptr<Llama>> models;
  std::vector<ParamStore> params, grads;
  for (int s = 0; s < P; ++s) {
    ModelShard sh;
    for (int v = 0; v < V; ++v) sh.chunks.push_back({(v * P + s) * per, (v * P + s + 1) * per});
    sh.first = s == 0;
    sh.last = s == P - 1;
    models.push_back(std::make_unique<Llama>(c, rc, sh));
    params.push_back(cut(whole, models.back()->specs()));
    grads.emplace_back(models.back()->specs(), DType::F64, Device::CPU);
  }
  const double scale = 1.0 / static_cast<double>(b.num_targets());
  LossSum ls;
  std::vector<StageActs> acts(P * V);
  Tensor x;
  for (int k = 0; k < P * V; ++k) {  // model chunk k = stage k % P, its chunk k / P
    const int s = k % P;
    x = models[s]->stage_forward(params[s], k / P, b, x, &acts[k], scale, &grads[s], &ls);
  }
  EXPECT_FALSE(x.defined());
  Tensor dy;
  for (int k = P * V - 1; k >= 0; --k) {
    const int s = k % P;
    dy = models[s]->stage_backward(params[s], k / P, b, acts[k], dy, grads[s]);
  }
  EXPECT_FALSE(dy.defined());
  Grads out{ls.sum * scale, ParamStore(param_specs(c), DType::F64, Device::CPU)};
  for (int s = 0; s < P; ++s)  // a tied embedding's two copies add up
    for (size_t i = 0; i < grads[s].size(); ++i) {
      Tensor& dst = out.g.get(grads[s].spec(i).name);
      Tensor sum = dst.clone();
      const double* a = grads[s][i].data<double>();
      double* o = sum.data<double>();
      for (int64_t j = 0; j < sum.numel(); ++j) o[j] += a[j];
      dst.copy_from(sum);
    }
  return out;
}

TEST(Shard, PipelineStagesEqualTheWholeModel) {
  for (bool tied : {false, true})
    for (Recompute rc : {Recompute::None, Recompute::Full, Recompute::Selective})
      for (auto [P, V] : {std::pair{2, 1}, {4, 1}, {2, 2}}) {
        SCOPED_TRACE(testing::Message() << "tied " << tied << " recompute " << static_cast<int>(rc)
                                        << " P " << P << " V " << V);
        const ModelConfig c = model(tied);
        ParamStore whole(param_specs(c), DType::F64, Device::CPU);
        init_params(c, whole, 5);
        const Batch b = batch(c, 2, 16);
        Llama m(c, rc);
        ParamStore g(param_specs(c), DType::F64, Device::CPU);
        const double scale = 1.0 / static_cast<double>(b.num_targets());
        const double loss = m.forward_backward(whole, b, scale, g).sum * scale;
        const Grads pg = run_pipeline(c, whole, b, P, V, rc);
        EXPECT_NEAR(pg.loss, loss, 1e-12);
        for (size_t i = 0; i < g.size(); ++i)
          EXPECT_LT(test::rel_l2(pg.g[i], g[i]), 1e-12) << g.spec(i).name;
      }
}

TEST(Shard, WholeModelCallsRefuseAStage) {
  const ModelConfig c = model(false);
  ModelShard sh;
  sh.chunks = {{0, 2}};
  sh.last = false;
  Llama m(c, Recompute::None, sh);
  ParamStore p(m.specs(), DType::F64, Device::CPU);
  EXPECT_THROW(m.loss(p, batch(c, 1, 8)), Error);
  EXPECT_EQ(p.size(), 1u + 2 * 9);  // the embedding and two blocks
}

}  // namespace

// ParamStore::zero_lazily: no pass over the buffer; the first writer of a tensor overwrites it
// (accumulator's beta 0, once), any other access finds it zeroed, padding stays as it was.
TEST(ParamStore, LazyZeroOverwritesOrZeroesOnFirstAccess) {
  std::vector<ParamSpec> specs = {{"a", {3, 2}}, {"b", {5}}, {"c", {2, 2}}};
  ParamStore g(specs, DType::F32, Device::CPU);
  Tensor flat = g.flat();
  float* f = flat.data<float>();
  for (int64_t i = 0; i < flat.numel(); ++i) f[i] = 7.0f;  // stale values, padding too
  g.zero_lazily();
  // a: overwritten by its first writer (beta 0), then accumulated (beta 1).
  ParamStore::Accumulator first = g.accumulator(0);
  EXPECT_EQ(first.beta, 0.0f);
  EXPECT_EQ(first.tensor.data<float>(), f);
  ParamStore::Accumulator second = g.accumulator(0);
  EXPECT_EQ(second.beta, 1.0f);
  EXPECT_EQ(g[0].data<float>()[0], 7.0f);  // written by nobody here: a's values are the caller's
  // b: a plain access zeroes it; later accumulators add to it.
  const ParamStore& cg = g;
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(cg[1].data<float>()[i], 0.0f);
  EXPECT_EQ(g.accumulator(1).beta, 1.0f);
  // c: untouched until the whole buffer is read, which zeroes it but not the padding.
  EXPECT_EQ(f[g.offset(2)], 7.0f);
  g.flat();
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(f[g.offset(2) + i], 0.0f);
  EXPECT_EQ(f[g.offset(2) + 4], 7.0f);  // padding after c
  EXPECT_EQ(g.accumulator(2).beta, 1.0f);
  // zero() is eager and clears the marks.
  g.zero_lazily();
  g.zero();
  EXPECT_EQ(g.accumulator(0).beta, 1.0f);
  EXPECT_EQ(f[g.offset(2) + 4], 0.0f);
}
