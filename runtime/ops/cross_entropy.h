// Softmax cross-entropy on logits, with ignore index -100.
//   logits [N, V], targets [N] i32 (target == -100: ignored, loss 0, gradient 0).
//   forward: losses [N] (f32 / f64 like the logits): -log softmax(logits)[target]; returns the
//            sum over non-ignored tokens (double) and writes the count of non-ignored tokens.
//   backward: dlogits = grad_scale * (softmax(logits) - onehot(target)) for non-ignored rows,
//             0 for ignored rows; dlogits may alias logits (in place).
// A target outside [0, V) other than -100 is an error naming it.
// The LM head fuses this with the output projection in chunks of tokens (lm_head_loss below), so
// the logits of the whole batch never exist at once.
#pragma once
#include <cstdint>

#include "runtime/ops/targets.h"
#include "runtime/tensor.h"

namespace ievo::ops {

double cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses,
                             int64_t* count);
void cross_entropy_backward(const Tensor& logits, const Tensor& targets, double grad_scale,
                            Tensor& dlogits);
// Both at once, as the LM head needs them: returns the forward's sum (and count, losses) and
// writes the backward's dlogits (may alias logits). On CUDA one pass over the logits and one
// synchronisation instead of two of each.
double cross_entropy_forward_backward(const Tensor& logits, const Tensor& targets, double grad_scale,
                                      Tensor& losses, int64_t* count, Tensor& dlogits);

// Fused LM head + loss, forward and backward, over chunks of `chunk_tokens` tokens:
//   h [N, D] (final-norm output), w [V, D], targets [N].
//   Returns the summed loss over non-ignored tokens; adds their count to *count.
//   If dh is defined: dh = grad_scale * d(sum loss)/dh (written; may alias h); dw = dw_beta * dw +
//   grad_scale * d/dw (dw_beta 0: dw is overwritten, its old values never read).
double lm_head_loss(const Tensor& h, const Tensor& w, const Tensor& targets, double grad_scale,
                    int64_t chunk_tokens, int64_t* count, Tensor* dh, Tensor* dw, float dw_beta = 1.0f);

}  // namespace ievo::ops
