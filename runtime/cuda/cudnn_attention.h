// cuDNN SDPA (cudnn-frontend graph API) for causal GQA over packed sequences, bf16 or fp16:
// ragged Q/K/V/O (THD layout through ragged offsets) with per-sequence lengths (padding mask),
// causal top-left band, fp32 statistics kept in a padded [S, Hq, smax] buffer and converted
// to/from ievo's packed lse [Hq, N]. Built graphs are cached by shape. Only compiled when the
// frontend headers are found (IEVO_HAVE_CUDNN_FRONTEND); see runtime/CMakeLists.txt.
#pragma once
#include <cstdint>
#include <string>

#include "runtime/tensor.h"

namespace ievo::cuda::cudnn_attn {

// cuDNN loads, is >= 9.0 and the GPU is sm_90+ (ragged layouts); the reason otherwise.
bool usable(std::string* why = nullptr);
bool supports_head_dim(int64_t hd);  // multiple of 8, <= 128

// q, k, v, dq, dk, dv: any row stride (contiguous within a token), dq/dk/dv the strides of
// q/k/v; out, dout, lse packed. cu: device cu_seqlens [num_seqs + 1]. uniform_len > 0: every
// sequence is that long (known on the host), so the dense graph may be used; 0: unknown or
// ragged.
void forward(const Tensor& q, const Tensor& k, const Tensor& v, const int32_t* cu, int num_seqs,
             int max_seqlen, int uniform_len, Tensor& out, Tensor& lse);
void backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
              const Tensor& out, const Tensor& lse, const int32_t* cu, int num_seqs,
              int max_seqlen, int uniform_len, Tensor& dq, Tensor& dk, Tensor& dv);

}  // namespace ievo::cuda::cudnn_attn
