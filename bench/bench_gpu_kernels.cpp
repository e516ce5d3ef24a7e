// GPU kernel timings (CUDA event timing, manual time per iteration) at TinyLlama-1.1B shapes:
// T = 2048, micro-batch 8 (N = 16384 tokens), d 2048, Hq 32, Hkv 4, hd 64, ffn 5632, V 32000;
// attention also at the comparison shape (hd128_*: B 4, T 4096, 16 heads, hd 128).
//   build/bench/bench_gpu_kernels --benchmark_counters_tabular=true
// Counters: TFLOP/s for matrix work (attention counts the causal half: 2 * 2 * N * T/2 * d per
// direction of QK^T and PV, backward 2.5x the forward), GB/s for memory-bound kernels (bytes
// read + written once), and %peak: against 989 TFLOP/s (an H100 SXM's dense bf16, as in the MFU
// formula) or this device's memory bandwidth (2 x memory clock x bus width: 3352 GB/s on an H100
// SXM). Skips everything without a GPU.
#include <benchmark/benchmark.h>

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/allocator.h"
#include "runtime/ops/adamw.h"
#include "runtime/ops/attention.h"
#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/matmul.h"
#include "runtime/ops/rmsnorm.h"
#include "runtime/ops/rope.h"
#include "runtime/ops/swiglu.h"
#include "runtime/tensor.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/check.h"
#include "runtime/cuda/cuda.h"
#include "runtime/cuda/flash_attn.h"
#endif

using namespace ievo;

namespace {

#ifdef IEVO_CUDA
bool skip(benchmark::State& state) {
  if (!cuda::available()) {
    state.SkipWithError("no CUDA device");
    return true;
  }
  return false;
}

// Uniform in [-0.5, 0.5); every call draws a new stream (q, k, v and dO must differ: the same
// values in all four make S = Q Q^T, not a model's attention).
Tensor rnd(const Shape& s, DType dt) {
  static uint32_t calls = 0;
  Tensor t = Tensor::empty(s, DType::F32);
  uint32_t x = 12345u + 7919u * ++calls;
  for (int64_t i = 0; i < t.numel(); ++i) {
    x = x * 1664525u + 1013904223u;
    t.data<float>()[i] = static_cast<float>(x >> 8) / static_cast<float>(1u << 24) - 0.5f;
  }
  return t.to(dt).to(Device::CUDA);
}

// Times body() with CUDA events around kReps back-to-back calls; one manual-time sample (their
// mean) per iteration. Back to back, the host's work for a call (argument checks, cuDNN variant
// packs) overlaps the previous call's kernels instead of counting as device time; the peer's
// kernel timings (bench/peer/llama_peer.py --attention) do the same.
constexpr int kReps = 5;
double g_call_s = 0;  // the last timed()'s mean device seconds per call (for %peak)
template <typename F>
void timed(benchmark::State& state, F&& body) {
  body();  // warm-up (plan/graph building)
  cuda::synchronize();
  cuda::Event a(true), b(true);
  double host_s = 0, device_s = 0;
  for (auto _ : state) {
    a.record();
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < kReps; ++r) body();
    host_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    b.record();
    b.synchronize();
    state.SetIterationTime(b.elapsed_ms(a) / 1e3 / kReps);
    device_s += b.elapsed_ms(a) / 1e3 / kReps;
  }
  g_call_s = state.iterations() > 0 ? device_s / static_cast<double>(state.iterations()) : 0;
  // The host's time to issue one call (checks, descriptors, launches), beside the device time.
  state.counters["host_us"] = benchmark::Counter(1e6 * host_s / kReps / static_cast<double>(state.iterations()));
}

constexpr int64_t kT = 2048, kB = 8, kN = kT * kB, kD = 2048, kHq = 32, kHkv = 4, kHd = 64,
                  kF = 5632, kV = 32000;

// Rate counters per call, after timed(): flop (TFLOP/s) or bytes moved (GB/s), each with %peak.
constexpr double kPeakTflops = 989.0;
double peak_gbs() {
  static const double v = [] {
    int khz = 0, bits = 0;
    cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, 0);
    cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, 0);
    return 2.0 * khz * 1e3 * bits / 8 / 1e9;
  }();
  return v;
}
void flop_rate(benchmark::State& state, double flop) {
  state.counters["TFLOP/s"] = benchmark::Counter(flop / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  if (g_call_s > 0) state.counters["%peak"] = 100 * flop / g_call_s / 1e12 / kPeakTflops;
}
void byte_rate(benchmark::State& state, double bytes) {
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  const double peak = peak_gbs();
  if (peak > 0 && g_call_s > 0) state.counters["%peak"] = 100 * bytes / g_call_s / 1e9 / peak;
}

void BM_matmul(benchmark::State& state, int64_t m, int64_t n, int64_t k, bool tb) {
  if (skip(state)) return;
  Tensor a = rnd({m, k}, DType::BF16), b = rnd(tb ? Shape{n, k} : Shape{k, n}, DType::BF16);
  Tensor c = Tensor::empty({m, n}, DType::BF16, Device::CUDA);
  timed(state, [&] { ops::matmul(a, false, b, tb, c); });
  flop_rate(state, 2.0 * m * n * k);
}

// The linear layers that read one input: q/k/v of the attention, gate/up of the MLP, at each
// preset's shapes (N tokens of width D; the parts' output widths). As the model runs them
// (joint = false: one GEMM a part, the input gradient's later parts accumulating with beta 1), and
// as one GEMM over the adjacent weights [W0; W1; ...] (joint = true): the forward y = x W^T, the
// input gradient dx = dy W, the weight gradient dW = dy^T x. The same FLOPs either way.
struct JointShape {
  int64_t N, D;
  std::vector<int64_t> parts;
};
const JointShape kQkv134m{32768, 768, {768, 768, 768}}, kGateUp134m{32768, 768, {2048, 2048}},
    kQkvTiny{16384, 2048, {2048, 256, 256}}, kGateUpTiny{16384, 2048, {5632, 5632}},
    kQkvIlm2{16384, 2048, {2048, 1024, 1024}}, kGateUpIlm2{16384, 2048, {8192, 8192}};
enum class LinGemm { Forward, InputGrad, WeightGrad };
void BM_joint_linear(benchmark::State& state, JointShape sh, LinGemm which, bool joint) {
  if (skip(state)) return;
  const int64_t N = sh.N, D = sh.D;
  int64_t F = 0;
  for (int64_t p : sh.parts) F += p;
  auto bf16 = [](const Shape& s) { return Tensor::empty(s, DType::BF16, Device::CUDA); };
  const bool grads = which != LinGemm::Forward;
  Tensor x = rnd({N, D}, DType::BF16), w = rnd({F, D}, DType::BF16);
  Tensor dx = bf16({N, D}), dw = bf16({F, D});
  // The operands of each GEMM: one over the joint weight, or each part with its own output
  // (forward) or output-gradient (backward) buffer, as in the model.
  struct Part {
    Tensor w, dw, y, dy;
  };
  std::vector<Part> parts;
  std::vector<int64_t> widths = joint ? std::vector<int64_t>{F} : sh.parts;
  int64_t r = 0;
  for (int64_t rows : widths) {
    parts.push_back({w.slice(0, r, r + rows), dw.slice(0, r, r + rows),
                     grads ? Tensor() : bf16({N, rows}), grads ? rnd({N, rows}, DType::BF16) : Tensor()});
    r += rows;
  }
  timed(state, [&] {
    for (size_t i = 0; i < parts.size(); ++i) {
      Part& p = parts[i];
      switch (which) {
        case LinGemm::Forward: ops::matmul(x, false, p.w, true, p.y); break;
        case LinGemm::InputGrad:
          ops::matmul(p.dy, false, p.w, false, dx, 1.0f, i == 0 ? 0.0f : 1.0f);
          break;
        case LinGemm::WeightGrad: ops::matmul(p.dy, true, x, false, p.dw); break;
      }
    }
  });
  flop_rate(state, 2.0 * N * F * D);
}

// Attention of B sequences of T tokens, Hq query / Hkv kv heads of dim hd.
struct AttnShape {
  int64_t B, T, Hq, Hkv, hd;
};
constexpr AttnShape kTinyLlama{kB, kT, kHq, kHkv, kHd};
// The kernel comparison (PyTorch SDPA, bench/peer/llama_peer.py --attention): causal,
// hd 128, T 4096, B 4, 16 heads (MHA).
constexpr AttnShape kHd128{4, 4096, 16, 16, 128};

// ragged: without the host copy of cu_seqlens (as for packed documents): cuDNN's ragged graphs;
// with it (the trainer's batches of equal rows), its dense ones.
// deterministic: cuda::set_deterministic (flash: the separate dq and dk/dv kernels, no atomics).
// mma_sync: the flash kernels on mma.sync where the wgmma ones would run.
void BM_attention(benchmark::State& state, ops::AttentionBackend be, bool backward, AttnShape sh,
                  bool ragged = false, bool deterministic = false, bool mma_sync = false) {
  if (skip(state)) return;
  ops::set_attention_backend(be);
  cuda::set_deterministic(deterministic);
  cuda::flash::set_use_wgmma(!mma_sync);
  const int64_t kB = sh.B, kT = sh.T, kN = sh.B * sh.T, kHq = sh.Hq, kHkv = sh.Hkv, kHd = sh.hd;
  Tensor q = rnd({kN, kHq, kHd}, DType::BF16), k = rnd({kN, kHkv, kHd}, DType::BF16),
         v = rnd({kN, kHkv, kHd}, DType::BF16), dout = rnd({kN, kHq, kHd}, DType::BF16);
  Tensor out = Tensor::empty(q.shape(), DType::BF16, Device::CUDA);
  Tensor lse = Tensor::empty({kHq, kN}, DType::F32, Device::CUDA);
  std::vector<int32_t> cu;
  for (int64_t b = 0; b <= kB; ++b) cu.push_back(static_cast<int32_t>(b * kT));
  Tensor hcu = Tensor::from_vector(cu, {kB + 1}), gcu = hcu.to(Device::CUDA);
  if (ragged) hcu = Tensor();
  Tensor dq = Tensor::empty(q.shape(), DType::BF16, Device::CUDA), dk = Tensor::empty(k.shape(), DType::BF16, Device::CUDA),
         dv = Tensor::empty(v.shape(), DType::BF16, Device::CUDA);
  try {
    ops::attention_forward(q, k, v, gcu, static_cast<int>(kT), out, lse, hcu);
    if (backward) {
      timed(state, [&] {
        ops::attention_backward(dout, q, k, v, out, lse, gcu, static_cast<int>(kT), dq, dk, dv, hcu);
      });
    } else {
      timed(state, [&] { ops::attention_forward(q, k, v, gcu, static_cast<int>(kT), out, lse, hcu); });
    }
  } catch (const Error& e) {
    state.SkipWithError(e.what());
  }
  ops::set_attention_backend(ops::AttentionBackend::Auto);
  cuda::set_deterministic(false);
  cuda::flash::set_use_wgmma(true);
  const double fwd = 4.0 * kB * kHq * kHd * (kT * kT / 2.0);
  flop_rate(state, (backward ? 2.5 : 1.0) * fwd);
}

// The 134M model's shapes (N 32768, d 768, 12 + 12 heads of 64) beside TinyLlama's.
constexpr int64_t kSmallN = 32768, kSmallD = 768;

// RMSNorm over [n, d] (TinyLlama's by default). Backward with residual: the model's call, dx = the
// norm's input gradient + the residual stream's gradient (4 passes over [n, d]; without it 3).
void BM_rmsnorm(benchmark::State& state, bool backward, bool residual = false, int64_t n = kN, int64_t d = kD) {
  if (skip(state)) return;
  Tensor x = rnd({n, d}, DType::BF16), w = rnd({d}, DType::BF16), y = Tensor::empty({n, d}, DType::BF16, Device::CUDA);
  Tensor rstd = Tensor::empty({n}, DType::F32, Device::CUDA), dw = Tensor::zeros({d}, DType::F32, Device::CUDA);
  Tensor res = residual ? rnd({n, d}, DType::BF16) : Tensor();
  ops::rmsnorm_forward(x, w, 1e-5, y, rstd);
  if (backward) timed(state, [&] { ops::rmsnorm_backward(x, x, w, rstd, y, dw, res); });
  else timed(state, [&] { ops::rmsnorm_forward(x, w, 1e-5, y, rstd); });
  byte_rate(state, (backward ? (residual ? 4.0 : 3.0) : 2.0) * n * d * 2);
}

// Forward: h = silu(gate) * up (3 passes over [N, F]); backward: dgate, dup written over gate and
// up from dh (5 passes), as the model calls them.
void BM_swiglu(benchmark::State& state, bool backward) {
  if (skip(state)) return;
  Tensor g = rnd({kN, kF}, DType::BF16), u = rnd({kN, kF}, DType::BF16), o = rnd({kN, kF}, DType::BF16);
  if (backward) timed(state, [&] { ops::swiglu_backward(o, g, u, g, u); });
  else timed(state, [&] { ops::swiglu_forward(g, u, o); });
  byte_rate(state, (backward ? 5.0 : 3.0) * kN * kF * 2);
}

// RoPE in place on the first `heads` heads of rows of `row_heads` heads (hd 64), positions i % t:
// TinyLlama's queries [N, Hq, hd] by default; 134M's q|k, the first 1536 of the joint projection's
// 2304 columns, in one launch (Llama::rotate_qk).
void BM_rope(benchmark::State& state, bool backward, int64_t n = kN, int64_t heads = kHq, int64_t row_heads = kHq,
             int64_t t = kT) {
  if (skip(state)) return;
  Tensor rows = rnd({n, row_heads * kHd}, DType::BF16);
  Tensor q = rows.slice(1, 0, heads * kHd).view({n, heads, kHd});
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[static_cast<size_t>(i)] = static_cast<int32_t>(i % t);
  Tensor pos = Tensor::from_vector(p, {n}).to(Device::CUDA);
  if (backward) timed(state, [&] { ops::rope_backward(q, pos, 10000.0, q); });
  else timed(state, [&] { ops::rope_forward(q, pos, 10000.0, q); });
  byte_rate(state, 2.0 * n * heads * kHd * 2);
}

// The ceiling of a kernel that reads and writes each byte once (RoPE, the RMSNorm forward): a
// device-to-device copy of [N, d] bf16 (GB/s counts both).
void BM_copy(benchmark::State& state) {
  if (skip(state)) return;
  Tensor x = rnd({kN, kD}, DType::BF16), y = Tensor::empty({kN, kD}, DType::BF16, Device::CUDA);
  timed(state, [&] { y.copy_from(x); });
  byte_rate(state, 2.0 * kN * kD * 2);
}

// AdamW over 2^27 parameters with bf16 gradients: an f32 master plus the bf16 weight copy (28
// bytes a parameter), or the master as remainders of the bf16 weights (26; optim.param_remainders).
void BM_adamw(benchmark::State& state, bool remainders) {
  if (skip(state)) return;
  const int64_t n = int64_t{1} << 27;
  Tensor g = rnd({n}, DType::BF16), w = rnd({n}, DType::BF16);
  Tensor m = Tensor::zeros({n}, DType::F32, Device::CUDA), v = Tensor::zeros({n}, DType::F32, Device::CUDA);
  ops::AdamWHyper h;
  h.lr = 1e-4;
  h.weight_decay = 0.1;
  h.step = 10;
  if (remainders) {
    Tensor r = Tensor::zeros({n}, DType::I16, Device::CUDA);
    timed(state, [&] { ops::adamw_step_remainder(w, r, g, m, v, h); });
  } else {
    Tensor p = Tensor::zeros({n}, DType::F32, Device::CUDA);
    timed(state, [&] { ops::adamw_step(p, g, m, v, h, &w); });
  }
  byte_rate(state, (remainders ? 26.0 : 28.0) * n);
}

// The gradient norm's sum of squares (before clipping; ZeroOptimizer::local_sum_squares reads the
// whole gradient buffer at ZeRO stage 0) over 2^27 bf16 gradients.
void BM_sum_squares(benchmark::State& state) {
  if (skip(state)) return;
  const int64_t n = int64_t{1} << 27;
  Tensor g = rnd({n}, DType::BF16);
  timed(state, [&] { benchmark::DoNotOptimize(ops::sum_squares(g)); });
  byte_rate(state, 2.0 * n);
}

// Cross-entropy on one LM-head chunk: 4096 rows of bf16 logits over `vocab`, every target 7;
// `passes` over the logits per call for the GB/s counter.
template <typename F>
void cross_entropy_bench(benchmark::State& state, int64_t vocab, double passes, F&& call) {
  if (skip(state)) return;
  const int64_t rows = 4096;
  Tensor logits = rnd({rows, vocab}, DType::BF16), losses = Tensor::empty({rows}, DType::F32, Device::CUDA);
  std::vector<int32_t> t(rows, 7);
  Tensor targets = Tensor::from_vector(t, {rows}).to(Device::CUDA);
  timed(state, [&] { call(logits, targets, losses); });
  byte_rate(state, passes * rows * vocab * 2);
}

void BM_cross_entropy(benchmark::State& state) {
  cross_entropy_bench(state, kV, 3.0, [](Tensor& logits, const Tensor& targets, Tensor& losses) {
    int64_t cnt = 0;
    ops::cross_entropy_forward(logits, targets, losses, &cnt);
    ops::cross_entropy_backward(logits, targets, 1.0, logits);
  });
}

// The LM head's fused loss + gradient (models/llama.cpp); GB/s counts one read of the logits and
// one write of the gradient. The gradient goes to its own buffer, not over the logits as in the
// model: in place, every call after the first would see the previous call's near-zero gradient
// instead of logits (the online max's branches and rescalings then never happen).
void BM_cross_entropy_fused(benchmark::State& state, int64_t vocab) {
  Tensor grad;
  cross_entropy_bench(state, vocab, 2.0, [&](Tensor& logits, const Tensor& targets, Tensor& losses) {
    if (!grad.defined()) grad = Tensor::empty(logits.shape(), logits.dtype(), logits.device());
    int64_t cnt = 0;
    ops::cross_entropy_forward_backward(logits, targets, 1.0 / 4096, losses, &cnt, grad);
  });
}

// Probe (eighth round, docs/performance.md): the optimiser step overlapped with the next step's
// forward. kLayers layers of InternLM2-1.8B's forward (N 16384 = B 4 x T 4096, d 2048, 16 / 8
// heads of 128, ffn 8192: RMSNorm, q/k/v/o and gate/up/down GEMMs, cuDNN attention, SwiGLU) and
// AdamW with the master as remainders over the same layers' 63M parameters each. Sequential:
// every layer's AdamW, then the forward, on one stream (as the trainer runs them). Overlapped:
// AdamW layer by layer on a second stream, the forward of layer l waiting for layer l's update
// only; overlapped_priority: the forward's stream at the device's highest priority (the block
// scheduler serves its blocks first). Measured: 26.6 / 26.5 / 26.3 ms, with 3.4 ms of AdamW (9.8
// GB at BM_adamw's 2.86 TB/s): the GEMMs and attention hold every SM, so AdamW overlaps little.
enum class OptOverlap { Sequential, Overlapped, OverlappedPriority };
void BM_adamw_forward_overlap(benchmark::State& state, OptOverlap mode) {
  if (skip(state)) return;
  constexpr int kLayers = 6;
  constexpr int64_t B = 4, T = 4096, N = B * T, D = 2048, Hq = 16, Hkv = 8, Hd = 128, F = 8192;
  const int64_t P = D * (D + 2 * Hkv * Hd) + D * D + 3 * F * D;  // per layer
  int lo = 0, hi = 0;
  IEVO_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
  cudaStream_t main_s = nullptr, side_s = nullptr;
  IEVO_CUDA_CHECK(cudaStreamCreateWithPriority(&main_s, cudaStreamNonBlocking,
                                               mode == OptOverlap::OverlappedPriority ? hi : lo));
  IEVO_CUDA_CHECK(cudaStreamCreateWithPriority(&side_s, cudaStreamNonBlocking, lo));
  {
    cuda::StreamGuard guard(main_s);
    auto bf16 = [](const Shape& s) { return Tensor::empty(s, DType::BF16, Device::CUDA); };
    Tensor w = rnd({kLayers * P}, DType::BF16), g = rnd({kLayers * P}, DType::BF16);
    Tensor r = Tensor::zeros({kLayers * P}, DType::I16, Device::CUDA);
    Tensor m = Tensor::zeros({kLayers * P}, DType::F32, Device::CUDA), v = Tensor::zeros({kLayers * P}, DType::F32, Device::CUDA);
    Tensor x = rnd({N, D}, DType::BF16), y = bf16({N, D}), rstd = Tensor::empty({N}, DType::F32, Device::CUDA);
    Tensor nw = rnd({D}, DType::BF16);
    Tensor q = bf16({N, Hq * Hd}), k = bf16({N, Hkv * Hd}), vv = bf16({N, Hkv * Hd}), o = bf16({N, Hq * Hd});
    Tensor gate = bf16({N, F}), up = bf16({N, F}), h = bf16({N, F});
    Tensor lse = Tensor::empty({Hq, N}, DType::F32, Device::CUDA);
    std::vector<int32_t> cu;
    for (int64_t b = 0; b <= B; ++b) cu.push_back(static_cast<int32_t>(b * T));
    Tensor hcu = Tensor::from_vector(cu, {B + 1}), gcu = hcu.to(Device::CUDA);
    ops::AdamWHyper hp;
    hp.lr = 1e-4;
    hp.weight_decay = 0.1;
    hp.step = 10;
    std::vector<std::unique_ptr<cuda::Event>> done;
    for (int l = 0; l < kLayers; ++l) done.push_back(std::make_unique<cuda::Event>());
    cuda::Event start;
    auto adamw = [&](int l) {
      auto part = [&](Tensor& t) { return t.slice(0, l * P, (l + 1) * P); };
      Tensor wl = part(w), rl = part(r), gl = part(g), ml = part(m), vl = part(v);
      ops::adamw_step_remainder(wl, rl, gl, ml, vl, hp);
    };
    auto layer = [&](int l) {
      // The layer's weights: consecutive views of its part of w (q, k, v, o, gate, up, down).
      int64_t at = l * P;
      auto take = [&](int64_t rows, int64_t cols) {
        Tensor t = w.slice(0, at, at + rows * cols).view({rows, cols});
        at += rows * cols;
        return t;
      };
      Tensor wq = take(Hq * Hd, D), wk = take(Hkv * Hd, D), wv = take(Hkv * Hd, D), wo = take(D, Hq * Hd);
      Tensor wg = take(F, D), wu = take(F, D), wd = take(D, F);
      ops::rmsnorm_forward(x, nw, 1e-5, y, rstd);
      ops::matmul(y, false, wq, true, q);
      ops::matmul(y, false, wk, true, k);
      ops::matmul(y, false, wv, true, vv);
      Tensor o3 = o.view({N, Hq, Hd});
      ops::attention_forward(q.view({N, Hq, Hd}), k.view({N, Hkv, Hd}), vv.view({N, Hkv, Hd}), gcu,
                             static_cast<int>(T), o3, lse, hcu);
      ops::matmul(o, false, wo, true, y);
      ops::rmsnorm_forward(y, nw, 1e-5, x, rstd);
      ops::matmul(x, false, wg, true, gate);
      ops::matmul(x, false, wu, true, up);
      ops::swiglu_forward(gate, up, h);
      ops::matmul(h, false, wd, true, y);
      ops::rmsnorm_forward(y, nw, 1e-5, x, rstd);  // keeps x's scale from layer to layer
    };
    try {
      timed(state, [&] {
        if (mode == OptOverlap::Sequential) {
          for (int l = 0; l < kLayers; ++l) adamw(l);
          for (int l = 0; l < kLayers; ++l) layer(l);
          return;
        }
        start.record(main_s);
        start.wait(side_s);
        {
          cuda::StreamGuard side(side_s);
          for (int l = 0; l < kLayers; ++l) {
            adamw(l);
            done[static_cast<size_t>(l)]->record(side_s);
          }
        }
        for (int l = 0; l < kLayers; ++l) {
          done[static_cast<size_t>(l)]->wait(main_s);
          layer(l);
        }
      });
    } catch (const Error& e) {
      state.SkipWithError(e.what());
    }
    IEVO_CUDA_CHECK(cudaStreamSynchronize(side_s));
    IEVO_CUDA_CHECK(cudaStreamSynchronize(main_s));
  }  // the tensors are freed on main_s before it is destroyed; their cached blocks go back
  allocator(Device::CUDA).empty_cache();
  IEVO_CUDA_CHECK(cudaStreamDestroy(main_s));
  IEVO_CUDA_CHECK(cudaStreamDestroy(side_s));
  state.counters["adamw_GB"] = benchmark::Counter(26.0 * kLayers * P / 1e9);
}

// Probe (session 11, docs/performance.md): what a CUDA graph would save on the 134M model, whose
// step runs at full clock and is 2.0 ms longer than its kernels' sum (650 kernels). The 12 blocks'
// forward at its shape (N 32768 = B 32 x T 1024, d 768, 12 heads of 64, ffn 2048: RMSNorm, the
// q/k/v/o and gate/up/down GEMMs, RoPE on q and k, cuDNN attention, SwiGLU, the residual adds in
// the o/down GEMMs), 12 kernels a block: launched from the stream (eager) or replayed as one
// graph captured from the same calls after a warm-up (plans and autotuning done outside it).
enum class Launch { Eager, Graph };
void BM_blocks_graph(benchmark::State& state, Launch mode) {
  if (skip(state)) return;
  constexpr int kLayers = 12;
  constexpr int64_t B = 32, T = 1024, N = B * T, D = 768, H = 12, Hd = 64, F = 2048;
  cudaStream_t s = nullptr;
  IEVO_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  {
    cuda::StreamGuard guard(s);
    auto bf16 = [](const Shape& sh) { return Tensor::empty(sh, DType::BF16, Device::CUDA); };
    std::vector<Tensor> w;  // per layer: q, k, v, o, gate, up, down, two norm weights
    for (int l = 0; l < kLayers; ++l)
      for (const Shape& sh : {Shape{D, D}, Shape{D, D}, Shape{D, D}, Shape{D, D}, Shape{F, D},
                              Shape{F, D}, Shape{D, F}, Shape{D}, Shape{D}}) {
        Tensor t = rnd(sh, DType::BF16);
        if (sh.size() == 2) ops::scale(t, 0.05);  // the residual stream stays O(1) over 12 blocks
        w.push_back(t);
      }
    Tensor x = rnd({N, D}, DType::BF16), y = bf16({N, D}), rstd = Tensor::empty({N}, DType::F32, Device::CUDA);
    Tensor q = bf16({N, D}), k = bf16({N, D}), v = bf16({N, D}), o = bf16({N, D});
    Tensor gate = bf16({N, F}), up = bf16({N, F}), h = bf16({N, F});
    Tensor lse = Tensor::empty({H, N}, DType::F32, Device::CUDA);
    std::vector<int32_t> cu, p(N);
    for (int64_t b = 0; b <= B; ++b) cu.push_back(static_cast<int32_t>(b * T));
    for (int64_t i = 0; i < N; ++i) p[static_cast<size_t>(i)] = static_cast<int32_t>(i % T);
    Tensor hcu = Tensor::from_vector(cu, {B + 1}), gcu = hcu.to(Device::CUDA);
    Tensor pos = Tensor::from_vector(p, {N}).to(Device::CUDA);
    auto blocks = [&] {
      for (int l = 0; l < kLayers; ++l) {
        const Tensor* wl = &w[static_cast<size_t>(l) * 9];
        ops::rmsnorm_forward(x, wl[7], 1e-5, y, rstd);
        ops::matmul(y, false, wl[0], true, q);
        ops::matmul(y, false, wl[1], true, k);
        ops::matmul(y, false, wl[2], true, v);
        Tensor q3 = q.view({N, H, Hd}), k3 = k.view({N, H, Hd}), o3 = o.view({N, H, Hd});
        ops::rope_forward(q3, pos, 10000.0, q3);
        ops::rope_forward(k3, pos, 10000.0, k3);
        ops::attention_forward(q3, k3, v.view({N, H, Hd}), gcu, static_cast<int>(T), o3, lse, hcu);
        ops::matmul_add(o, false, wl[3], true, x, x);  // x += o Wo^T
        ops::rmsnorm_forward(x, wl[8], 1e-5, y, rstd);
        ops::matmul(y, false, wl[4], true, gate);
        ops::matmul(y, false, wl[5], true, up);
        ops::swiglu_forward(gate, up, h);
        ops::matmul_add(h, false, wl[6], true, x, x);  // x += h Wd^T
      }
    };
    try {
      blocks();  // plans, autotuning, cuDNN graphs: outside the capture
      cuda::synchronize();
      if (mode == Launch::Graph) {
        IEVO_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
        blocks();
        IEVO_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
        IEVO_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        size_t nodes = 0;
        IEVO_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &nodes));
        state.counters["nodes"] = benchmark::Counter(static_cast<double>(nodes));
        timed(state, [&] { IEVO_CUDA_CHECK(cudaGraphLaunch(exec, s)); });
      } else {
        timed(state, blocks);
      }
    } catch (const Error& e) {
      state.SkipWithError(e.what());
    }
    IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  if (exec) IEVO_CUDA_CHECK(cudaGraphExecDestroy(exec));
  if (graph) IEVO_CUDA_CHECK(cudaGraphDestroy(graph));
  allocator(Device::CUDA).empty_cache();
  IEVO_CUDA_CHECK(cudaStreamDestroy(s));
}

using B = ops::AttentionBackend;
BENCHMARK_CAPTURE(BM_matmul, qkv_proj, kN, kD + 2 * kHkv * kHd, kD, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_matmul, mlp_up, kN, 2 * kF, kD, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_matmul, lm_head_chunk, 4096, kV, kD, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_matmul, square8192, 8192, 8192, 8192, true)->UseManualTime()->Unit(benchmark::kMillisecond);
// BM_joint_linear/<preset>_<group>_<pass>_<split|joint> for each preset's q/k/v and gate/up.
const bool g_joint_linear_registered = [] {
  const std::pair<const char*, JointShape> shapes[] = {
      {"134m_qkv", kQkv134m},   {"134m_gate_up", kGateUp134m}, {"tiny_qkv", kQkvTiny},
      {"tiny_gate_up", kGateUpTiny}, {"ilm2_qkv", kQkvIlm2},   {"ilm2_gate_up", kGateUpIlm2}};
  const std::pair<const char*, LinGemm> passes[] = {
      {"forward", LinGemm::Forward}, {"input_grad", LinGemm::InputGrad}, {"weight_grad", LinGemm::WeightGrad}};
  for (const auto& [sn, sh] : shapes)
    for (const auto& [pn, pass] : passes)
      for (bool joint : {false, true}) {
        const std::string name = std::string("BM_joint_linear/") + sn + "_" + pn + (joint ? "_joint" : "_split");
        benchmark::RegisterBenchmark(name.c_str(), BM_joint_linear, sh, pass, joint)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
  return true;
}();
BENCHMARK_CAPTURE(BM_attention, flash_fwd, B::Flash, false, kTinyLlama)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, flash_fwd_mma_sync, B::Flash, false, kTinyLlama, false, false, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, flash_bwd, B::Flash, true, kTinyLlama)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, cudnn_fwd, B::Cudnn, false, kTinyLlama)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, cudnn_bwd, B::Cudnn, true, kTinyLlama)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_flash_fwd, B::Flash, false, kHd128)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_flash_fwd_mma_sync, B::Flash, false, kHd128, false, false, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_flash_bwd, B::Flash, true, kHd128)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_flash_bwd_mma_sync, B::Flash, true, kHd128, false, false, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_flash_bwd_deterministic, B::Flash, true, kHd128, false, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_cudnn_fwd, B::Cudnn, false, kHd128)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_cudnn_bwd, B::Cudnn, true, kHd128)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_cudnnragged_fwd, B::Cudnn, false, kHd128, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, hd128_cudnnragged_bwd, B::Cudnn, true, kHd128, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_rmsnorm, fwd, false)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_rmsnorm, bwd, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_rmsnorm, bwd_residual, true, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_swiglu, fwd, false)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_swiglu, bwd, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_rope, fwd, false)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_rope, bwd, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_copy)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_rmsnorm, fwd_134m, false, false, kSmallN, kSmallD)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_rmsnorm, bwd_residual_134m, true, true, kSmallN, kSmallD)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_rope, qk_134m, false, kSmallN, 2 * kSmallD / kHd, 3 * kSmallD / kHd, 1024)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_adamw, f32_master, false)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_adamw, remainders, true)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_sum_squares)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_adamw_forward_overlap, sequential, OptOverlap::Sequential)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_adamw_forward_overlap, overlapped, OptOverlap::Overlapped)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_adamw_forward_overlap, overlapped_priority, OptOverlap::OverlappedPriority)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_blocks_graph, eager, Launch::Eager)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_blocks_graph, graph, Launch::Graph)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_cross_entropy)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_cross_entropy_fused, v32000, 32000)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_cross_entropy_fused, v92544, 92544)->UseManualTime()->Unit(benchmark::kMillisecond);
#else
void BM_no_cuda(benchmark::State& state) {
  for (auto _ : state) {
  }
  state.SkipWithError("built without CUDA");
}
BENCHMARK(BM_no_cuda);
#endif

}  // namespace

BENCHMARK_MAIN();
