// Rotary position embedding, HF convention (rotate_half on the two halves of each head):
//   inv_freq[i] = 1 / theta^(2i/hd), i in [0, hd/2);  angle = pos * inv_freq[i]
//   y[..., i]        = x[..., i] * cos - x[..., i + hd/2] * sin
//   y[..., i + hd/2] = x[..., i + hd/2] * cos + x[..., i] * sin
// x, y: [N, H, hd] (N = tokens; y may alias x), each contiguous but for its row stride (e.g. the
// q or k columns of a joint QKV projection's output), pos: [N] i32 (position of each token in its
// sequence, restarting per document when packing). inv_freq and the angles are computed in fp32
// as HF does. Backward is the rotation by -angle: rope_backward(dy, pos, theta, dx).
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

void rope_forward(const Tensor& x, const Tensor& pos, double theta, Tensor& y);
void rope_backward(const Tensor& dy, const Tensor& pos, double theta, Tensor& dx);

}  // namespace ievo::ops
