// ievo's flash attention kernels for bf16 and fp16 with head dim 64 or 128 (tensor cores through
// mma.sync m16n8k16 or, on Hopper, wgmma; fp32 accumulation), causal, grouped-query, over packed
// sequences.
// Layouts as in ops/attention.h: q/out [N, Hq, hd], k/v [N, Hkv, hd], lse [Hq, N] f32.
//   forward: one block (4 warps x 32 query rows) per (128-query tile, sequence, query head); key
//     tiles of 64 up to the diagonal, double-buffered with cp.async, online softmax in registers
//     (base-2 exponentials), the mask only on tiles that cross the diagonal; lse saved.
//   backward: D = rowsum(dO * O) is given.
//     fused (the default): one block (8 warps x 16 keys) per (128-key tile, sequence, kv head),
//       looping over the group's query heads and 64-query tiles from the diagonal to the end;
//       dK, dV in registers, dQ added into an fp32 workspace with atomics (then scaled and
//       rounded by a small kernel): FlashAttention-2's design, not bit-reproducible run to run.
//     deterministic (cuda::deterministic(), or no workspace given): no atomics, two kernels:
//       dq: one block per (64-query tile, sequence, query head), key tiles of 32 up to the diagonal;
//       dk/dv: one block per (64-key tile, sequence, kv head), looping over the group's query heads
//       and 32-query tiles from the diagonal to the end of the sequence, in a fixed order.
//   On Hopper (a binary with an sm_90a image; see use_wgmma) the forward and the fused backward
//   run as warpgroup-MMA (wgmma) kernels instead, same tiling by 128 queries / 128 keys:
//     forward: 2 warpgroups x 64 query rows, K/V tiles of 128 in wgmma's 128B-swizzled layout,
//       S = Q K^T from shared memory, P from registers for P V, the softmax of one tile overlapped
//       with the previous tile's P V (FlashAttention-3's intra-warpgroup pipelining);
//     backward: 2 warpgroups x 64 keys; S^T, dP^T from shared memory, dV += P^T dO and
//       dK += dS^T Q with P^T, dS^T in registers, dQ = dS K (dS^T through shared memory) added
//       with atomics, split between the warpgroups by head-dim columns at hd 128.
//   P and dS are rounded to the element type for the second matrix product of each pair, as in
//   FA2 (fp16: P in [0, 1] keeps 11 bits; dS, like the gradients, relies on the loss scale).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ievo::cuda::flash {

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* cu;  // device [S+1]
  int num_seqs, max_seqlen, n_tokens, hq, hkv, hd;
  float scale;
  bool fp16 = false;  // element type of q/k/v/out and the gradients: f16, else bf16
};

bool supported(int hd);  // 64 or 128 (bf16 or f16)
// The forward's Hopper kernel (wgmma, used when this binary has an sm_90a image for the GPU);
// set_use_wgmma(false) selects the mma.sync kernel (tests compare both with the CPU).
bool wgmma_available();
void set_use_wgmma(bool on);
bool use_wgmma();
void forward(const Params& p, void* out, float* lse, cudaStream_t s);
// dq_acc: an fp32 workspace of n_tokens * hq * hd floats selects the fused kernel (dQ added with
// atomics: fast, not bit-reproducible); nullptr selects the deterministic dq and dk/dv kernels.
void backward(const Params& p, const void* dout, const float* lse, const float* delta, void* dq,
              void* dk, void* dv, float* dq_acc, cudaStream_t s);
size_t backward_workspace(const Params& p);  // bytes of dq_acc

}  // namespace ievo::cuda::flash
