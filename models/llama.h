// Llama (and InternLM2, the same network): explicit forward and backward, block by block.
//
//   x_0 = embed(ids)
//   for each layer:  a = x + Wo · attn(rope(Wq·n1), rope(Wk·n1), Wv·n1),  n1 = rmsnorm(x)
//                    x' = a + Wd · (silu(Wg·n2) ⊙ (Wu·n2)),                n2 = rmsnorm(a)
//   logits = W_head · rmsnorm(x_L);  loss = Σ cross_entropy(logits, targets)
//
// Parameters, gradients and activations live in tensors of the parameters' dtype (f32, f64 for
// tests, bf16 on CUDA); the model never knows the device or the parallel layout.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/batch.h"
#include "models/model_config.h"
#include "models/params.h"

namespace ievo {

struct LossSum {
  double sum = 0;     // summed token cross-entropy
  int64_t count = 0;  // tokens counted
};

enum class Recompute { None, Full };  // activation checkpointing: keep all, or only block inputs

class Llama {
 public:
  explicit Llama(const ModelConfig& c, Recompute recompute = Recompute::None);
  const ModelConfig& config() const { return c_; }

  // Forward and backward of one micro-batch: returns the summed loss and adds
  // grad_scale * d(summed loss)/d(param) into grads (same layout as params).
  LossSum forward_backward(const ParamStore& params, const Batch& b, double grad_scale,
                           ParamStore& grads);
  // Forward only: the summed loss.
  LossSum loss(const ParamStore& params, const Batch& b);
  // Forward only: logits [N, V] of every token.
  Tensor logits(const ParamStore& params, const Batch& b);

  // Tokens of the LM head processed at once (the fused head never holds [N, V] logits).
  int64_t head_chunk_tokens = 1024;

 private:
  struct LayerIdx {
    size_t ln1, wq, wk, wv, wo, ln2, wg, wu, wd;
  };
  struct Acts;  // one block's saved activations

  Tensor forward_hidden(const ParamStore& p, const Batch& b, std::vector<Acts>* saved);
  void block_forward(const ParamStore& p, int layer, const Batch& b, const Tensor& x, Acts& a);
  Tensor block_backward(const ParamStore& p, int layer, const Batch& b, const Acts& a,
                        const Tensor& dy, ParamStore& g);
  const Tensor& head_weight(const ParamStore& p) const;
  Tensor& head_weight(ParamStore& p) const;

  ModelConfig c_;
  Recompute recompute_;
  std::vector<ParamSpec> specs_;
  std::vector<LayerIdx> layers_;
  size_t embed_ = 0, norm_ = 0, head_ = 0;
};

// Fills params from scratch: linear and embedding weights ~ N(0, init_std), norm weights 1.
// Deterministic from the seed (own Box-Muller on a splitmix64 stream, identical everywhere).
void init_params(const ModelConfig& c, ParamStore& params, uint64_t seed);

}  // namespace ievo
