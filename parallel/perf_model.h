// `ievo plan`'s step-time estimate: an analytic model of one optimiser step for a model, batch and
// layout (dp x tp x pp, ZeRO stage) on given hardware. Per GPU, in seconds:
//
//   compute   = F_mm / (peak * gemm_eff) + F_attn / (peak * attn_eff) + bytes_elem / (mem_bw * mem_eff)
//       F_mm   = 6 * N_matmul * tokens / (dp*tp*pp)          (ModelConfig::flops_per_token's terms)
//       F_attn = 6 * L * d * T * tokens / (dp*tp*pp)
//       model.checkpointing full recomputes each block's forward: the block terms * 4/3 (the LM head
//       is not recomputed); selective recomputes only memory-bound kernels (no FLOPs added)
//       bytes_elem: the memory-bound kernels (norms, RoPE, SwiGLU, residual adds, casts): per token
//       and layer 3 * (10 d + 2 q + 2 kv + 3 F) elements of the compute dtype (forward once,
//       backward twice), plus the fused LM head's fp32 logits chunk: 16 V bytes per token;
//       full adds one more forward, (10 d + 2 q + 2 kv + 3 F); selective adds the two RMSNorms
//       and the SwiGLU product it recomputes, (4 d + 3 F) (read x, write n; read gate/up, write h)
//   with kernel throughputs measured on the GPU (bench_gpu_kernels, `ievo plan --kernels-json`):
//       GEMMs at the measured rate of the model's shapes; attention as F_fwd / fwd rate (twice
//       with full recomputation) + 2.5 F_fwd / bwd rate, F_fwd = a third of 6 L d T per token (the
//       bench's convention: causal FLOPs, the backward counted as 2.5x the forward); the
//       memory-bound kernels and the optimizer at the measured bandwidth
//   tp        = per micro-batch and layer 4 all-reduces (2 forward, 2 backward; Megatron without
//               sequence parallelism) of B*T*d elements, ring traffic 2(t-1)/t of each, over intra_bw
//   p2p       = pp > 1: per micro-batch one activation B*T*d forward and its gradient backward
//   bubble    = pp > 1: (P-1)/(m*V + P-1) of the pipeline's time (m micro-batches per step and
//               replica, V virtual stages); the pipelined part is divided by (1 - bubble)
//   dp comm   = bytes per rank of the ZeRO stage's collectives (ring algorithms; N = dp, Ψ/(tp*pp)
//               parameters per model replica slice, b_w / b_g bytes of weights / gradients):
//                 stage 0  all-reduce gradients              2(N-1)/N Ψ b_g          last backward
//                 stage 1  reduce-scatter g                  (N-1)/N Ψ b_g           last backward
//                          + all-gather w after the step     (N-1)/N Ψ b_w           after
//                 stage 2  reduce-scatter g per micro-batch   m (N-1)/N Ψ b_g         backward
//                          + all-gather w after the step     (N-1)/N Ψ b_w           after
//                 stage 3  gather w forward + backward, reduce-scatter g, per micro-batch:
//                          m (N-1)/N Ψ (2 b_w + b_g)                                 forward+backward
//               over intra_bw when the dp group is inside one node (tp*dp <= gpus_per_node), else
//               inter_bw. ievo's CUDA collectives run on their own stream beside the compute
//               (parallel/zero.h): stages 0-1 reduce each bucket once the last micro-batch's
//               backward has written it, stage 2 every micro-batch's buckets, stage 3 also gathers
//               the next layer ahead. The bytes of a window are hidden up to comm_overlap x its
//               time (last backward: the backward / m; backward: 2/3 of the compute; stage 3 the
//               whole compute); the rest, and "after", is exposed. comm_overlap 0: nothing hides
//               (the CPU/MPI path, whose collectives are synchronous)
//   optimizer = AdamW over this rank's master shard: (24 + 3 b_g + b_w) bytes per parameter
//               (fp32 master, m, v read and written; gradient read for the norm, the update and
//               zeroing; the low-precision weight copy written) at mem_bw * mem_eff
//   step      = (compute + tp + p2p) / (1 - bubble) + exposed dp comm + optimizer
//   MFU       = flops_per_token(T) * tokens / (step * GPUs * peak)
//
// Calibration from `ievo bench --json` of the same model on one GPU replaces the FLOP rates: the
// measured forward + backward time gives an achieved FLOP/s for the executed FLOPs (memory-bound
// kernels included), and the measured optimizer phase scales with the parameters per rank.
#pragma once
#include <string>

#include "models/model_config.h"
#include "runtime/dtype.h"

namespace ievo {

struct PerfHardware {
  std::string name = "H100 SXM (assumed)";
  double peak_flops = 989e12;     // dense matmul peak of one GPU for the compute dtype
  double gemm_efficiency = 0.6;   // achieved / peak of the GEMMs
  double attn_efficiency = 0.4;   // achieved / peak of attention (flash / cuDNN)
  double mem_bw = 3.35e12;        // device memory bytes/s
  double mem_efficiency = 0.7;    // achieved / mem_bw of memory-bound kernels
  double intra_bw = 360e9;        // collective bus bandwidth per GPU inside a node (NVLink)
  double inter_bw = 45e9;         // ... across nodes (400 Gb/s InfiniBand per GPU)
  int gpus_per_node = 8;
  double comm_overlap = 0;        // fraction of a compute window that hides dp collectives
  // Kernel throughputs measured on this GPU (bench_gpu_kernels): > 0 replaces peak x efficiency.
  double kernel_gemm_flops = 0;      // GEMMs, FLOP/s (the model's mix of shapes)
  double kernel_attn_fwd_flops = 0;  // attention forward, causal FLOP/s
  double kernel_attn_bwd_flops = 0;  // attention backward, FLOP/s counting 2.5x the forward's FLOPs
  double kernel_mem_bw = 0;          // memory-bound kernels, achieved bytes/s
  // Calibration (ievo bench): > 0 replaces the FLOP rates and the optimizer estimate.
  double measured_flops_per_s = 0;      // executed FLOPs / (forward + backward) of the bench
  double measured_optimizer_s = 0;      // optimizer phase of the bench
  int64_t measured_params_per_rank = 0;  // parameters the bench's optimizer updated
};

// The defaults for a compute dtype: H100 SXM dense bf16/fp16 989 TFLOP/s; fp32 (no TF32) 67.
PerfHardware default_hardware(DType compute);

struct PerfInput {
  ModelConfig model;
  int64_t seq_len = 0, micro_batch = 1, global_batch = 1;
  int dp = 1, tp = 1, pp = 1, virtual_stages = 1;
  int zero_stage = 0;
  DType compute = DType::BF16;
  std::string recompute = "none";  // none | full | selective
  bool cuda = true;                 // run.device: cuda (the plan's default comm_overlap is 1, else 0)
};

struct PerfEstimate {
  double model_flops = 0;          // per step, all GPUs, without recomputation
  double executed_flops_gpu = 0;   // per step and GPU, with recomputation
  double gemm_s = 0, attn_s = 0, elementwise_s = 0, compute_s = 0;
  double tp_s = 0, p2p_s = 0;
  double bubble = 0, bubble_s = 0;
  double dp_bytes = 0, dp_s = 0, dp_exposed_s = 0;
  double optimizer_s = 0;
  double step_s = 0, tokens_per_s = 0, mfu = 0;
  int64_t micro_batches = 0;       // per step and model replica
  bool dp_inter_node = false;
};

PerfEstimate estimate_step(const PerfInput& in, const PerfHardware& hw);
std::string format_estimate(const PerfInput& in, const PerfHardware& hw, const PerfEstimate& e);

}  // namespace ievo
