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
#include "models/model_parallel.h"
#include "models/params.h"
#include "models/shard.h"

namespace ievo {

struct LossSum {
  double sum = 0;     // summed token cross-entropy
  int64_t count = 0;  // tokens counted
};

// Activation checkpointing (model.checkpointing): None keeps every activation a block's backward
// needs; Full keeps only each block's input and recomputes the whole block forward in its backward;
// Selective keeps every matmul and attention output but drops the two RMSNorm outputs and the
// SwiGLU product (2d + F values per token and layer), recomputed from the kept tensors by three
// memory-bound kernels in the backward: no GEMM or attention is recomputed.
enum class Recompute { None, Full, Selective };

// Optional callbacks around each layer's use of its parameters, for code that decides where
// parameters and gradients live (parallel/zero.h: ZeRO-3 gathers a layer's weights before it runs
// and frees them after; ZeRO-2/3 reduce a layer's gradients as soon as its backward is done). The
// model only calls them; it knows nothing about ranks. Layers for the hooks: 0 = embedding,
// 1..L = transformer blocks, L+1 = final norm + LM head (its forward and backward are fused, so it
// runs as one Backward pass in training). Backward runs L+1, L, ..., 0; under Recompute::Full the
// block's forward is recomputed inside its Backward pass.
class LayerHooks {
 public:
  enum class Pass { Forward, Backward };
  virtual ~LayerHooks() = default;
  virtual void before_layer(int layer, Pass pass) = 0;
  virtual void after_layer(int layer, Pass pass) = 0;  // Backward: this layer's gradients are done
};

// Which parameters (indices into the ParamStore) a hook layer reads in each pass and which
// gradients its backward adds to. With tied embeddings the head layer reads and writes the
// embedding matrix too.
struct HookLayerParams {
  std::vector<size_t> reads_forward, reads_backward, writes;
};

// Keys (after RoPE) and values of the tokens seen so far, per layer, for incremental decoding
// (Llama::forward_step, models/generate.h). Rows [0, length) of each tensor are filled.
struct KvCache {
  std::vector<Tensor> k, v;  // per layer: [capacity, Hkv, hd], the parameters' dtype and device
  int64_t length = 0;        // tokens cached (the next token's position)
  int64_t capacity() const { return k.empty() ? 0 : k[0].size(0); }
};

// What one block keeps for its backward (or recomputes under Recompute::Full / Selective).
// Rows: n = this rank's residual-stream tokens, N = the micro-batch's tokens inside the
// tensor-parallel regions, Na/Ha = tokens/heads of this rank's attention (models/model_parallel.h).
struct BlockActs {
  Tensor x;            // block input (residual stream)                    [n, d]
  Tensor rstd1, n1;    // attention norm statistics; norm output, gathered [n], [N, d]
  Tensor q, k, v;      // after RoPE, attention layout                     [Na, Ha, hd]
  Tensor attn, lse;    // attention output and log-sum-exp                 [Na, Ha, hd], [Ha, Na]
  Tensor o;            // attention output gathered back to [N, Hq_local, hd] (= attn without Ulysses)
  Tensor a;            // x + attention branch                             [n, d]
  Tensor rstd2, n2;    // MLP norm statistics; output gathered             [n], [N, d]
  Tensor gate, up, h;  // MLP pre-activations and silu(gate)*up            [N, F_local]
};

// One micro-batch's saved state in this rank's part of the model (stage_forward/stage_backward).
struct StageActs {
  std::vector<BlockActs> blocks;  // one per block of the shard
  Tensor head_dx;                 // last stage: d loss / d(last block output), from the fused head
};

class Llama {
 public:
  // The whole model on one rank, or this rank's part of it (models/shard.h): its parameters are
  // param_specs(c, shard), its matrices the rank's slices. `parallel` (not owned, nullptr: one
  // rank) does the communication at the tensor/sequence-parallel points (models/model_parallel.h).
  explicit Llama(const ModelConfig& c, Recompute recompute = Recompute::None, ModelShard shard = {},
                 ModelParallel* parallel = nullptr);
  const ModelConfig& config() const { return c_; }
  const ModelShard& shard() const { return shard_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }

  // Forward and backward of one micro-batch: returns the summed loss and adds
  // grad_scale * d(summed loss)/d(param) into grads (same layout as params).
  LossSum forward_backward(const ParamStore& params, const Batch& b, double grad_scale,
                           ParamStore& grads);
  // Forward only: the summed loss.
  LossSum loss(const ParamStore& params, const Batch& b);

  // Pipeline stages (parallel/pipeline.h): one micro-batch through one of this shard's chunks
  // (ModelShard::chunks; 0 when the rank holds one). stage_forward: `input` is the previous stage's output [n, d] (ignored on the first stage,
  // which embeds b.inputs). Returns this stage's output for the next stage. On the last stage it
  // returns an undefined tensor and instead runs the final norm, the LM head and the loss, adding
  // the summed loss into *loss; with `acts` it also runs the head's backward right away (it is
  // fused), so grads g receive the head's gradients (grad_scale as in forward_backward) and
  // acts->head_dx keeps the gradient for stage_backward. acts == nullptr: forward only (no
  // activations kept, g unused and may be nullptr).
  Tensor stage_forward(const ParamStore& params, int chunk, const Batch& b, const Tensor& input,
                       StageActs* acts, double grad_scale, ParamStore* g, LossSum* loss);
  // stage_backward: dy = d loss / d(this chunk's output) (ignored on the last stage, which uses
  // acts.head_dx). Adds this shard's block (and embedding) gradients into g, frees acts, and
  // returns d loss / d(input) for the previous stage (undefined on the first stage).
  Tensor stage_backward(const ParamStore& params, int chunk, const Batch& b, StageActs& acts,
                        const Tensor& dy, ParamStore& g);
  // Forward only: logits [N, V] of every token.
  Tensor logits(const ParamStore& params, const Batch& b);

  // Incremental forward (models/llama_decode.cpp): an empty cache for `capacity` tokens, and the
  // logits [n, V] of n new tokens at positions cache.length .. + n - 1 given the cached ones,
  // appending their keys and values. Same ops as logits(), so the rows equal those of logits()
  // on the whole sequence (up to rounding).
  KvCache make_kv_cache(int64_t capacity, DType dtype, Device device) const;
  Tensor forward_step(const ParamStore& params, const std::vector<int32_t>& tokens, KvCache& cache);

  // Tokens of the LM head processed at once (the fused head never holds [N, V] logits). Set by
  // the constructor to default_head_chunk_tokens(V / tensor ranks). Larger chunks mean fewer,
  // better-shaped GEMMs, fewer loss synchronisations and fewer passes of the head's weight
  // gradient (ievo bench: docs/performance.md).
  int64_t head_chunk_tokens = 1024;
  // The largest power of two in [1024, 4096] whose logits chunk [tokens, v_local] has at most
  // 2^29 elements (1 GiB in bf16): 4096 for V = 32000 and V = 92544 (beyond 4096 tokens the head
  // gained nothing: TinyLlama with 8192 ran 0.8% slower).
  static int64_t default_head_chunk_tokens(int64_t v_local);

  // Projections of one input whose weights lie back to back in the store (a layer's q/k/v and
  // its gate/up, as ParamStore lays them out) run as one GEMM over the joint weight, forward and
  // backward (the default), or one GEMM each (false; IEVO_JOINT_LINEAR=0 in the environment sets
  // that at start). The same math; the sums are ordered differently (docs/performance.md).
  static void set_joint_linears(bool on);

  // Hooks (not owned; nullptr: none). Layers as in LayerHooks, numbered over the whole model
  // (num_layers + 2 of them); a pipeline stage's hook_layers() has empty entries for the layers
  // it does not hold, and parameter indices into its own ParamStore (specs()).
  void set_hooks(LayerHooks* hooks) { hooks_ = hooks; }
  std::vector<HookLayerParams> hook_layers() const;

 private:
  struct LayerIdx {
    size_t ln1, wq, wk, wv, wo, ln2, wg, wu, wd;
  };

  Tensor embed(const ParamStore& p, const Batch& b);
  Tensor run_blocks(const ParamStore& p, const LayerRange& r, const Batch& b, Tensor x,
                    std::vector<BlockActs>* saved);
  void block_forward(const ParamStore& p, int layer, const Batch& b, const Tensor& x, BlockActs& a);
  Tensor block_backward(const ParamStore& p, int layer, const Batch& b, const BlockActs& a,
                        const Tensor& dy, ParamStore& g);
  Tensor residual_linear(const Tensor& h, const Tensor& w, const Tensor& x);  // x + g(h W^T)
  // RoPE (or its backward) on q [N, Hq, hd] and k [N, Hk, hd] in place: one launch over the
  // Hq + Hk heads when they lie side by side (the joint projection's columns), else one each.
  void rotate_qk(Tensor& q, Tensor& k, const Tensor& positions, bool backward) const;
  void drop_recomputable(BlockActs& a) const;                     // Recompute::Selective
  void recompute_dropped(const ParamStore& p, int layer, BlockActs& a) const;
  const Tensor& head_weight(const ParamStore& p) const;
  void check_single_stage(const char* what) const;

  void before(int layer, LayerHooks::Pass pass) {
    if (hooks_) hooks_->before_layer(layer, pass);
  }
  void after(int layer, LayerHooks::Pass pass) {
    if (hooks_) hooks_->after_layer(layer, pass);
  }

  static ModelParallel one_rank_;  // the default: every region is the identity
  ModelConfig c_;
  Recompute recompute_;
  ModelShard shard_;
  ModelParallel* mp_;
  LayerHooks* hooks_ = nullptr;
  std::vector<ParamSpec> specs_;
  std::vector<LayerRange> ranges_;  // the shard's chunks
  std::vector<LayerIdx> layers_;    // by global layer index (entries of held layers only)
  size_t embed_ = 0, norm_ = 0, head_ = 0;  // -1 when the shard does not hold them
};

// Fills params from scratch: linear and embedding weights ~ N(0, init_std), norm weights 1.
// Deterministic from the seed (own Box-Muller on a splitmix64 stream, identical everywhere).
void init_params(const ModelConfig& c, ParamStore& params, uint64_t seed);

}  // namespace ievo
