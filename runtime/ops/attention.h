// Causal self-attention with grouped-query heads over packed variable-length sequences.
//   q [N, Hq, hd], k/v [N, Hkv, hd], out [N, Hq, hd]; Hq % Hkv == 0, query head h uses kv head
//   h / (Hq / Hkv). cu_seqlens [S+1] i32: sequence s is tokens [cu[s], cu[s+1]) and attends only
//   within itself (causally). A batch of B rows of length T is cu = [0, T, 2T, ..., B*T].
//   scale = 1/sqrt(hd). lse [Hq, N] f32 (f64 for f64 inputs): log-sum-exp of the scaled scores of
//   each query, saved for the backward.
//   backward: given dout, q, k, v, out, lse -> dq, dk, dv (written, not accumulated).
//   q, k, v, dq, dk, dv (and on the CPU every [N, H, hd] tensor) may have any row stride, each
//   contiguous within a token: the model passes column slices of its joint QKV projection's
//   output and of the gradient buffer that its backward GEMMs read as one. cuDNN reads and writes
//   them in place when q/dq, k/dk and v/dv have equal strides; the other CUDA kernels work on
//   contiguous copies.
// Implementations: CPU reference; CUDA: cuDNN SDPA and ievo's flash kernel (select with
// set_attention_backend).
#pragma once
#include <string>

#include "runtime/tensor.h"

namespace ievo::ops {

enum class AttentionBackend { Auto, Flash, Cudnn };
void set_attention_backend(AttentionBackend b);
AttentionBackend attention_backend();

// cu_seqlens_host (optional, with cu_seqlens on the device): the same values on the host. The
// CUDA backend then validates them there instead of reading them back (no synchronisation) and
// uses cuDNN's dense layout when all sequences have the same length.
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                       int max_seqlen, Tensor& out, Tensor& lse,
                       const Tensor& cu_seqlens_host = Tensor());
void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens,
                        int max_seqlen, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor& cu_seqlens_host = Tensor());

}  // namespace ievo::ops
