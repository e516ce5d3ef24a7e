// CPU benchmark: one training step (forward, backward, AdamW) of Llama models on synthetic tokens,
// reported as tokens/s. The ~100M-parameter case is the shape of the 134M peer model of the
// performance issue (d768 L12 h12 ffn2048 V32000) at T=256, one sequence per step.
//   build/bench/bench_train_step --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <random>

#include "models/batch.h"
#include "models/llama.h"
#include "optim/adamw.h"

using namespace ievo;

static void train_step(benchmark::State& state, ModelConfig c, int64_t B, int64_t T) {
  ParamStore params(param_specs(c), DType::F32, Device::CPU);
  ParamStore grads(param_specs(c), DType::F32, Device::CPU);
  init_params(c, params, 1);
  AdamW opt(params, AdamWConfig{0.9, 0.95, 1e-8, 0.1});
  Llama model(c);
  std::mt19937 rng(1);
  std::vector<int32_t> rows(static_cast<size_t>(B * (T + 1)));
  for (auto& t : rows) t = static_cast<int32_t>(rng() % c.vocab_size);
  Batch b = make_batch(rows, B, T);
  for (auto _ : state) {
    grads.zero_lazily();
    LossSum ls = model.forward_backward(params, b, 1.0 / static_cast<double>(B * T), grads);
    benchmark::DoNotOptimize(ls.sum);
    opt.step(params, grads, 1e-4, 1.0);
  }
  const double tokens = static_cast<double>(B * T);
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["params_M"] = static_cast<double>(c.num_params()) / 1e6;
  state.counters["GFLOP/s"] = benchmark::Counter(tokens * c.flops_per_token(T) / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

static ModelConfig llama(int64_t V, int64_t d, int64_t L, int64_t H, int64_t KV, int64_t F) {
  ModelConfig c;
  c.vocab_size = V;
  c.hidden_size = d;
  c.num_layers = L;
  c.num_heads = H;
  c.num_kv_heads = KV;
  c.ffn_hidden_size = F;
  return c;
}

BENCHMARK_CAPTURE(train_step, tiny_d64_L2, llama(256, 64, 2, 4, 2, 128), 8, 64)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(train_step, llama_134M_T256, llama(32000, 768, 12, 12, 12, 2048), 1, 256)
    ->Unit(benchmark::kSecond)
    ->Iterations(2);

BENCHMARK_MAIN();
