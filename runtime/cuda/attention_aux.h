// Small attention helpers shared by the CUDA attention dispatcher (ops/attention.cu) and the
// cuDNN path (cuda/cudnn_attention.cpp); defined in ops/attention.cu.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ievo::cuda::attn {

// From cu_seqlens [S+1] (device), for s < P (P >= S: sequences padded with empty ones):
// seq_len[s] = cu[s+1] - cu[s] (0 for s >= S); off[i][s] = cu[min(s, S)] * mul[i] for s <= P
// and each of the kOffsets offset arrays (int64 if off64, else int32).
constexpr int kOffsets = 4;
struct OffsetMuls {
  int64_t v[kOffsets];
};
struct OffsetPtrs {
  void* v[kOffsets];
};
void build_ragged_aux(const int32_t* cu, int num_seqs, int padded_seqs, OffsetMuls mul, bool off64,
                      int32_t* seq_len, OffsetPtrs off, cudaStream_t s);
// Padded stats [S, H, smax] <-> packed lse [H, N] (positions past a sequence's end untouched).
void padded_to_packed(const float* stats, const int32_t* cu, int num_seqs, int heads, int smax,
                      int n_tokens, float* lse, cudaStream_t s);
void packed_to_padded(const float* lse, const int32_t* cu, int num_seqs, int heads, int smax,
                      int n_tokens, float* stats, cudaStream_t s);

}  // namespace ievo::cuda::attn
