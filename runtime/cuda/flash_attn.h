// ievo's FlashAttention-2-style kernels for bf16 and fp16 with head dim 64 or 128 (tensor cores through
// mma.sync m16n8k16, fp32 accumulation), causal, grouped-query, over packed sequences.
// Layouts as in ops/attention.h: q/out [N, Hq, hd], k/v [N, Hkv, hd], lse [Hq, N] f32.
//   forward: one block (4 warps x 16 query rows) per (64-query tile, sequence, query head); key
//     tiles of 64 up to the diagonal, online softmax in registers (base-2 exponentials), lse saved.
//   backward (deterministic, no atomics): D = rowsum(dO * O) is given;
//     dq: one block per (64-query tile, sequence, query head), key tiles of 32 up to the diagonal;
//     dk/dv: one block per (64-key tile, sequence, kv head), looping over the group's query heads
//     and 32-query tiles from the diagonal to the end of the sequence, in a fixed order.
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
void forward(const Params& p, void* out, float* lse, cudaStream_t s);
void backward(const Params& p, const void* dout, const float* lse, const float* delta, void* dq,
              void* dk, void* dv, cudaStream_t s);

}  // namespace ievo::cuda::flash
