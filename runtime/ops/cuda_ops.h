// CUDA implementations of the ops, behind the same calls: each ops/<family>.cpp dispatches here
// when its tensors live on the GPU (only in builds with IEVO_CUDA). Semantics are those of the
// public declarations in ops/<family>.h; the CUDA side defines these in ops/<family>.cu.
#pragma once
#ifdef IEVO_CUDA
#include "runtime/ops/adamw.h"
#include "runtime/ops/attention.h"
#include "runtime/tensor.h"

namespace ievo::ops::cuda {

void matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
            float beta);
void matmul_add(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c,
                Tensor& d);

void fill(Tensor& x, double value);
void axpy(double alpha, const Tensor& x, Tensor& y);
void scale(Tensor& x, double alpha);
void add(const Tensor& a, const Tensor& b, Tensor& out);
void cast(const Tensor& src, Tensor& dst);
double sum_squares(const Tensor& x);
bool all_finite(const Tensor& x);

// Throws naming the first id outside [0, vocab): checked on the host when ids_host (their host
// copy) is defined, else on the device with one round trip (runtime/ops/vocab_parallel.cu).
void check_token_ids(const Tensor& ids, int64_t vocab, const char* op, const Tensor& ids_host);
void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out, const Tensor& ids_host);
void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable, const Tensor& ids_host);
// The embedding backwards' scatter (embedding.cu; vocab_parallel.cu's range form too): adds row i
// of dout [n, d] to row keys[i] of dtable for every i whose key is not `skip` (keys in
// [0, key_bound) on the device; positions[i] = i), deterministically: the (key, position) pairs
// stably radix-sorted by key, then one block a run of equal keys sums its rows in position order
// (fp32) and adds the sum to the row once. No checks: the callers validate the tensors.
void add_rows_by_key(const int32_t* keys, const int32_t* positions, int64_t n, int32_t skip,
                     int64_t key_bound, const Tensor& dout, Tensor& dtable, const char* op);

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Tensor& dx, Tensor& dw, const Tensor& residual, float dw_beta);

void rope_forward(const Tensor& x, const Tensor& pos, double theta, Tensor& y);
void rope_backward(const Tensor& dy, const Tensor& pos, double theta, Tensor& dx);

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                       int max_seqlen, Tensor& out, Tensor& lse, const Tensor& cu_seqlens_host);
void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens,
                        int max_seqlen, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor& cu_seqlens_host);

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out);
void swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up, Tensor& dgate,
                     Tensor& dup);

double cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses,
                             int64_t* count);
void cross_entropy_backward(const Tensor& logits, const Tensor& targets, double grad_scale,
                            Tensor& dlogits);
double cross_entropy_forward_backward(const Tensor& logits, const Tensor& targets, double grad_scale,
                                      Tensor& losses, int64_t* count, Tensor& dlogits);
// The forward (dlogits null) or forward + backward of rows [row0, row0 + n) of an LM head, their
// loss sum and count added to `totals` (i64 [3] on the device: the sum's f64 bits, the count, and
// 1 + the first row whose target is outside the vocabulary, 0 for none; zeros to begin) without a
// synchronisation.
void cross_entropy_accumulate(const Tensor& logits, const Tensor& targets, double grad_scale,
                              Tensor& losses, Tensor* dlogits, int64_t row0, Tensor& totals);

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWHyper& h,
                Tensor* param_lowp);
void split_master(const Tensor& master, Tensor& weight, Tensor& remainder);
void join_master(const Tensor& weight, const Tensor& remainder, Tensor& master);
void adamw_step_remainder(Tensor& weight, Tensor& remainder, const Tensor& grad, Tensor& m, Tensor& v,
                          const AdamWHyper& h);

}  // namespace ievo::ops::cuda
#endif
