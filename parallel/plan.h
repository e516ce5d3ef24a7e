// `ievo plan`: memory per rank for a model, precision, data-parallel size and ZeRO stage, before
// anything is allocated; and the inference side (weights + KV cache) of the same model.
//
// Model states per rank (ZeRO paper, Rajbhandari et al. 2020, §3: Ψ parameters, N = dp ranks):
//   mixed precision (bf16 weights and gradients, fp32 master weights + Adam m, v: K = 12):
//     stage 0: 2Ψ + 2Ψ + 12Ψ = 16Ψ      stage 1: 2Ψ + 2Ψ + 12Ψ/N
//     stage 2: 2Ψ + (2 + 12)Ψ/N          stage 3: (2 + 2 + 12)Ψ/N = 16Ψ/N
//   the same with the master kept as 16-bit remainders beside the bf16 weights
//   (optim.param_remainders: K = 2 + 4 + 4 = 10): 14Ψ at stage 0, ..., 14Ψ/N at stage 3
//   fp32 (the weights are the master weights, no second copy: params 4Ψ, grads 4Ψ, K = 8):
//     stage 0: 4Ψ + 4Ψ + 8Ψ = 16Ψ        stage 1: 4Ψ + 4Ψ + 8Ψ/N
//     stage 2: 4Ψ + (4 + 8)Ψ/N           stage 3: (4 + 4 + 8)Ψ/N = 16Ψ/N
// The exact numbers come from the bucket layout ZeroOptimizer uses (parallel/zero.h), which adds
// alignment padding (64 elements per tensor, buckets rounded to N*64).
//
// Activations (estimate, per micro-batch of n = micro_batch_size x seq_len tokens, b bytes per
// element of the compute dtype, statistics in fp32):
//   one block keeps  n·(4d + 2q + 2kv + 3F)·b + n·(2 + H)·4      (x, norms, q/k/v, attention,
//                                                                 residual, gate/up/silu·up)
//   checkpointing none: L blocks' worth; full: L·n·d·b (block inputs) + one block's worth;
//   selective (models/llama.h: the two RMSNorm outputs and the SwiGLU product are dropped):
//   L·(block − n·(2d + F)·b) + n·(2d + F)·b (the block whose backward runs has them back);
//   plus the larger of the backward's temporaries of one block n·(2q + 2kv + d)·b (dout, dq, dk,
//   dv, dx; the other gradients are written over the activations they replace) and the head's
//   3·n·d·b + 2·min(n, 1024)·V·4 (one chunk of fp32 logits and their gradient; the head runs
//   before the blocks' backward), and the embedding n·d·b.
// Transient: stage 3 gathers one layer's weights at a time (the largest counts); stages 2-3 hold
// the gradient buckets of the layers whose backward is running.
//
// Tensor and sequence parallelism (parallel/tensor_parallel.h; T = tensor, S = Ulysses ranks):
// Ψ is this rank's parameters, param_specs(c, shard): 1/T of every split tensor (q/k/v, o,
// gate/up/down, embedding, LM head; key/value heads: Hkv/T each, or the one head a rank's queries
// use when T > Hkv) plus the whole replicated norms; the data-parallel group (dp, S included
// under Ulysses) shards them by ZeRO as above. Activations follow the model's BlockActs with Nr tokens inside
// the tensor-parallel regions (N, or N/S under Ulysses) and n in the residual stream (N, N/T
// under Megatron SP, N/S under Ulysses):
//   block  (2·n·d + 2·Nr·d + Nr·(2q/T + 2kv_T + 3F/T) [+ Nr·q/T Ulysses' gathered output])·b
//          + (2·n + Nr·H/T)·4;   selective drops Nr·(2d + F/T)·b;   full keeps n·d·b per layer;
//   the larger of the backward temporaries Nr·(2q/T + 2kv_T)·b + n·d·b and the head
//   (2·Nr + n)·d·b + 2·min(Nr, chunk)·(V/T)·4 (chunk: the LM head's tokens at once,
//   models/llama.h); embedding Nr·d·b.   (T = S = 1: the formulas above.)
//
// Inference: weights Ψ·w bytes; KV cache per token 2·L·kv_heads·head_dim·c bytes (K and V of every
// layer), the arithmetic LMDeploy and vLLM users do to size a server.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/llama.h"
#include "models/model_config.h"
#include "models/shard.h"
#include "parallel/tensor_parallel.h"
#include "parallel/zero.h"
#include "runtime/dtype.h"

namespace ievo {

struct PlanInput {
  ModelConfig model;
  int dp = 1;
  ZeroConfig zero;
  DType compute = DType::F32;      // F32 (fp32 training) or BF16/F16 (mixed precision)
  int64_t micro_batch_size = 1, seq_len = 0;
  Recompute recompute = Recompute::None;  // model.checkpointing (recompute_mode())
  int64_t head_chunk_tokens = 0;           // model.head_chunk_tokens (0: Llama's default)
  int tp = 1;                      // parallel.tensor T: the plan is for tensor rank 0's slices
  SequenceParallel sequence = SequenceParallel::None;  // parallel.sequence
  int sp = 1;                      // Ulysses ranks S (parallel.sequence_size, a factor of dp)
  // Pipeline parallelism (parallel/pipeline_schedule.h): the plan is then for stage 0 (the
  // embedding and, in 1F1B, the most micro-batches in flight: min(P, m)); the bubble
  // (P-1)/(m*V+P-1) is reported for m = micro_batches per step.
  int pp = 1, virtual_stages = 1;
  std::string schedule = "1f1b";          // gpipe | 1f1b | interleaved
  std::vector<int64_t> pipeline_layers;   // parallel.pipeline_layers; empty: balanced
  int64_t micro_batches = 1;              // per step and pipeline (gradient accumulation)
  double gpu_mem_gib = 80;
  double infer_weight_bytes = 2;   // bytes per weight for inference (bf16: 2, int8: 1, int4: 0.5)
  double infer_kv_bytes = 2;       // bytes per KV-cache element
};

struct Plan {
  int64_t psi = 0;                  // parameters Ψ of this rank (all of them when T = 1)
  int64_t psi_global = 0;           // the whole model's parameters
  int64_t sharded = 0, replicated = 0;  // this rank's Ψ: slices of split tensors + whole ones
  ZeroMemory exact;                 // per rank, from the layout
  ZeroMemory formula;               // per rank, the ZeRO paper's formula (no padding)
  int64_t padding_elements = 0;     // full_numel - Ψ
  int64_t transient_params = 0, transient_grads = 0;
  int64_t activations = 0;
  // Pipeline (pp > 1): blocks per virtual stage, stage 0's chunks, micro-batch chunks it holds
  // at most (the schedule's simulation), the bubble formula and the simulated one.
  std::vector<int64_t> pipeline_split;
  ModelShard pipeline_stage0;
  int in_flight = 1;
  double bubble = 0, bubble_simulated = 0;
  int64_t overhead = 0;             // CUDA context, cuBLAS workspaces (an allowance)
  int64_t total = 0;
  bool fits = false;
  // Inference.
  double infer_weights = 0, kv_per_token = 0;
  int64_t kv_tokens_that_fit = 0;
};

// model.checkpointing: "none" | "selective" | "full" (anything else is an error naming the key).
Recompute recompute_mode(const std::string& checkpointing);
const char* recompute_name(Recompute r);

// The formula rows of the table above, in bytes.
ZeroMemory zero_formula(int64_t psi, int dp, int stage, DType compute, bool param_remainders = false);
Plan make_plan(const PlanInput& in);
std::string format_plan(const PlanInput& in, const Plan& p);
// "fp32" 4, "bf16"/"fp16" 2, "int8"/"fp8" 1, "int4" 0.5; anything else is an error naming `what`.
double bytes_per_element(const std::string& name, const char* what);

}  // namespace ievo
