#include "models/llama.h"

#include <cmath>
#include <exception>

#include "runtime/ops/attention.h"
#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/embedding.h"
#include "runtime/ops/matmul.h"
#include "runtime/ops/rmsnorm.h"
#include "runtime/ops/rope.h"
#include "runtime/ops/swiglu.h"

namespace ievo {

using namespace ievo::ops;

// What one block keeps for its backward (or recomputes under Recompute::Full / Selective).
struct Llama::Acts {
  Tensor x;            // block input (residual stream)       [N, d]
  Tensor rstd1, n1;    // attention norm statistics and output [N], [N, d]
  Tensor q, k, v;      // after RoPE (q, k)                    [N, H, hd]
  Tensor attn, lse;    // attention output and log-sum-exp     [N, Hq, hd], [Hq, N]
  Tensor a;            // x + attention branch                 [N, d]
  Tensor rstd2, n2;    // MLP norm                             [N], [N, d]
  Tensor gate, up, h;  // MLP pre-activations and silu(gate)*up [N, F]
};

namespace {

DType stat_dtype(DType t) { return t == DType::F64 ? DType::F64 : DType::F32; }

// y = x W^T for W [out, in]
Tensor linear(const Tensor& x, const Tensor& w) {
  Tensor y = Tensor::empty({x.size(0), w.size(0)}, x.dtype(), x.device());
  matmul(x, false, w, true, y);
  return y;
}

// Backward of y = x W^T: dx (+)= dy W, dW += scale-free dy^T x.
void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dx, bool accumulate_dx,
                     Tensor& dw) {
  matmul(dy, false, w, false, dx, 1.0f, accumulate_dx ? 1.0f : 0.0f);
  matmul(dy, true, x, false, dw, 1.0f, 1.0f);
}

}  // namespace

Llama::Llama(const ModelConfig& c, Recompute recompute) : c_(c), recompute_(recompute) {
  c_.validate();
  specs_ = param_specs(c_);
  auto idx = [&](const std::string& name) {
    for (size_t i = 0; i < specs_.size(); ++i)
      if (specs_[i].name == name) return i;
    IEVO_FAIL("model has no parameter ", name);
  };
  while (head_chunk_tokens * 2 * c_.vocab_size <= (int64_t{1} << 27)) head_chunk_tokens *= 2;
  embed_ = idx("model.embed_tokens.weight");
  norm_ = idx("model.norm.weight");
  head_ = c_.tie_embeddings ? embed_ : idx("lm_head.weight");
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    layers_.push_back({idx(p + "input_layernorm.weight"), idx(p + "self_attn.q_proj.weight"),
                       idx(p + "self_attn.k_proj.weight"), idx(p + "self_attn.v_proj.weight"),
                       idx(p + "self_attn.o_proj.weight"), idx(p + "post_attention_layernorm.weight"),
                       idx(p + "mlp.gate_proj.weight"), idx(p + "mlp.up_proj.weight"),
                       idx(p + "mlp.down_proj.weight")});
  }
}

std::vector<HookLayerParams> Llama::hook_layers() const {
  std::vector<HookLayerParams> out;
  out.push_back({{embed_}, {}, {embed_}});  // the embedding backward only scatters dx into dW
  for (const LayerIdx& L : layers_) {
    std::vector<size_t> w = {L.ln1, L.wq, L.wk, L.wv, L.wo, L.ln2, L.wg, L.wu, L.wd};
    out.push_back({w, w, w});
  }
  std::vector<size_t> head = {norm_, head_};
  out.push_back({head, head, head});
  return out;
}

const Tensor& Llama::head_weight(const ParamStore& p) const { return p[head_]; }
Tensor& Llama::head_weight(ParamStore& p) const { return p[head_]; }

void Llama::block_forward(const ParamStore& p, int layer, const Batch& b, const Tensor& x, Acts& a) {
  const LayerIdx& L = layers_[layer];
  const int64_t N = x.size(0), d = c_.hidden_size, hd = c_.hd();
  const DType dt = x.dtype();
  const Device dev = x.device();
  a.x = x;
  // Attention branch.
  a.n1 = Tensor::empty({N, d}, dt, dev);
  a.rstd1 = Tensor::empty({N}, stat_dtype(dt), dev);
  rmsnorm_forward(x, p[L.ln1], c_.norm_eps, a.n1, a.rstd1);
  a.q = linear(a.n1, p[L.wq]).view({N, c_.num_heads, hd});
  a.k = linear(a.n1, p[L.wk]).view({N, c_.num_kv_heads, hd});
  a.v = linear(a.n1, p[L.wv]).view({N, c_.num_kv_heads, hd});
  rope_forward(a.q, b.positions, c_.rope_theta, a.q);
  rope_forward(a.k, b.positions, c_.rope_theta, a.k);
  a.attn = Tensor::empty({N, c_.num_heads, hd}, dt, dev);
  a.lse = Tensor::empty({c_.num_heads, N}, stat_dtype(dt), dev);
  attention_forward(a.q, a.k, a.v, b.cu_seqlens, b.max_seqlen, a.attn, a.lse);
  a.a = linear(a.attn.view({N, c_.q_dim()}), p[L.wo]);
  add(a.a, x, a.a);
  // MLP branch.
  a.n2 = Tensor::empty({N, d}, dt, dev);
  a.rstd2 = Tensor::empty({N}, stat_dtype(dt), dev);
  rmsnorm_forward(a.a, p[L.ln2], c_.norm_eps, a.n2, a.rstd2);
  a.gate = linear(a.n2, p[L.wg]);
  a.up = linear(a.n2, p[L.wu]);
  a.h = Tensor::empty(a.gate.shape(), dt, dev);
  swiglu_forward(a.gate, a.up, a.h);
}

// Given dy = d loss / d(block output), accumulates parameter gradients and returns d loss / d x.
Tensor Llama::block_backward(const ParamStore& p, int layer, const Batch& b, const Acts& a,
                             const Tensor& dy, ParamStore& g) {
  const LayerIdx& L = layers_[layer];
  const int64_t N = dy.size(0), d = c_.hidden_size, F = c_.ffn_hidden_size, hd = c_.hd();
  const DType dt = dy.dtype();
  const Device dev = dy.device();
  // out = a + Wd h: da = dy + (norm-backward of the MLP branch)
  Tensor dh = Tensor::empty({N, F}, dt, dev);
  linear_backward(dy, a.h, p[L.wd], dh, false, g[L.wd]);
  Tensor dgate = Tensor::empty({N, F}, dt, dev), dup = Tensor::empty({N, F}, dt, dev);
  swiglu_backward(dh, a.gate, a.up, dgate, dup);
  Tensor dn2 = Tensor::empty({N, d}, dt, dev);
  linear_backward(dgate, a.n2, p[L.wg], dn2, false, g[L.wg]);
  linear_backward(dup, a.n2, p[L.wu], dn2, true, g[L.wu]);
  Tensor da = Tensor::empty({N, d}, dt, dev);
  rmsnorm_backward(dn2, a.a, p[L.ln2], a.rstd2, da, g[L.ln2]);
  add(da, dy, da);
  // a = x + Wo attn
  Tensor dattn = Tensor::empty({N, c_.q_dim()}, dt, dev);
  linear_backward(da, a.attn.view({N, c_.q_dim()}), p[L.wo], dattn, false, g[L.wo]);
  Tensor dq = Tensor::empty({N, c_.num_heads, hd}, dt, dev);
  Tensor dk = Tensor::empty({N, c_.num_kv_heads, hd}, dt, dev);
  Tensor dv = Tensor::empty({N, c_.num_kv_heads, hd}, dt, dev);
  attention_backward(dattn.view({N, c_.num_heads, hd}), a.q, a.k, a.v, a.attn, a.lse, b.cu_seqlens,
                     b.max_seqlen, dq, dk, dv);
  rope_backward(dq, b.positions, c_.rope_theta, dq);
  rope_backward(dk, b.positions, c_.rope_theta, dk);
  Tensor dn1 = Tensor::empty({N, d}, dt, dev);
  linear_backward(dq.view({N, c_.q_dim()}), a.n1, p[L.wq], dn1, false, g[L.wq]);
  linear_backward(dk.view({N, c_.kv_dim()}), a.n1, p[L.wk], dn1, true, g[L.wk]);
  linear_backward(dv.view({N, c_.kv_dim()}), a.n1, p[L.wv], dn1, true, g[L.wv]);
  Tensor dx = Tensor::empty({N, d}, dt, dev);
  rmsnorm_backward(dn1, a.x, p[L.ln1], a.rstd1, dx, g[L.ln1]);
  add(dx, da, dx);
  return dx;
}

// Recompute::Selective: the norm outputs and the SwiGLU product are recomputed from x, a (with the
// same kernels, so the backward sees bit-identical values) and gate, up.
void Llama::drop_recomputable(Acts& a) const {
  a.n1 = Tensor();
  a.n2 = Tensor();
  a.h = Tensor();
}

void Llama::recompute_dropped(const ParamStore& p, int layer, Acts& a) const {
  const LayerIdx& L = layers_[layer];
  a.n1 = Tensor::empty(a.x.shape(), a.x.dtype(), a.x.device());
  rmsnorm_forward(a.x, p[L.ln1], c_.norm_eps, a.n1, a.rstd1);
  a.n2 = Tensor::empty(a.a.shape(), a.a.dtype(), a.a.device());
  rmsnorm_forward(a.a, p[L.ln2], c_.norm_eps, a.n2, a.rstd2);
  a.h = Tensor::empty(a.gate.shape(), a.gate.dtype(), a.gate.device());
  swiglu_forward(a.gate, a.up, a.h);
}

// Embedding and all blocks; returns the last block's output. With `saved`, keeps each block's
// activations (or only its input under Recompute::Full).
Tensor Llama::forward_hidden(const ParamStore& p, const Batch& b, std::vector<Acts>* saved) {
  const int64_t N = b.num_tokens();
  using P = LayerHooks::Pass;
  Tensor x = Tensor::empty({N, c_.hidden_size}, p.dtype(), p.device());
  before(0, P::Forward);
  embedding_forward(p[embed_], b.inputs, x);
  after(0, P::Forward);
  if (saved) saved->assign(layers_.size(), Acts{});
  for (size_t l = 0; l < layers_.size(); ++l) {
    const int hl = static_cast<int>(l) + 1;
    Acts a;
    before(hl, P::Forward);
    block_forward(p, static_cast<int>(l), b, x, a);
    Tensor out = linear(a.h, p[layers_[l].wd]);
    after(hl, P::Forward);
    add(out, a.a, out);
    if (saved) {
      if (recompute_ == Recompute::Full) {
        (*saved)[l].x = a.x;
      } else {
        if (recompute_ == Recompute::Selective) drop_recomputable(a);
        (*saved)[l] = std::move(a);
      }
    }
    x = out;
  }
  return x;
}

LossSum Llama::forward_backward(const ParamStore& p, const Batch& b, double grad_scale,
                                ParamStore& g) {
  using P = LayerHooks::Pass;
  std::vector<Acts> acts;
  Tensor x = forward_hidden(p, b, &acts);
  const int64_t N = x.size(0), d = c_.hidden_size;
  const int head_layer = static_cast<int>(layers_.size()) + 1;
  // Final norm + fused LM head and loss (forward and backward in chunks).
  before(head_layer, P::Backward);
  Tensor xf = Tensor::empty({N, d}, x.dtype(), x.device());
  Tensor rstd = Tensor::empty({N}, stat_dtype(x.dtype()), x.device());
  rmsnorm_forward(x, p[norm_], c_.norm_eps, xf, rstd);
  LossSum ls;
  Tensor dxf = Tensor::empty({N, d}, x.dtype(), x.device());
  ls.sum = lm_head_loss(xf, head_weight(p), b.targets, grad_scale, head_chunk_tokens, &ls.count,
                        &dxf, &head_weight(g));
  Tensor dx = Tensor::empty({N, d}, x.dtype(), x.device());
  rmsnorm_backward(dxf, x, p[norm_], rstd, dx, g[norm_]);
  after(head_layer, P::Backward);
  // Blocks in reverse.
  for (int l = static_cast<int>(layers_.size()) - 1; l >= 0; --l) {
    before(l + 1, P::Backward);
    if (recompute_ == Recompute::Full) {
      Tensor xin = acts[l].x;
      block_forward(p, l, b, xin, acts[l]);
    } else if (recompute_ == Recompute::Selective) {
      recompute_dropped(p, l, acts[l]);
    }
    dx = block_backward(p, l, b, acts[l], dx, g);
    after(l + 1, P::Backward);
    acts[l] = Acts{};  // free this block's activations
  }
  before(0, P::Backward);
  embedding_backward(dx, b.inputs, g[embed_]);
  after(0, P::Backward);
  return ls;
}

// The final RMSNorm of the last block's output, inside the head layer's hooks, then `head`.
template <typename Head>
auto Llama::forward_head(const ParamStore& p, const Batch& b, Head head) {
  Tensor x = forward_hidden(p, b, nullptr);
  Tensor xf = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor rstd = Tensor::empty({x.size(0)}, stat_dtype(x.dtype()), x.device());
  const int head_layer = static_cast<int>(layers_.size()) + 1;
  before(head_layer, LayerHooks::Pass::Forward);
  rmsnorm_forward(x, p[norm_], c_.norm_eps, xf, rstd);
  auto out = head(xf);
  after(head_layer, LayerHooks::Pass::Forward);
  return out;
}

LossSum Llama::loss(const ParamStore& p, const Batch& b) {
  return forward_head(p, b, [&](const Tensor& xf) {
    LossSum ls;
    ls.sum = lm_head_loss(xf, head_weight(p), b.targets, 1.0, head_chunk_tokens, &ls.count, nullptr,
                          nullptr);
    return ls;
  });
}

Tensor Llama::logits(const ParamStore& p, const Batch& b) {
  return forward_head(p, b, [&](const Tensor& xf) { return linear(xf, head_weight(p)); });
}

namespace {
// splitmix64: a tiny, portable generator so initial weights are identical on every platform.
struct SplitMix {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }
};
}  // namespace

void init_params(const ModelConfig& c, ParamStore& params, uint64_t seed) {
  IEVO_CHECK(params.size() == param_specs(c).size(), "init_params: parameter set does not match the model");
  // Tensors in parallel on the host (each has its own stream, so the result does not depend on
  // the thread count); a device ParamStore is filled tensor by tensor from this thread.
  const bool host = params.device() == Device::CPU;
  std::exception_ptr error;
#pragma omp parallel for schedule(dynamic) if (host)
  for (size_t i = 0; i < params.size(); ++i) {
    try {
      const ParamSpec& s = params.spec(i);
      Tensor f64 = Tensor::empty(s.shape, DType::F64);
      double* h = f64.data<double>();
      if (s.shape.size() == 1) {
        for (int64_t j = 0; j < f64.numel(); ++j) h[j] = 1.0;
      } else {
        // A stream per tensor (seed, index) so adding a tensor does not shift the others.
        SplitMix rng{seed * 0x100000001b3ull + i};
        for (int64_t j = 0; j < f64.numel(); j += 2) {
          double u1 = rng.uniform(), u2 = rng.uniform();
          double r = std::sqrt(-2.0 * std::log(u1));
          h[j] = c.init_std * r * std::cos(2 * M_PI * u2);
          if (j + 1 < f64.numel()) h[j + 1] = c.init_std * r * std::sin(2 * M_PI * u2);
        }
      }
      Tensor conv = f64.to(params.dtype());
      params[i].copy_from(host ? conv : conv.to(params.device()));
    } catch (...) {
#pragma omp critical(ievo_init_params)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace ievo
