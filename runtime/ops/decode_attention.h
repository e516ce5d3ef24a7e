// Attention of new tokens over a KV cache, for incremental decoding (models/generate.h).
//   q [n, Hq, hd]: queries of the n newest tokens, at positions past .. past + n - 1 (its rows may
//     be strided: a column slice of the joint q/k/v projection);
//   k, v [past + n, Hkv, hd]: keys and values of every token so far, the n new ones last;
//   out [n, Hq, hd]: query i attends keys 0 .. past + i (causal), query head h uses kv head
//   h / (Hq / Hkv), scale 1/sqrt(hd) -- exactly rows past .. past + n - 1 of attention_forward
//   over the whole sequence (attention.h). past = 0 is plain causal self-attention.
// CPU: direct, dot products and softmax sums in double. Other devices: attention_forward of the
//   device over the whole prefix with the queries zero-padded in front, keeping the last n rows
//   (O((past + n)^2) work per call: a correctness path until a dedicated decode kernel exists).
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out);

}  // namespace ievo::ops
