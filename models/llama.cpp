#include "models/llama.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <initializer_list>
#include <string>
#include <vector>

#include "models/llama_layers.h"
#include "runtime/env.h"
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
using layers::linear;
using layers::linears;
using layers::rmsnorm;

namespace {

DType stat_dtype(DType t) { return t == DType::F64 ? DType::F64 : DType::F32; }

// Backward of y = x W^T: dx (+)= dy W, dW = beta dW + dy^T x (the accumulator's beta: 0 on the
// step's first write of a lazily zeroed gradient, ParamStore::zero_lazily).
void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dx, bool accumulate_dx,
                     ParamStore::Accumulator dw) {
  matmul(dy, false, w, false, dx, 1.0f, accumulate_dx ? 1.0f : 0.0f);
  matmul(dy, true, x, false, dw.tensor, 1.0f, dw.beta);
}

// Projections of one input whose weights lie back to back in the store (a layer's q/k/v, its
// gate/up) run as one GEMM over the joint weight [W0; W1; ...], their outputs column slices of
// one matrix, and so do their weight and input gradients: fewer, larger GEMMs (docs/performance.md,
// eleventh round). Llama::set_joint_linears(false) or IEVO_JOINT_LINEAR=0: one GEMM each.
std::atomic<bool> g_joint_linears{env_switch_on("IEVO_JOINT_LINEAR")};
bool joint_linears() { return g_joint_linears.load(); }

// The parts as one tensor along `dim`: the view that spans them when they lie back to back (a
// layer's weights in the store; ZeRO keeps such a group in one bucket), else a copy (ZeRO
// buckets that must split it, e.g. k's gradient deferred and q's not). The joint GEMMs then run
// the same whatever the layout, and every parallel layout rounds as one process.
Tensor joined(const std::vector<Tensor>& parts, int dim) {
  Tensor v = adjacent_view(parts, dim);
  if (v.defined()) return v;
  Shape s = parts[0].shape();
  s[dim] = 0;
  for (const Tensor& p : parts) s[dim] += p.size(dim);
  Tensor t = Tensor::empty(s, parts[0].dtype(), parts[0].device());
  int64_t c = 0;
  for (const Tensor& p : parts) {
    Tensor dst = t.slice(dim, c, c + p.size(dim));
    dst.copy_from(p);
    c += p.size(dim);
  }
  return t;
}

// Consecutive column slices of m, of the given widths.
std::vector<Tensor> column_slices(const Tensor& m, const std::vector<int64_t>& widths) {
  std::vector<Tensor> out;
  int64_t c = 0;
  for (int64_t w : widths) {
    out.push_back(m.slice(1, c, c + w));
    c += w;
  }
  return out;
}

// Empty gradient buffers shaped as `xs`: column slices of one matrix when `xs` are (each viewed
// as [rows, -1]), so that the backward GEMMs read them as one; else one buffer each.
std::vector<Tensor> grads_like(std::initializer_list<const Tensor*> xs) {
  std::vector<Tensor> flat, out;
  std::vector<int64_t> widths;
  for (const Tensor* x : xs) {
    flat.push_back(x->view({x->size(0), -1}));
    widths.push_back(flat.back().size(1));
  }
  const Tensor joint = adjacent_view(flat, 1);
  if (!joint.defined()) {
    for (const Tensor* x : xs) out.push_back(Tensor::empty(x->shape(), x->dtype(), x->device()));
    return out;
  }
  const std::vector<Tensor> cols =
      column_slices(Tensor::empty(joint.shape(), joint.dtype(), joint.device()), widths);
  for (size_t i = 0; i < cols.size(); ++i) out.push_back(cols[i].view(xs.begin()[i]->shape()));
  return out;
}

// One projection y = x W^T of a shared input x: its output gradient [N, out], weight and weight
// gradient.
struct LinearGrad {
  const Tensor& dy;
  const Tensor& w;
  ParamStore::Accumulator dw;
};

// Backward of projections y_i = x W_i^T of one input x that is not needed afterwards: every
// dW_i (+)= dy_i^T x first (they read x), then dx = sum_i dy_i W_i written over x's buffer
// (returned). When the dy_i are column slices of one matrix (the joint forward's gradients), one
// GEMM each over the joint W and dW (joined(): copies where they lie apart, the gradient scattered
// back): dW = dy^T x, dx = dy W with K = the sum of the outputs (the sum over the projections in
// the GEMM's fp32 accumulator, rounded once). Else (the joint GEMMs switched off) one GEMM each.
Tensor weight_grads_then_input_grad(const Tensor& x, std::initializer_list<LinearGrad> ps) {
  Tensor dx = x;
  std::vector<Tensor> dys;
  for (const LinearGrad& p : ps) dys.push_back(p.dy);
  const Tensor dy = ps.size() > 1 && joint_linears() ? adjacent_view(dys, 1) : Tensor();
  if (dy.defined()) {
    std::vector<Tensor> ws, dws;
    float beta = 0.0f;
    for (const LinearGrad& p : ps) beta = std::max(beta, p.dw.beta);
    for (const LinearGrad& p : ps) {
      ws.push_back(p.w);
      if (p.dw.beta != beta) p.dw.tensor.zero_();  // a still-unwritten gradient among written ones
      dws.push_back(p.dw.tensor);
    }
    Tensor dw = adjacent_view(dws, 0);
    const bool apart = !dw.defined();
    if (apart)  // a gathered copy, holding what beta adds to
      dw = beta != 0.0f ? joined(dws, 0)
                        : Tensor::empty({dy.size(1), x.size(1)}, x.dtype(), x.device());
    matmul(dy, true, x, false, dw, 1.0f, beta);
    int64_t r = 0;
    for (Tensor& part : dws) {
      if (apart) part.copy_from(dw.slice(0, r, r + part.size(0)));
      r += part.size(0);
    }
    matmul(dy, false, joined(ws, 0), false, dx, 1.0f, 0.0f);
    return dx;
  }
  for (const LinearGrad& p : ps) matmul(p.dy, true, x, false, p.dw.tensor, 1.0f, p.dw.beta);
  float beta = 0.0f;
  for (const LinearGrad& p : ps) {
    matmul(p.dy, false, p.w, false, dx, 1.0f, beta);
    beta = 1.0f;
  }
  return dx;
}

constexpr size_t kAbsent = static_cast<size_t>(-1);

}  // namespace

namespace layers {

Tensor linear(const Tensor& x, const Tensor& w) {
  Tensor y = Tensor::empty({x.size(0), w.size(0)}, x.dtype(), x.device());
  matmul(x, false, w, true, y);
  return y;
}

std::vector<Tensor> linears(const Tensor& x, std::initializer_list<const Tensor*> ws) {
  std::vector<Tensor> parts;
  std::vector<int64_t> widths;
  for (const Tensor* w : ws) {
    parts.push_back(*w);
    widths.push_back(w->size(0));
  }
  if (joint_linears() && parts.size() > 1) return column_slices(linear(x, joined(parts, 0)), widths);
  std::vector<Tensor> ys;
  for (const Tensor& w : parts) ys.push_back(linear(x, w));
  return ys;
}

Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps, Tensor& rstd) {
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  rstd = Tensor::empty({x.size(0)}, stat_dtype(x.dtype()), x.device());
  rmsnorm_forward(x, w, eps, y, rstd);
  return y;
}

Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps) {
  Tensor rstd;
  return rmsnorm(x, w, eps, rstd);
}

}  // namespace layers

ModelParallel Llama::one_rank_;

void Llama::set_joint_linears(bool on) { g_joint_linears.store(on); }

int64_t Llama::default_head_chunk_tokens(int64_t v_local) {
  int64_t tokens = 1024;
  while (tokens < 4096 && tokens * 2 * v_local <= (int64_t{1} << 29)) tokens *= 2;
  return tokens;
}

Llama::Llama(const ModelConfig& c, Recompute recompute, ModelShard shard, ModelParallel* parallel)
    : c_(c), recompute_(recompute), shard_(std::move(shard)), mp_(parallel ? parallel : &one_rank_) {
  c_.validate();
  specs_ = param_specs(c_, shard_);
  ranges_ = shard_.ranges(c_);
  auto idx = [&](const std::string& name) {
    for (size_t i = 0; i < specs_.size(); ++i)
      if (specs_[i].name == name) return i;
    IEVO_FAIL("model has no parameter ", name);
  };
  head_chunk_tokens = default_head_chunk_tokens(shard_.vocab(c_));
  embed_ = norm_ = head_ = kAbsent;
  if (shard_.first) embed_ = idx("model.embed_tokens.weight");
  if (shard_.last) {
    norm_ = idx("model.norm.weight");
    head_ = c_.tie_embeddings ? idx("model.embed_tokens.weight") : idx("lm_head.weight");
  }
  layers_.resize(c_.num_layers);
  for (const LayerRange& r : ranges_)
    for (int64_t l = r.begin; l < r.end; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      layers_[l] = {idx(p + "input_layernorm.weight"), idx(p + "self_attn.q_proj.weight"),
                    idx(p + "self_attn.k_proj.weight"), idx(p + "self_attn.v_proj.weight"),
                    idx(p + "self_attn.o_proj.weight"), idx(p + "post_attention_layernorm.weight"),
                    idx(p + "mlp.gate_proj.weight"), idx(p + "mlp.up_proj.weight"),
                    idx(p + "mlp.down_proj.weight")};
    }
}

std::vector<HookLayerParams> Llama::hook_layers() const {
  std::vector<HookLayerParams> out(c_.num_layers + 2);
  if (shard_.first) out[0] = {{embed_}, {}, {embed_}};  // the backward only scatters dx into dW
  for (const LayerRange& r : ranges_)
    for (int64_t l = r.begin; l < r.end; ++l) {
      const LayerIdx& L = layers_[l];
      std::vector<size_t> w = {L.ln1, L.wq, L.wk, L.wv, L.wo, L.ln2, L.wg, L.wu, L.wd};
      out[l + 1] = {w, w, w};
    }
  if (shard_.last) {
    std::vector<size_t> head = {norm_, head_};
    out[c_.num_layers + 1] = {head, head, head};
  }
  return out;
}

const Tensor& Llama::head_weight(const ParamStore& p) const { return p[head_]; }

// Rows: x, a have this rank's n residual-stream tokens; n1, n2, the projections and the MLP the
// micro-batch's N tokens (ModelParallel::gather_input); attention runs on the layout that
// scatter_heads gives (Ulysses: all tokens, 1/S of the heads).
void Llama::block_forward(const ParamStore& p, int layer, const Batch& b, const Tensor& x,
                          BlockActs& a) {
  const LayerIdx& L = layers_[layer];
  const int64_t hd = c_.hd();
  const DType dt = x.dtype();
  const Device dev = x.device();
  a.x = x;
  // Attention branch.
  a.n1 = mp_->gather_input(rmsnorm(x, p[L.ln1], c_.norm_eps, a.rstd1));
  const int64_t N = a.n1.size(0);
  const std::vector<Tensor> qkv = linears(a.n1, {&p[L.wq], &p[L.wk], &p[L.wv]});
  Tensor q = qkv[0].view({N, -1, hd}), k = qkv[1].view({N, -1, hd}), v = qkv[2].view({N, -1, hd});
  rotate_qk(q, k, b.positions, false);
  const std::vector<Tensor> heads = mp_->scatter_heads({q, k, v}, true);  // the projections are dead
  a.q = heads[0];
  a.k = heads[1];
  a.v = heads[2];
  a.attn = Tensor::empty(a.q.shape(), dt, dev);
  a.lse = Tensor::empty({a.q.size(1), a.q.size(0)}, stat_dtype(dt), dev);
  attention_forward(a.q, a.k, a.v, b.cu_seqlens, b.max_seqlen, a.attn, a.lse, b.cu_seqlens_host);
  a.o = mp_->gather_heads({a.attn})[0];
  a.a = residual_linear(a.o.view({N, -1}), p[L.wo], x);
  // MLP branch (its down projection runs in the caller, inside the layer's hooks).
  a.n2 = mp_->gather_input(rmsnorm(a.a, p[L.ln2], c_.norm_eps, a.rstd2));
  const std::vector<Tensor> gate_up = linears(a.n2, {&p[L.wg], &p[L.wu]});
  a.gate = gate_up[0];
  a.up = gate_up[1];
  a.h = Tensor::empty(a.gate.shape(), dt, dev);
  swiglu_forward(a.gate, a.up, a.h);
}

void Llama::rotate_qk(Tensor& q, Tensor& k, const Tensor& positions, bool backward) const {
  auto rotate = [&](Tensor& t) {
    if (backward)
      rope_backward(t, positions, c_.rope_theta, t);
    else
      rope_forward(t, positions, c_.rope_theta, t);
  };
  Tensor qk = adjacent_view({q, k}, 1);
  if (qk.defined()) {
    rotate(qk);
    return;
  }
  rotate(q);
  rotate(k);
}

// x + g(h W^T) for an output projection: one GEMM with the add in its epilogue when g is the
// identity, else the reduction and then the add.
Tensor Llama::residual_linear(const Tensor& h, const Tensor& w, const Tensor& x) {
  if (!mp_->reduces_output()) {
    Tensor y = Tensor::empty({h.size(0), w.size(0)}, h.dtype(), h.device());
    matmul_add(h, false, w, true, x, y);
    return y;
  }
  Tensor y = mp_->reduce_output(linear(h, w));
  add(y, x, y);
  return y;
}

// Given dy = d loss / d(block output), accumulates parameter gradients and returns d loss / d x.
Tensor Llama::block_backward(const ParamStore& p, int layer, const Batch& b, const BlockActs& a,
                             const Tensor& dy, ParamStore& g) {
  const LayerIdx& L = layers_[layer];
  const DType dt = dy.dtype();
  const Device dev = dy.device();
  const int64_t n = dy.size(0), d = c_.hidden_size, N = a.n2.size(0);
  // Each activation is dead once its weight gradient is taken, so the gradient flowing back is
  // written over it (h -> dh, gate/up -> dgate/dup, n2 -> dn2, a -> da, n1 -> dn1): a block's
  // backward allocates only dout and dq/dk/dv, none of the [N, F] buffers (peak memory).
  // out = a + Wd h: da = dy + (norm-backward of the MLP branch)
  Tensor dyg = mp_->gather_output_grad(dy);
  Tensor dh = weight_grads_then_input_grad(a.h, {{dyg, p[L.wd], g.accumulator(L.wd)}});
  Tensor dgate = a.gate, dup = a.up;
  swiglu_backward(dh, a.gate, a.up, dgate, dup);
  Tensor dn2 = weight_grads_then_input_grad(a.n2, {{dgate, p[L.wg], g.accumulator(L.wg)}, {dup, p[L.wu], g.accumulator(L.wu)}});
  Tensor da = a.a;  // the norm's backward + dy (the residual path)
  ParamStore::Accumulator dln2 = g.accumulator(L.ln2);
  rmsnorm_backward(mp_->reduce_input_grad(dn2), a.a, p[L.ln2], a.rstd2, da, dln2.tensor, dy, dln2.beta);
  // a = x + Wo attn
  Tensor dag = mp_->gather_output_grad(da);
  Tensor dout = Tensor::empty(a.o.shape(), dt, dev);
  Tensor dout2 = dout.view({N, -1});
  linear_backward(dag, a.o.view({N, -1}), p[L.wo], dout2, false, g.accumulator(L.wo));
  Tensor dattn = mp_->scatter_heads({dout}, true)[0];
  const std::vector<Tensor> dqkv = grads_like({&a.q, &a.k, &a.v});  // laid out as q, k, v
  Tensor dq = dqkv[0], dk = dqkv[1], dv = dqkv[2];
  attention_backward(dattn, a.q, a.k, a.v, a.attn, a.lse, b.cu_seqlens, b.max_seqlen, dq, dk, dv,
                     b.cu_seqlens_host);
  const std::vector<Tensor> dheads = mp_->gather_heads({dq, dk, dv}, true);  // column slices of one matrix
  dq = dheads[0];
  dk = dheads[1];
  dv = dheads[2];
  rotate_qk(dq, dk, b.positions, true);
  Tensor dn1 = weight_grads_then_input_grad(a.n1, {{dq.view({N, -1}), p[L.wq], g.accumulator(L.wq)},
                                                  {dk.view({N, -1}), p[L.wk], g.accumulator(L.wk)},
                                                  {dv.view({N, -1}), p[L.wv], g.accumulator(L.wv)}});
  Tensor dx = Tensor::empty({n, d}, dt, dev);
  ParamStore::Accumulator dln1 = g.accumulator(L.ln1);
  rmsnorm_backward(mp_->reduce_input_grad(dn1), a.x, p[L.ln1], a.rstd1, dx, dln1.tensor, da, dln1.beta);
  return dx;
}

// Recompute::Selective: the norm outputs and the SwiGLU product are recomputed from x, a (with the
// same kernels, so the backward sees bit-identical values) and gate, up.
void Llama::drop_recomputable(BlockActs& a) const {
  a.n1 = Tensor();
  a.n2 = Tensor();
  a.h = Tensor();
}

void Llama::recompute_dropped(const ParamStore& p, int layer, BlockActs& a) const {
  const LayerIdx& L = layers_[layer];
  a.n1 = mp_->gather_input(rmsnorm(a.x, p[L.ln1], c_.norm_eps, a.rstd1));
  a.n2 = mp_->gather_input(rmsnorm(a.a, p[L.ln2], c_.norm_eps, a.rstd2));
  a.h = Tensor::empty(a.gate.shape(), a.gate.dtype(), a.gate.device());
  swiglu_forward(a.gate, a.up, a.h);
}

// The embedding of b.inputs: [n, d] rows of this rank's residual stream.
Tensor Llama::embed(const ParamStore& p, const Batch& b) {
  Tensor e = Tensor::empty({b.num_tokens(), c_.hidden_size}, p.dtype(), p.device());
  before(0, LayerHooks::Pass::Forward);
  mp_->embedding_forward(p[embed_], b.inputs, e, b.inputs_host);
  after(0, LayerHooks::Pass::Forward);
  return mp_->reduce_output(e);
}

// The blocks of a layer range; with `saved`, keeps each block's activations (or only its input
// under Recompute::Full).
Tensor Llama::run_blocks(const ParamStore& p, const LayerRange& r, const Batch& b, Tensor x,
                         std::vector<BlockActs>* saved) {
  using P = LayerHooks::Pass;
  if (saved) saved->assign(r.end - r.begin, BlockActs{});
  for (int64_t l = r.begin; l < r.end; ++l) {
    const int hl = static_cast<int>(l) + 1;
    BlockActs a;
    before(hl, P::Forward);
    block_forward(p, static_cast<int>(l), b, x, a);
    Tensor out;
    if (!mp_->reduces_output()) {  // out = a + Wd h, the add in the GEMM's epilogue
      out = residual_linear(a.h, p[layers_[l].wd], a.a);
      after(hl, P::Forward);
    } else {  // the reduction after the layer's hooks, then the add
      out = linear(a.h, p[layers_[l].wd]);
      after(hl, P::Forward);
      out = mp_->reduce_output(out);
      add(out, a.a, out);
    }
    if (saved) {
      BlockActs& s = (*saved)[l - r.begin];
      if (recompute_ == Recompute::Full) {
        s.x = a.x;
      } else {
        if (recompute_ == Recompute::Selective) drop_recomputable(a);
        s = std::move(a);
      }
    }
    x = out;
  }
  return x;
}

Tensor Llama::stage_forward(const ParamStore& p, int chunk, const Batch& b, const Tensor& input,
                            StageActs* acts, double grad_scale, ParamStore* g, LossSum* loss) {
  IEVO_CHECK(chunk >= 0 && chunk < static_cast<int>(ranges_.size()), "stage_forward: chunk ", chunk,
             " of ", ranges_.size());
  const bool first = chunk == 0 && shard_.first;
  const bool last = chunk + 1 == static_cast<int>(ranges_.size()) && shard_.last;
  IEVO_CHECK(first || input.defined(), "stage_forward: chunk ", chunk, " needs the previous stage's output");
  Tensor x = run_blocks(p, ranges_[chunk], b, first ? embed(p, b) : input, acts ? &acts->blocks : nullptr);
  if (!last) return x;
  // Final norm + fused LM head and loss; in training also its backward (chunked, never [N, V]).
  IEVO_CHECK(loss != nullptr, "stage_forward: the last stage needs somewhere to put the loss");
  IEVO_CHECK(!acts || g, "stage_forward: training needs gradients");
  using P = LayerHooks::Pass;
  const int hl = static_cast<int>(c_.num_layers) + 1;
  before(hl, acts ? P::Backward : P::Forward);
  Tensor rstd;
  Tensor xg = mp_->gather_input(rmsnorm(x, p[norm_], c_.norm_eps, rstd));
  if (acts) {
    Tensor dxg = xg;  // the head's input gradient over its input (peak memory)
    ParamStore::Accumulator dw = g->accumulator(head_);
    loss->sum += mp_->head_loss(xg, head_weight(p), b.targets, grad_scale, head_chunk_tokens,
                                &loss->count, &dxg, &dw.tensor, dw.beta);
    acts->head_dx = Tensor::empty(x.shape(), x.dtype(), x.device());
    ParamStore::Accumulator dnorm = g->accumulator(norm_);
    rmsnorm_backward(mp_->reduce_input_grad(dxg), x, p[norm_], rstd, acts->head_dx, dnorm.tensor, Tensor(),
                     dnorm.beta);
  } else {
    loss->sum += mp_->head_loss(xg, head_weight(p), b.targets, 1.0, head_chunk_tokens, &loss->count,
                                nullptr, nullptr, 1.0f);
  }
  after(hl, acts ? P::Backward : P::Forward);
  return Tensor();
}

Tensor Llama::stage_backward(const ParamStore& p, int chunk, const Batch& b, StageActs& acts,
                             const Tensor& dy, ParamStore& g) {
  using P = LayerHooks::Pass;
  IEVO_CHECK(chunk >= 0 && chunk < static_cast<int>(ranges_.size()), "stage_backward: chunk ", chunk,
             " of ", ranges_.size());
  const bool first = chunk == 0 && shard_.first;
  const bool last = chunk + 1 == static_cast<int>(ranges_.size()) && shard_.last;
  Tensor dx = last ? acts.head_dx : dy;
  IEVO_CHECK(dx.defined(), "stage_backward: chunk ", chunk, " has no output gradient");
  acts.head_dx = Tensor();
  const LayerRange& r = ranges_[chunk];
  for (int64_t l = r.end - 1; l >= r.begin; --l) {
    BlockActs& a = acts.blocks[l - r.begin];
    before(static_cast<int>(l) + 1, P::Backward);
    if (recompute_ == Recompute::Full) {
      Tensor xin = a.x;
      block_forward(p, static_cast<int>(l), b, xin, a);
    } else if (recompute_ == Recompute::Selective) {
      recompute_dropped(p, static_cast<int>(l), a);
    }
    dx = block_backward(p, static_cast<int>(l), b, a, dx, g);
    after(static_cast<int>(l) + 1, P::Backward);
    a = BlockActs{};  // free this block's activations
  }
  acts.blocks.clear();
  if (!first) return dx;
  before(0, P::Backward);
  mp_->embedding_backward(mp_->gather_output_grad(dx), b.inputs, g[embed_], b.inputs_host);
  after(0, P::Backward);
  return Tensor();
}

void Llama::check_single_stage(const char* what) const {
  IEVO_CHECK(ranges_.size() == 1 && shard_.first && shard_.last, "Llama::", what,
             " runs the whole model; a pipeline stage uses stage_forward/stage_backward");
}

LossSum Llama::forward_backward(const ParamStore& p, const Batch& b, double grad_scale,
                                ParamStore& g) {
  check_single_stage("forward_backward");
  StageActs acts;
  LossSum ls;
  stage_forward(p, 0, b, Tensor(), &acts, grad_scale, &g, &ls);
  stage_backward(p, 0, b, acts, Tensor(), g);
  return ls;
}

LossSum Llama::loss(const ParamStore& p, const Batch& b) {
  check_single_stage("loss");
  LossSum ls;
  stage_forward(p, 0, b, Tensor(), nullptr, 1.0, nullptr, &ls);
  return ls;
}

Tensor Llama::logits(const ParamStore& p, const Batch& b) {
  check_single_stage("logits");
  IEVO_CHECK(shard_.tp == 1, "Llama::logits: the whole vocabulary needs parallel.tensor = 1");
  Tensor x = run_blocks(p, ranges_[0], b, embed(p, b), nullptr);
  const int hl = static_cast<int>(c_.num_layers) + 1;
  before(hl, LayerHooks::Pass::Forward);
  Tensor rstd;
  Tensor out = linear(rmsnorm(x, p[norm_], c_.norm_eps, rstd), head_weight(p));
  after(hl, LayerHooks::Pass::Forward);
  return out;
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
