#include "parallel/perf_model.h"

#include <algorithm>
#include <cstdio>

#include "runtime/error.h"

namespace ievo {

PerfHardware default_hardware(DType compute) {
  PerfHardware hw;
  if (compute == DType::F32 || compute == DType::F64) {
    hw.name = "H100 SXM fp32 (no TF32, assumed)";
    hw.peak_flops = 67e12;
  }
  return hw;
}

PerfEstimate estimate_step(const PerfInput& in, const PerfHardware& hw) {
  const ModelConfig& m = in.model;
  IEVO_CHECK(in.dp >= 1 && in.tp >= 1 && in.pp >= 1 && in.virtual_stages >= 1 && in.seq_len > 0 &&
                 in.micro_batch > 0 && in.global_batch % (in.micro_batch * in.dp) == 0,
             "perf model: global batch ", in.global_batch, " must be a multiple of micro batch ",
             in.micro_batch, " x dp ", in.dp);
  PerfEstimate e;
  const double T = static_cast<double>(in.seq_len), B = static_cast<double>(in.micro_batch);
  const double d = static_cast<double>(m.hidden_size), L = static_cast<double>(m.num_layers);
  const double V = static_cast<double>(m.vocab_size), F = static_cast<double>(m.ffn_hidden_size);
  const double q = static_cast<double>(m.q_dim()), kv = static_cast<double>(m.kv_dim());
  const double gpus = static_cast<double>(in.dp) * in.tp * in.pp;
  const double tokens = static_cast<double>(in.global_batch) * T;
  const double bc = static_cast<double>(dtype_size(in.compute));  // weights and gradients
  e.micro_batches = in.global_batch / (in.micro_batch * in.dp);

  // FLOPs.
  const double head = V * d, n_mm = static_cast<double>(m.num_matmul_params());
  const double mm_block = 6.0 * (n_mm - head) * tokens, mm_head = 6.0 * head * tokens;
  const double attn = 6.0 * L * d * T * tokens;
  e.model_flops = mm_block + mm_head + attn;
  const double rc = in.recompute == "full" ? 4.0 / 3.0 : 1.0;
  const double mm_exec = (mm_block * rc + mm_head) / gpus, attn_exec = attn * rc / gpus;
  e.executed_flops_gpu = mm_exec + attn_exec;

  // Compute per GPU.
  const double pass = 10 * d + 2 * q + 2 * kv + 3 * F;  // one forward's elements per token and layer
  const double passes = in.recompute == "full" ? 4.0 : 3.0;
  const double extra = in.recompute == "selective" ? 4 * d + 3 * F : 0.0;
  const double elem_bytes = ((passes * pass + extra) * bc * L + 16.0 * V) * tokens / gpus;
  const double mem_rate = hw.kernel_mem_bw > 0 ? hw.kernel_mem_bw : hw.mem_bw * hw.mem_efficiency;
  if (hw.measured_flops_per_s > 0) {
    e.compute_s = e.executed_flops_gpu / hw.measured_flops_per_s;  // memory-bound kernels included
    e.gemm_s = e.compute_s * mm_exec / e.executed_flops_gpu;
    e.attn_s = e.compute_s - e.gemm_s;
  } else {
    e.gemm_s = mm_exec / (hw.kernel_gemm_flops > 0 ? hw.kernel_gemm_flops : hw.peak_flops * hw.gemm_efficiency);
    if (hw.kernel_attn_fwd_flops > 0 && hw.kernel_attn_bwd_flops > 0) {
      const double fwd = attn / 3.0 / gpus;  // causal forward FLOPs per GPU
      e.attn_s = fwd * (in.recompute == "full" ? 2.0 : 1.0) / hw.kernel_attn_fwd_flops +
                 2.5 * fwd / hw.kernel_attn_bwd_flops;
    } else {
      e.attn_s = attn_exec / (hw.peak_flops * hw.attn_efficiency);
    }
    e.elementwise_s = elem_bytes / mem_rate;
    e.compute_s = e.gemm_s + e.attn_s + e.elementwise_s;
  }

  // Tensor parallelism: 4 all-reduces of B*T*d per layer and micro-batch (layers of this stage).
  const double mb = static_cast<double>(e.micro_batches);
  if (in.tp > 1) {
    const double ring = 2.0 * (in.tp - 1) / in.tp;
    e.tp_s = 4.0 * ring * B * T * d * bc * (L / in.pp) * mb / hw.intra_bw;
  }
  // Pipeline: activations across each stage boundary, and the bubble.
  if (in.pp > 1) {
    const bool pp_inter = static_cast<int64_t>(in.tp) * in.dp * in.pp > hw.gpus_per_node;
    e.p2p_s = 2.0 * B * T * d * bc * mb / (pp_inter ? hw.inter_bw : hw.intra_bw);
    e.bubble = (in.pp - 1.0) / (mb * in.virtual_stages + in.pp - 1.0);
  }
  const double pipelined = e.compute_s + e.tp_s + e.p2p_s;
  const double total_pipe = pipelined / (1.0 - e.bubble);
  e.bubble_s = total_pipe - pipelined;

  // Data parallelism (ZeRO).
  const double psi = static_cast<double>(m.num_params()) / (in.tp * in.pp);
  const double N = in.dp, frac = (N - 1.0) / N;
  // Bytes by when they can run: beside the last micro-batch's backward (stages 0-1 reduce a bucket
  // once its last gradient is written), beside every micro-batch's compute (stages 2-3), or after
  // the backward with nothing to hide behind.
  double during_last = 0, during = 0, after = 0;
  switch (in.zero_stage) {
    case 0: during_last = 2.0 * frac * psi * bc; break;
    case 1: during_last = frac * psi * bc; after = frac * psi * bc; break;
    case 2: during = mb * frac * psi * bc; after = frac * psi * bc; break;
    default: during = mb * frac * psi * (2.0 * bc + bc); break;
  }
  e.dp_bytes = during_last + during + after;
  e.dp_inter_node = static_cast<int64_t>(in.tp) * in.dp > hw.gpus_per_node;
  const double bw = e.dp_inter_node ? hw.inter_bw : hw.intra_bw;
  e.dp_s = e.dp_bytes / bw;
  // Windows: the backward is 2/3 of the compute; stage 3 also prefetches in the forward.
  const double backward_s = e.compute_s * 2.0 / 3.0;
  const double window = in.zero_stage == 3 ? e.compute_s : backward_s;
  e.dp_exposed_s = after / bw + std::max(0.0, during_last / bw - hw.comm_overlap * backward_s / mb) +
                   std::max(0.0, during / bw - hw.comm_overlap * window);

  // Optimizer over this rank's shard.
  const double shard = in.zero_stage >= 1 ? psi / N : psi;
  const bool mixed = in.compute != DType::F32 && in.compute != DType::F64;
  if (hw.measured_optimizer_s > 0 && hw.measured_params_per_rank > 0)
    e.optimizer_s = hw.measured_optimizer_s * shard / static_cast<double>(hw.measured_params_per_rank);
  else
    e.optimizer_s = shard * (24.0 + 3.0 * bc + (mixed ? bc : 0.0)) / mem_rate;

  e.step_s = total_pipe + e.dp_exposed_s + e.optimizer_s;
  e.tokens_per_s = tokens / e.step_s;
  e.mfu = e.model_flops / (e.step_s * gpus * hw.peak_flops);
  return e;
}

std::string format_estimate(const PerfInput& in, const PerfHardware& hw, const PerfEstimate& e) {
  std::string s;
  char line[320];
  auto add = [&](const char* fmt, auto... args) {
    std::snprintf(line, sizeof line, fmt, args...);
    s += line;
  };
  auto ms = [](double x) { return x * 1e3; };
  add("step time (estimate): %s, dp %d x tp %d x pp %d, ZeRO-%d, %lld micro-batches of %lld x %lld "
      "per replica\n",
      hw.name.c_str(), in.dp, in.tp, in.pp, in.zero_stage, static_cast<long long>(e.micro_batches),
      static_cast<long long>(in.micro_batch), static_cast<long long>(in.seq_len));
  if (hw.measured_flops_per_s > 0)
    add("  compute                      %10.2f ms  %.2f TFLOP per GPU at the measured %.1f TFLOP/s "
        "(ievo bench)\n",
        ms(e.compute_s), e.executed_flops_gpu / 1e12, hw.measured_flops_per_s / 1e12);
  else {
    if (hw.kernel_gemm_flops > 0)
      add("  GEMMs                        %10.2f ms  %.1f TFLOP/s measured\n", ms(e.gemm_s),
          hw.kernel_gemm_flops / 1e12);
    else
      add("  GEMMs                        %10.2f ms  %.1f TFLOP/s peak x %.2f\n", ms(e.gemm_s),
          hw.peak_flops / 1e12, hw.gemm_efficiency);
    if (hw.kernel_attn_fwd_flops > 0 && hw.kernel_attn_bwd_flops > 0)
      add("  attention                    %10.2f ms  %.1f / %.1f TFLOP/s measured (fwd / bwd)\n",
          ms(e.attn_s), hw.kernel_attn_fwd_flops / 1e12, hw.kernel_attn_bwd_flops / 1e12);
    else
      add("  attention                    %10.2f ms  x %.2f\n", ms(e.attn_s), hw.attn_efficiency);
    if (hw.kernel_mem_bw > 0)
      add("  memory-bound kernels         %10.2f ms  %.0f GB/s measured\n", ms(e.elementwise_s),
          hw.kernel_mem_bw / 1e9);
    else
      add("  memory-bound kernels         %10.2f ms  %.0f GB/s x %.2f\n", ms(e.elementwise_s),
          hw.mem_bw / 1e9, hw.mem_efficiency);
  }
  if (in.tp > 1) add("  tensor-parallel all-reduces  %10.2f ms\n", ms(e.tp_s));
  if (in.pp > 1) {
    add("  pipeline p2p                 %10.2f ms\n", ms(e.p2p_s));
    add("  pipeline bubble              %10.2f ms  (P-1)/(m*V+P-1) = %.3f\n", ms(e.bubble_s), e.bubble);
  }
  if (in.dp > 1)
    add("  dp collectives               %10.2f ms  exposed of %.2f ms: %.1f MiB per rank over %s "
        "%.0f GB/s\n",
        ms(e.dp_exposed_s), ms(e.dp_s), e.dp_bytes / 1048576.0,
        e.dp_inter_node ? "inter-node" : "intra-node",
        (e.dp_inter_node ? hw.inter_bw : hw.intra_bw) / 1e9);
  add("  optimizer                    %10.2f ms\n", ms(e.optimizer_s));
  add("  step                         %10.2f ms  = %.0f tokens/s, MFU %.1f%% (%.0f TFLOP/s peak)\n",
      ms(e.step_s), e.tokens_per_s, 100.0 * e.mfu, hw.peak_flops / 1e12);
  return s;
}

}  // namespace ievo
