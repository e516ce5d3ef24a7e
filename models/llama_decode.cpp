// Llama::forward_step: the forward of logits() for new tokens only, attending over a KV cache.
//   x = embed(tokens); per block: q, k, v of the new tokens (one GEMM, as in training; RoPE at
//   their absolute positions),
//   k, v appended to the cache, attention_decode(q, cache[0, length + n)), then the output
//   projection, MLP and residuals exactly as block_forward; final norm and LM head.
#include "models/llama.h"
#include "models/llama_layers.h"
#include "runtime/ops/decode_attention.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/embedding.h"
#include "runtime/ops/swiglu.h"

namespace ievo {

using namespace ievo::ops;

using layers::linear;
using layers::linears;
using layers::rmsnorm;

KvCache Llama::make_kv_cache(int64_t capacity, DType dtype, Device device) const {
  IEVO_CHECK(capacity > 0, "KV cache capacity must be > 0, got ", capacity);
  KvCache c;
  for (size_t l = 0; l < layers_.size(); ++l) {
    c.k.push_back(Tensor::zeros({capacity, c_.num_kv_heads, c_.hd()}, dtype, device));
    c.v.push_back(Tensor::zeros({capacity, c_.num_kv_heads, c_.hd()}, dtype, device));
  }
  return c;
}

Tensor Llama::forward_step(const ParamStore& p, const std::vector<int32_t>& tokens, KvCache& cache) {
  const int64_t n = static_cast<int64_t>(tokens.size()), past = cache.length;
  IEVO_CHECK(n > 0, "forward_step: no tokens");
  IEVO_CHECK(shard_.whole(c_), "forward_step: decoding runs the whole model on one rank");
  IEVO_CHECK(cache.k.size() == layers_.size(), "forward_step: the KV cache has ", cache.k.size(),
             " layers, the model ", layers_.size());
  IEVO_CHECK(past + n <= cache.capacity(), "forward_step: ", past, " cached + ", n,
             " new tokens exceed the KV cache capacity ", cache.capacity());
  const Device dev = p.device();
  const DType dt = p.dtype();
  const int64_t hd = c_.hd();
  std::vector<int32_t> pos(tokens.size());
  for (int64_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(past + i);
  Tensor ids = Tensor::from_vector(tokens, {n}), positions = Tensor::from_vector(pos, {n});
  if (dev != Device::CPU) ids = ids.to(dev), positions = positions.to(dev);

  using P = LayerHooks::Pass;
  before(0, P::Forward);
  Tensor x = Tensor::empty({n, c_.hidden_size}, dt, dev);
  embedding_forward(p[embed_], ids, x);
  after(0, P::Forward);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerIdx& L = layers_[l];
    const int hl = static_cast<int>(l) + 1;
    before(hl, P::Forward);
    Tensor n1 = rmsnorm(x, p[L.ln1], c_.norm_eps);
    const std::vector<Tensor> qkv = linears(n1, {&p[L.wq], &p[L.wk], &p[L.wv]});  // row-strided
    Tensor q = qkv[0].view({n, c_.num_heads, hd});
    Tensor k = qkv[1].view({n, c_.num_kv_heads, hd});
    Tensor v = qkv[2].view({n, c_.num_kv_heads, hd});
    rotate_qk(q, k, positions, false);
    Tensor kdst = cache.k[l].slice(0, past, past + n), vdst = cache.v[l].slice(0, past, past + n);
    kdst.copy_from(k);
    vdst.copy_from(v);
    Tensor attn = Tensor::empty({n, c_.num_heads, hd}, dt, dev);
    attention_decode(q, cache.k[l].slice(0, 0, past + n), cache.v[l].slice(0, 0, past + n), attn);
    Tensor a = linear(attn.view({n, c_.q_dim()}), p[L.wo]);
    add(a, x, a);
    Tensor n2 = rmsnorm(a, p[L.ln2], c_.norm_eps);
    const std::vector<Tensor> gu = linears(n2, {&p[L.wg], &p[L.wu]});
    Tensor h = Tensor::empty(gu[0].shape(), dt, dev);
    swiglu_forward(gu[0], gu[1], h);
    x = linear(h, p[L.wd]);
    add(x, a, x);
    after(hl, P::Forward);
  }
  const int head_layer = static_cast<int>(layers_.size()) + 1;
  before(head_layer, P::Forward);
  Tensor logits = linear(rmsnorm(x, p[norm_], c_.norm_eps), head_weight(p));
  after(head_layer, P::Forward);
  cache.length = past + n;
  return logits;
}

}  // namespace ievo
