#include "parallel/tensor_parallel.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/embedding.h"
#include "runtime/ops/matmul.h"
#include "runtime/ops/vocab_parallel.h"

namespace ievo {

SequenceParallel sequence_parallel_from_name(const std::string& s) {
  if (s == "none") return SequenceParallel::None;
  if (s == "megatron") return SequenceParallel::Megatron;
  if (s == "ulysses") return SequenceParallel::Ulysses;
  IEVO_FAIL("parallel.sequence: unknown value '", s, "' (expected none, megatron or ulysses)");
}

const char* sequence_parallel_name(SequenceParallel m) {
  switch (m) {
    case SequenceParallel::Megatron: return "megatron";
    case SequenceParallel::Ulysses: return "ulysses";
    default: return "none";
  }
}

Batch sequence_slice(const Batch& b, int S, int rank) {
  if (S == 1) return b;
  const int64_t N = b.num_tokens();
  IEVO_CHECK(N % S == 0, "parallel.sequence: ulysses: the micro-batch's ", N,
             " tokens are not divisible by parallel.sequence_size = ", S);
  const int64_t n = N / S;
  Batch out = b;
  out.inputs = b.inputs.slice(0, rank * n, (rank + 1) * n);
  out.targets = b.targets.slice(0, rank * n, (rank + 1) * n);
  out.positions = b.positions.slice(0, rank * n, (rank + 1) * n);
  if (b.inputs_host.defined()) out.inputs_host = b.inputs_host.slice(0, rank * n, (rank + 1) * n);
  if (b.targets_host.defined()) out.targets_host = b.targets_host.slice(0, rank * n, (rank + 1) * n);
  return out;
}

void validate_sequence_layout(const ModelConfig& c, int tp, SequenceParallel mode, int sp,
                              int64_t micro_batch_size, int64_t seq_len) {
  ModelShard shard;
  shard.tp = tp;
  shard.validate(c);  // parallel.tensor: heads, key/value heads, FFN, vocabulary
  IEVO_CHECK(sp >= 1, "parallel.sequence_size must be >= 1, got ", sp);
  IEVO_CHECK(mode == SequenceParallel::Ulysses || sp == 1, "parallel.sequence_size = ", sp,
             " needs parallel.sequence: ulysses (got ", sequence_parallel_name(mode), ")");
  if (mode == SequenceParallel::Megatron) {
    IEVO_CHECK(tp > 1, "parallel.sequence: megatron needs parallel.tensor > 1 (it shards the "
               "tensor group's activations along the sequence)");
    const int64_t n = micro_batch_size * seq_len;
    IEVO_CHECK(n % tp == 0, "parallel.sequence: megatron: the ", n,
               " tokens of a micro-batch (train.micro_batch_size ", micro_batch_size,
               " x data.seq_len ", seq_len, ") are not divisible by parallel.tensor = ", tp);
  }
  if (mode == SequenceParallel::Ulysses) {
    const int64_t heads = shard.heads(c), kv = shard.kv_heads(c);
    IEVO_CHECK(sp <= heads, "parallel.sequence_size = ", sp, " exceeds the ", heads,
               " attention heads per tensor-parallel rank (Ulysses gives each sequence rank whole heads)");
    IEVO_CHECK(heads % sp == 0 && kv % sp == 0, "parallel.sequence_size = ", sp,
               " must divide the attention heads (", heads, ") and key/value heads (", kv,
               ") per tensor-parallel rank (Ulysses splits them over the sequence ranks)");
    IEVO_CHECK(seq_len % sp == 0, "parallel.sequence: ulysses: data.seq_len = ", seq_len,
               " is not divisible by parallel.sequence_size = ", sp,
               " (each sequence rank holds a contiguous 1/S of the tokens)");
  }
}

TensorParallel::TensorParallel(const ModelConfig& c, const ModelShard& shard, SequenceParallel mode,
                               Communicator* tp, Communicator* sp)
    : c_(c), shard_(shard), mode_(mode), tp_(tp), sp_(sp) {
  IEVO_CHECK(tp_, "TensorParallel: no tensor-group communicator");
  tp_size_ = tp_->size();
  IEVO_CHECK(tp_size_ == shard.tp && tp_->rank() == shard.tp_rank, "TensorParallel: the tensor group (rank ",
             tp_->rank(), " of ", tp_size_, ") is not the shard's (rank ", shard.tp_rank, " of ",
             shard.tp, ")");
  shard_.validate(c_);
  if (mode_ == SequenceParallel::Ulysses) {
    IEVO_CHECK(sp_, "TensorParallel: Ulysses without a sequence-group communicator");
    sp_size_ = sp_->size();
  }
  IEVO_CHECK(mode_ != SequenceParallel::Megatron || tp_size_ > 1,
             "parallel.sequence: megatron needs parallel.tensor > 1");
}

Tensor TensorParallel::all_gather_tokens(const Tensor& x) {
  Shape s = x.shape();
  s[0] *= tp_size_;
  Tensor out = Tensor::empty(s, x.dtype(), x.device());
  tp_->all_gather(x.is_contiguous() ? x : x.clone(), out);
  return out;
}

Tensor TensorParallel::reduce_scatter_tokens(const Tensor& x) {
  IEVO_CHECK(x.size(0) % tp_size_ == 0, "parallel.sequence: megatron: ", x.size(0),
             " tokens are not divisible by parallel.tensor = ", tp_size_);
  Shape s = x.shape();
  s[0] /= tp_size_;
  Tensor out = Tensor::empty(s, x.dtype(), x.device());
  tp_->reduce_scatter(x.is_contiguous() ? x : x.clone(), out);
  return out;
}

Tensor TensorParallel::gather_input(const Tensor& x) {
  if (mode_ == SequenceParallel::Megatron) return all_gather_tokens(x);
  return x;
}

Tensor TensorParallel::reduce_input_grad(const Tensor& dx) {
  if (mode_ == SequenceParallel::Megatron) return reduce_scatter_tokens(dx);
  if (tp_size_ == 1) return dx;
  Tensor t = dx.is_contiguous() ? dx : dx.clone();
  tp_->all_reduce(t);
  return t;
}

Tensor TensorParallel::reduce_output(const Tensor& y) { return reduce_input_grad(y); }

Tensor TensorParallel::gather_output_grad(const Tensor& dy) { return gather_input(dy); }

namespace {

// The parts' shapes for Ulysses' all-to-all, named by `op`: 3-D [rows, heads, hd], the same rows,
// heads divisible by S. Returns each part's width in a rank's block: heads / S * hd (scatter) or
// heads * hd (gather).
std::vector<int64_t> head_block_widths(const std::vector<Tensor>& parts, int64_t S, bool scatter, const char* op) {
  IEVO_CHECK(!parts.empty(), op, ": no tensors");
  std::vector<int64_t> w;
  for (const Tensor& p : parts) {
    IEVO_CHECK(p.dim() == 3, op, ": expected [tokens, heads, head_dim], got ", p.describe());
    IEVO_CHECK(p.size(0) == parts[0].size(0) && p.dtype() == parts[0].dtype(), op, ": ", p.describe(),
               " against ", parts[0].describe());
    if (scatter)
      IEVO_CHECK(p.size(1) % S == 0, "Ulysses: ", p.size(1), " heads are not divisible by parallel.sequence_size = ", S);
    w.push_back((scatter ? p.size(1) / S : p.size(1)) * p.size(2));
  }
  return w;
}

// The parts as one contiguous [rows, sum of widths] matrix when they are its column slices, side
// by side; else undefined.
Tensor one_buffer(const std::vector<Tensor>& parts) {
  std::vector<Tensor> flat;
  for (const Tensor& p : parts) flat.push_back(p.view({p.size(0), -1}));
  Tensor whole = adjacent_view(flat, 1);
  return whole.defined() && whole.is_contiguous() ? whole : Tensor();
}

}  // namespace

// parts [n, H_i, hd] of this rank's n tokens -> [S n, H_i/S, hd]: block j of the send buffer
// ([n, sum_i H_i/S hd]: heads [j H_i/S, (j+1) H_i/S) of every part, side by side, for every local
// token) goes to sequence rank j; block j received holds rank j's tokens, which come j-th in the
// micro-batch, so the received [S n, sum_i H_i/S hd] holds the results as column slices.
std::vector<Tensor> TensorParallel::scatter_heads(const std::vector<Tensor>& parts, bool overwrite_parts) {
  if (sp_size_ == 1) return parts;
  const int64_t S = sp_size_, n = parts.empty() ? 0 : parts[0].size(0);
  const std::vector<int64_t> w = head_block_widths(parts, S, true, "Ulysses scatter_heads");
  const int64_t W = std::accumulate(w.begin(), w.end(), int64_t{0});
  const DType dt = parts[0].dtype();
  const Device dev = parts[0].device();
  const Tensor whole = overwrite_parts ? one_buffer(parts) : Tensor();  // read into send first
  Tensor send = Tensor::empty({S * n, W}, dt, dev);
  Tensor recv = whole.defined() ? whole.view({S * n, W}) : Tensor::empty({S * n, W}, dt, dev);
  std::vector<Tensor> out;
  int64_t c = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    Tensor dst = send.slice(1, c, c + w[i]).view({S, n, w[i]});
    ops::swap_leading_dims(parts[i].view({n, S, w[i]}), dst);
    out.push_back(recv.slice(1, c, c + w[i]).view({S * n, parts[i].size(1) / S, parts[i].size(2)}));
    c += w[i];
  }
  sp_->all_to_all(send, recv);
  return out;
}

// The inverse: parts [N, H_i/S, hd] (every token, this rank's heads) -> [N/S, H_i, hd], column
// slices of one [N/S, sum_i H_i hd].
std::vector<Tensor> TensorParallel::gather_heads(const std::vector<Tensor>& parts, bool overwrite_parts) {
  if (sp_size_ == 1) return parts;
  const int64_t S = sp_size_, N = parts.empty() ? 0 : parts[0].size(0);
  IEVO_CHECK(N % S == 0, "Ulysses: ", N, " tokens are not divisible by parallel.sequence_size = ", S);
  const std::vector<int64_t> w = head_block_widths(parts, S, false, "Ulysses gather_heads");
  const int64_t W = std::accumulate(w.begin(), w.end(), int64_t{0});
  const DType dt = parts[0].dtype();
  const Device dev = parts[0].device();
  Tensor send = one_buffer(parts);  // q, k, v's gradients as attention wrote them: no copy
  const bool sent_parts = send.defined();
  if (!sent_parts) {
    send = Tensor::empty({N, W}, dt, dev);
    int64_t c = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      Tensor dst = send.slice(1, c, c + w[i]);
      dst.copy_from(parts[i].view({N, -1}));
      c += w[i];
    }
  }
  const int64_t n = N / S;
  Tensor recv = Tensor::empty({N, W}, dt, dev);
  sp_->all_to_all(send, recv);
  // The results over what was sent, once it is sent, if the parts are no longer needed (or were copied).
  Tensor out = overwrite_parts || !sent_parts ? send.view({n, S * W}) : Tensor::empty({n, S * W}, dt, dev);
  std::vector<Tensor> result;
  int64_t c = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    Tensor dst = out.slice(1, S * c, S * (c + w[i])).view({n, S, w[i]});
    ops::swap_leading_dims(recv.slice(1, c, c + w[i]).view({S, n, w[i]}), dst);
    result.push_back(out.slice(1, S * c, S * (c + w[i])).view({n, S * parts[i].size(1), parts[i].size(2)}));
    c += w[i];
  }
  return result;
}

void TensorParallel::embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out,
                                       const Tensor& ids_host) {
  if (tp_size_ == 1) return ops::embedding_forward(table, ids, out, ids_host);
  ops::embedding_forward_range(table, ids, shard_.vocab_begin(c_), c_.vocab_size, out, ids_host);
}

void TensorParallel::embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable,
                                        const Tensor& ids_host) {
  if (tp_size_ == 1) return ops::embedding_backward(dout, ids, dtable, ids_host);
  ops::embedding_backward_range(dout, ids, shard_.vocab_begin(c_), c_.vocab_size, dtable, ids_host);
}

double TensorParallel::head_loss(const Tensor& h, const Tensor& w, const Tensor& targets,
                                 double grad_scale, int64_t chunk_tokens, int64_t* count, Tensor* dh,
                                 Tensor* dw, float dw_beta) {
  if (tp_size_ == 1)
    return ops::lm_head_loss(h, w, targets, grad_scale, chunk_tokens, count, dh, dw, dw_beta);
  const char* op = "TensorParallel::head_loss";
  IEVO_CHECK(h.defined() && h.dim() == 2 && h.is_contiguous(), op, ": tensor 'h' must be a contiguous [N, D]");
  IEVO_CHECK(w.defined() && w.dim() == 2, op, ": tensor 'w' must be [V_local, D]");
  const int64_t n = h.size(0), dim = h.size(1), vl = w.size(0), begin = shard_.vocab_begin(c_);
  check_shape(w, {shard_.vocab(c_), dim}, "w");
  check_shape(targets, {n}, "targets");
  IEVO_CHECK(chunk_tokens > 0, op, ": chunk_tokens must be positive, got ", chunk_tokens);
  const bool grad = dh && dh->defined();
  if (grad) check_shape(*dh, h.shape(), "dh");
  if (dw && dw->defined()) check_shape(*dw, w.shape(), "dw");
  const DType sd = ops::vocab_ce_stat_dtype(h.dtype());
  const int64_t T = tp_size_, rows = std::min(chunk_tokens, n);
  Tensor logits = Tensor::empty({rows, vl}, h.dtype(), h.device());
  double total = 0;
  for (int64_t s = 0; s < n; s += chunk_tokens) {
    const int64_t e = std::min(n, s + chunk_tokens), m = e - s;
    const Tensor hc = h.slice(0, s, e), tc = targets.slice(0, s, e);
    Tensor lc = logits.slice(0, 0, m);
    ops::matmul(hc, false, w, true, lc);
    // This rank's (lse, target logit) in its slot of the gathered [T, 2, m].
    Tensor gathered = Tensor::empty({T, 2, m}, sd, h.device());
    Tensor mine = gathered.select0(shard_.tp_rank);
    ops::vocab_ce_local(lc, tc, begin, c_.vocab_size, mine);
    Tensor flat = gathered.view({T * 2 * m});
    tp_->all_gather(mine.view({2 * m}), flat);  // in place: mine is flat's own slice
    Tensor lse = Tensor::empty({m}, sd, h.device());
    int64_t cnt = 0;
    total += ops::vocab_ce_combine(gathered, tc, c_.vocab_size, lse, &cnt);
    if (count) *count += cnt;
    if (!grad) continue;
    ops::vocab_ce_backward(lc, tc, begin, lse, grad_scale, lc);
    if (dw && dw->defined()) ops::matmul(lc, true, hc, false, *dw, 1.0f, std::exchange(dw_beta, 1.0f));
    Tensor dhc = dh->slice(0, s, e);  // after dw: dh may alias h
    ops::matmul(lc, false, w, false, dhc);
  }
  if (dw && dw->defined() && dw_beta == 0.0f) dw->zero_();  // no chunk: still to be written
  return total;
}

// ------------------------------------------------------------------------ replicated gradients

bool ReplicaGradients::any() const {
  return std::find(deferred.begin(), deferred.end(), true) != deferred.end();
}

std::vector<bool> partial_replicas(const std::vector<ParamSpec>& specs, SequenceParallel mode) {
  std::vector<bool> out(specs.size(), false);
  for (size_t i = 0; i < specs.size(); ++i)  // 1-D (norm) weights see every token on every rank
    out[i] = specs[i].replicas > 1 &&        // unless Megatron splits the tokens
             (specs[i].shape.size() != 1 || mode == SequenceParallel::Megatron);
  return out;
}

ReplicaGradients replica_gradients(const ModelConfig& c, const ModelShard& shard,
                                   SequenceParallel mode, Communicator& tp) {
  const std::vector<ParamSpec> mine = param_specs(c, shard);
  const std::vector<bool> is_partial = partial_replicas(mine, mode);
  ReplicaGradients r;
  r.deferred.assign(mine.size(), false);
  r.norm_weight.assign(mine.size(), 1.0);
  // Every rank's specs: which ranks hold the same slice as this one.
  std::vector<std::vector<ParamSpec>> all;
  for (int t = 0; t < shard.tp; ++t) {
    ModelShard s = shard;
    s.tp_rank = t;
    all.push_back(param_specs(c, s));
  }
  struct Partial {
    size_t index;
    std::vector<int> ranks;  // holders of this slice, ascending (this rank among them)
  };
  std::vector<Partial> partial;
  for (size_t i = 0; i < mine.size(); ++i) {
    const ParamSpec& p = mine[i];
    r.norm_weight[i] = 1.0 / std::max(1, p.replicas);
    if (!is_partial[i]) continue;
    Partial q{i, {}};
    for (int t = 0; t < shard.tp; ++t) {
      const ParamSpec& o = all[t][i];
      IEVO_CHECK(o.name == p.name, "replica_gradients: rank ", t, "'s parameter ", i, " is ", o.name,
                 ", not ", p.name);
      if (o.split_dim == p.split_dim && o.split_offset == p.split_offset && o.shape == p.shape)
        q.ranks.push_back(t);
    }
    IEVO_CHECK(static_cast<int>(q.ranks.size()) == p.replicas, "replica_gradients: ", p.name, " has ",
               p.replicas, " replicas in its spec but ", q.ranks.size(), " ranks hold its slice");
    r.deferred[i] = true;
    partial.push_back(std::move(q));
  }
  if (partial.empty()) return r;
  r.pre_reduce = [partial, &tp](ParamStore& grads) {
    // Every partial gradient in one buffer, all-gathered once: [T, P].
    int64_t total = 0;
    for (const Partial& q : partial) total += grads[q.index].numel();
    const Tensor& first = grads[partial[0].index];
    const int64_t T = tp.size();
    Tensor all = Tensor::empty({T, total}, first.dtype(), first.device());
    Tensor own = all.select0(tp.rank());
    int64_t off = 0;
    for (const Partial& q : partial) {
      const Tensor& g = grads[q.index];
      own.slice(0, off, off + g.numel()).copy_from(g.view({-1}));
      off += g.numel();
    }
    Tensor flat = all.view({T * total});
    tp.all_gather(own, flat);  // in place: own is this rank's slice
    off = 0;
    for (const Partial& q : partial) {
      Tensor g = grads[q.index].view({-1});
      const int64_t k = g.numel();
      g.copy_from(all.select0(q.ranks[0]).slice(0, off, off + k));
      for (size_t j = 1; j < q.ranks.size(); ++j) {
        const Tensor src = all.select0(q.ranks[j]).slice(0, off, off + k);
        ops::add(g, src, g);
      }
      off += k;
    }
  };
  return r;
}

}  // namespace ievo
