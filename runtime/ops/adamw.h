// AdamW with decoupled weight decay, exactly as torch.optim.AdamW (non-amsgrad, non-foreach):
//   p -= lr * weight_decay * p
//   m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// t = step (1-based). param, m, v are f32 (f64 allowed on CPU); grad is f32/f64 (or bf16 on CUDA),
// multiplied by grad_scale first (clipping / loss-scale undo). If param_lowp is defined (bf16
// copy of the weights for the forward), it is written with the updated param.
#pragma once
#include "runtime/tensor.h"

namespace ievo::ops {

struct AdamWHyper {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;
  double grad_scale = 1.0;
};

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWHyper& h,
                Tensor* param_lowp = nullptr);

// Master weights kept as the bf16 weights plus 16-bit remainders (i16), 4 bytes a parameter for
// both instead of 6 (f32 master + bf16 copy): TransformerEngine's FusedAdam
// store_param_remainders, Megatron's --store-param-remainders. The f32 master x is
// (weight, remainder) = f32_split_bf16(x) (runtime/dtype.h): the weight is x rounded to nearest
// with ties away from zero, and x comes back bit-exactly. split_master: master (f32) -> weight
// (bf16), remainder (i16); join_master: the inverse.
void split_master(const Tensor& master, Tensor& weight, Tensor& remainder);
void join_master(const Tensor& weight, const Tensor& remainder, Tensor& master);
// adamw_step on the master joined from (weight, remainder), split back: param, m and v come out
// bit for bit as adamw_step's on that f32 master (grad f32, bf16 or f16; m, v f32).
void adamw_step_remainder(Tensor& weight, Tensor& remainder, const Tensor& grad, Tensor& m, Tensor& v,
                          const AdamWHyper& h);

}  // namespace ievo::ops
