#include "parallel/zero.h"

#include <algorithm>
#include <limits>

#include "runtime/ops/adamw.h"
#include "runtime/ops/elementwise.h"

namespace ievo {
namespace {

constexpr int64_t kAlign = ParamStore::kAlign;

int64_t aligned(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// dst = src (converting the dtype and moving across devices as needed); same number of elements.
void assign(Tensor dst, Tensor src) {
  src = src.view({src.numel()});
  dst = dst.view({dst.numel()});
  if (src.device() != dst.device()) src = src.to(dst.device());
  ops::cast(src, dst);
}

}  // namespace

ZeroLayout make_zero_layout(const std::vector<ParamSpec>& specs, const std::vector<int>& layer_of,
                            int shards, int64_t bucket_elems, bool split_at_layers,
                            const std::vector<bool>& deferred) {
  IEVO_CHECK(shards >= 1, "ZeRO layout: ", shards, " shards");
  IEVO_CHECK(layer_of.size() == specs.size(), "ZeRO layout: layer_of has ", layer_of.size(),
             " entries for ", specs.size(), " parameters");
  IEVO_CHECK(deferred.empty() || deferred.size() == specs.size(), "ZeRO layout: deferred has ",
             deferred.size(), " entries for ", specs.size(), " parameters");
  auto is_deferred = [&](size_t i) { return !deferred.empty() && deferred[i]; };
  ZeroLayout L;
  L.shards = shards;
  L.bucket_of.assign(specs.size(), -1);
  ZeroBucket cur;
  auto close = [&] {
    if (cur.tensors.empty()) return;
    const int64_t unit = static_cast<int64_t>(shards) * kAlign;
    cur.padded = (cur.hi - cur.lo + unit - 1) / unit * unit;
    cur.piece = cur.padded / shards;
    cur.full_offset = L.full_numel;
    cur.shard_offset = L.shard_numel;
    cur.deferred = is_deferred(cur.tensors.front());
    if (cur.deferred) {
      cur.deferred_offset = L.deferred_numel;
      L.deferred_numel += cur.padded;
    }
    L.full_numel += cur.padded;
    L.shard_numel += cur.piece;
    L.buckets.push_back(std::move(cur));
    cur = ZeroBucket{};
  };
  int64_t offset = 0;  // ParamStore's layout: every tensor starts at a multiple of kAlign
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t n = shape_numel(specs[i].shape), size = aligned(n);
    L.numel += n;
    if (!cur.tensors.empty() &&
        ((cur.hi - cur.lo + size > bucket_elems && !specs[i].joins_previous) ||
         (split_at_layers && layer_of[i] != layer_of[cur.tensors.back()]) ||
         is_deferred(i) != is_deferred(cur.tensors.back())))
      close();
    if (cur.tensors.empty()) cur.lo = offset;
    cur.tensors.push_back(i);
    cur.hi = offset + size;
    L.bucket_of[i] = static_cast<int>(L.buckets.size());
    offset += size;
  }
  close();
  return L;
}

ZeroLayout make_zero_layout(const std::vector<ParamSpec>& specs,
                            const std::vector<HookLayerParams>& layers, const ZeroConfig& zc,
                            int dp_size, DType compute) {
  IEVO_CHECK(zc.stage >= 0 && zc.stage <= 3, "parallel.zero: unknown ZeRO stage ", zc.stage,
             " (expected 0, 1, 2 or 3)");
  IEVO_CHECK(zc.bucket_mb > 0, "parallel.bucket_mb must be positive, got ", zc.bucket_mb);
  std::vector<int> layer_of(specs.size(), -1);
  for (size_t l = 0; l < layers.size(); ++l)
    for (size_t i : layers[l].writes)
      if (layer_of.at(i) < 0) layer_of[i] = static_cast<int>(l);
  for (size_t i = 0; i < specs.size(); ++i)
    IEVO_CHECK(layer_of[i] >= 0, "ZeRO: no hook layer writes the gradient of ", specs[i].name);
  const double elems = zc.bucket_mb * 1048576.0 / static_cast<double>(dtype_size(compute));
  IEVO_CHECK(zc.norm_weight.empty() || zc.norm_weight.size() == specs.size(),
             "ZeRO: norm_weight has ", zc.norm_weight.size(), " entries for ", specs.size(), " parameters");
  // Deferred buckets apart at every stage: the hooks may reduce the others early (overlap).
  return make_zero_layout(specs, layer_of, zc.stage == 0 ? 1 : dp_size,
                          std::max<int64_t>(1, static_cast<int64_t>(elems)), zc.stage == 3, zc.deferred);
}

ZeroMemory zero_memory(const ZeroLayout& L, int stage, DType compute, bool param_remainders) {
  const bool master_is_weights = compute == DType::F32 || compute == DType::F64;
  const int64_t cs = static_cast<int64_t>(dtype_size(compute));
  const int64_t ms = master_is_weights ? cs : 4;  // the moments' (and f32 master's) element size
  const int64_t master = master_is_weights ? 0 : compute == DType::BF16 && param_remainders ? 2 : 4;
  ZeroMemory m;
  m.params = (stage == 3 ? L.shard_numel : L.full_numel) * cs;
  m.grads = (stage >= 2 ? L.shard_numel + L.deferred_numel : L.full_numel) * cs;
  m.optimizer = L.shard_numel * (2 * ms + master);
  return m;
}

ZeroOptimizer::ZeroOptimizer(std::vector<ParamSpec> specs, std::vector<HookLayerParams> layers,
                             DType compute, Device device, Communicator& dp, const ZeroConfig& zc,
                             const AdamWConfig& oc)
    : specs_(std::move(specs)), layers_(std::move(layers)), compute_(compute), device_(device),
      dp_(dp), zc_(zc), oc_(oc) {
  layout_ = make_zero_layout(specs_, layers_, zc_, dp_.size(), compute_);
  master_is_weights_ = compute_ == DType::F32 || compute_ == DType::F64;
  master_dtype_ = master_is_weights_ ? compute_ : DType::F32;
  remainders_ = compute_ == DType::BF16 && zc_.param_remainders;
  shard_rank_ = layout_.shards == 1 ? 0 : dp_.rank();
  overlap_ = zc_.overlap == ZeroConfig::Overlap::On ||
             (zc_.overlap == ZeroConfig::Overlap::Auto && device_ == Device::CUDA);
  weights_ = ParamStore::unbound(specs_, compute_, device_);
  grads_ = ParamStore::unbound(specs_, compute_, device_);

  // AdamW segments: each tensor's part of this rank's piece of each bucket.
  for (size_t b = 0; b < layout_.buckets.size(); ++b) {
    const ZeroBucket& B = layout_.buckets[b];
    const int64_t p0 = shard_rank_ * B.piece, p1 = p0 + B.piece;
    for (size_t i : B.tensors) {
      const int64_t t0 = weights_.offset(i) - B.lo, t1 = t0 + shape_numel(specs_[i].shape);
      const int64_t s = std::max(t0, p0), e = std::min(t1, p1);
      if (s < e) segments_.push_back({static_cast<int>(b), s - p0, e - s, specs_[i].decay, i});
    }
  }
  // AdamW runs: consecutive segments of one piece with the same weight decay, the padding between
  // them included (zero gradient, moments and weight stay zero): one launch per run, not per
  // tensor (a Llama layer's 9 tensors in at most 4 runs).
  for (const Segment& s : segments_) {
    Segment* last = adamw_runs_.empty() ? nullptr : &adamw_runs_.back();
    if (last && last->bucket == s.bucket && last->decay == s.decay && s.start >= last->start + last->len)
      last->len = s.start + s.len - last->start;
    else
      adamw_runs_.push_back(s);
  }
  // Weighted norm: runs of segments with one weight, padding between them included (it is zero).
  if (std::any_of(zc_.norm_weight.begin(), zc_.norm_weight.end(), [](double w) { return w != 1.0; }))
    for (const Segment& s : segments_) {
      const double w = zc_.norm_weight[s.param];
      NormRun* last = norm_runs_.empty() ? nullptr : &norm_runs_.back();
      if (last && last->bucket == s.bucket && last->weight == w)
        last->len = s.start + s.len - last->start;
      else
        norm_runs_.push_back({s.bucket, s.start, s.len, w});
    }

  const int stage = zc_.stage;
  if (stage <= 2) {
    full_w_ = Tensor::zeros({layout_.full_numel}, compute_, device_);
    for (size_t b = 0; b < layout_.buckets.size(); ++b) {
      const ZeroBucket& B = layout_.buckets[b];
      bind_bucket(weights_, full_w_.slice(0, B.full_offset, B.full_offset + B.padded), static_cast<int>(b));
    }
  } else {
    shard_w_ = Tensor::zeros({layout_.shard_numel}, compute_, device_);
  }
  if (stage <= 1) {
    full_g_ = Tensor::zeros({layout_.full_numel}, compute_, device_);
    for (size_t b = 0; b < layout_.buckets.size(); ++b) {
      const ZeroBucket& B = layout_.buckets[b];
      bind_bucket(grads_, full_g_.slice(0, B.full_offset, B.full_offset + B.padded), static_cast<int>(b));
    }
  } else {
    shard_g_ = Tensor::zeros({layout_.shard_numel}, compute_, device_);
    if (layout_.deferred_numel > 0) {  // bound for good: the hooks never touch these buckets
      deferred_g_ = Tensor::zeros({layout_.deferred_numel}, compute_, device_);
      for (size_t b = 0; b < layout_.buckets.size(); ++b) {
        const ZeroBucket& B = layout_.buckets[b];
        if (B.deferred)
          bind_bucket(grads_, deferred_g_.slice(0, B.deferred_offset, B.deferred_offset + B.padded),
                      static_cast<int>(b));
      }
    }
  }
  if (!master_is_weights_)
    master_ = Tensor::zeros({layout_.shard_numel}, remainders_ ? DType::I16 : master_dtype_, device_);
  m_ = Tensor::zeros({layout_.shard_numel}, master_dtype_, device_);
  v_ = Tensor::zeros({layout_.shard_numel}, master_dtype_, device_);

  // Hook tables.
  const size_t nb = layout_.buckets.size();
  for (const HookLayerParams& l : layers_) {
    fwd_buckets_.push_back(buckets_of(l.reads_forward));
    bwd_buckets_.push_back(buckets_of(l.reads_backward));
    write_buckets_.push_back(buckets_of(l.writes));
  }
  writers_.assign(nb, 0);
  for (const auto& wb : write_buckets_)
    for (int b : wb) ++writers_[b];
  gathered_refs_.assign(nb, 0);
  pending_writers_.assign(nb, 0);
  gathered_.assign(nb, Tensor());
  grad_buffers_.assign(nb, Tensor());
  reduced_.assign(nb, false);
  writes_seen_.assign(nb, 0);
  gather_work_.resize(nb);
  weight_gather_.resize(nb);
}

std::vector<int> ZeroOptimizer::buckets_of(const std::vector<size_t>& params) const {
  std::vector<int> out;
  for (size_t i : params) {
    IEVO_CHECK(i < specs_.size(), "ZeRO: hook layer names parameter ", i, " of ", specs_.size());
    const int b = layout_.bucket_of[i];
    if (std::find(out.begin(), out.end(), b) == out.end()) out.push_back(b);
  }
  return out;
}

Tensor ZeroOptimizer::full_piece(Tensor& full, int b) {
  const ZeroBucket& B = layout_.buckets[b];
  const int64_t s = B.full_offset + shard_rank_ * B.piece;
  return full.slice(0, s, s + B.piece);
}

Tensor ZeroOptimizer::shard_piece(Tensor& shard, int b) {
  const ZeroBucket& B = layout_.buckets[b];
  return shard.slice(0, B.shard_offset, B.shard_offset + B.piece);
}

Tensor ZeroOptimizer::weight_piece(int b) {
  return zc_.stage <= 2 ? full_piece(full_w_, b) : shard_piece(shard_w_, b);
}
Tensor ZeroOptimizer::master_piece(int b) {
  IEVO_CHECK(!remainders_, "ZeRO: the master is kept as remainders (master_copy)");
  return master_is_weights_ ? weight_piece(b) : shard_piece(master_, b);
}
Tensor ZeroOptimizer::master_copy(int b, int64_t start, int64_t len, Device where) {
  if (!remainders_) return master_piece(b).slice(0, start, start + len);
  Tensor w = weight_piece(b).slice(0, start, start + len), r = shard_piece(master_, b).slice(0, start, start + len);
  if (where != device_) {
    w = w.to(where);
    r = r.to(where);
  }
  Tensor out = Tensor::empty({w.numel()}, DType::F32, where);
  ops::join_master(w, r, out);
  return out;
}
Tensor ZeroOptimizer::grad_piece(int b) {
  return zc_.stage <= 1 ? full_piece(full_g_, b) : shard_piece(shard_g_, b);
}

void ZeroOptimizer::bind_bucket(ParamStore& store, const Tensor& buf, int b) {
  const ZeroBucket& B = layout_.buckets[b];
  for (size_t i : B.tensors) {
    const int64_t rel = store.offset(i) - B.lo;
    store.bind(i, buf.slice(0, rel, rel + shape_numel(specs_[i].shape)).view(specs_[i].shape));
  }
}

void ZeroOptimizer::unbind_bucket(ParamStore& store, int b) {
  for (size_t i : layout_.buckets[b].tensors) store.unbind(i);
}

void ZeroOptimizer::fill_bucket(Tensor& dst, const ParamStore& src, int b) const {
  const ZeroBucket& B = layout_.buckets[b];
  IEVO_CHECK(src.size() == specs_.size(), "ZeRO: a store of ", src.size(), " tensors for ",
             specs_.size(), " parameters");
  dst.zero_();
  for (size_t i : B.tensors) {
    IEVO_CHECK(src.spec(i).name == specs_[i].name && src[i].shape() == specs_[i].shape,
               "ZeRO: store tensor ", i, " is ", src.spec(i).name, shape_str(src[i].shape()),
               ", expected ", specs_[i].name, shape_str(specs_[i].shape));
    const int64_t rel = weights_.offset(i) - B.lo;
    assign(dst.slice(0, rel, rel + src[i].numel()), src[i]);
  }
}

void ZeroOptimizer::set_weights(const ParamStore& full) { load_state(full, nullptr, nullptr, 0); }

void ZeroOptimizer::load_state(const ParamStore& master, const ParamStore* exp_avg,
                               const ParamStore* exp_avg_sq, int64_t steps_taken) {
  drain_all();
  release_prefetched();
  wait_weight_gathers();
  for (size_t bi = 0; bi < layout_.buckets.size(); ++bi) {
    const int b = static_cast<int>(bi);
    const ZeroBucket& B = layout_.buckets[b];
    Tensor tmp = Tensor::empty({B.padded}, master_dtype_, device_);
    Tensor own = tmp.slice(0, shard_rank_ * B.piece, (shard_rank_ + 1) * B.piece);
    fill_bucket(tmp, master, b);
    if (remainders_) {  // every rank rounds the whole bucket alike; keeps its piece's remainders
      auto mine = [&](const Tensor& t) { return t.slice(0, shard_rank_ * B.piece, (shard_rank_ + 1) * B.piece); };
      Tensor rem = Tensor::empty({B.padded}, DType::I16, device_);
      Tensor w = zc_.stage <= 2 ? full_w_.slice(0, B.full_offset, B.full_offset + B.padded)
                                : Tensor::empty({B.padded}, compute_, device_);
      ops::split_master(tmp, w, rem);
      if (zc_.stage == 3) shard_piece(shard_w_, b).copy_from(mine(w));
      shard_piece(master_, b).copy_from(mine(rem));
    } else if (zc_.stage <= 2) {
      assign(full_w_.slice(0, B.full_offset, B.full_offset + B.padded), tmp);  // every rank: all
    } else {
      assign(shard_piece(shard_w_, b), own);
    }
    if (!master_is_weights_ && !remainders_) assign(shard_piece(master_, b), own);
    for (auto [store, dst] : {std::pair{exp_avg, &m_}, std::pair{exp_avg_sq, &v_}}) {
      Tensor piece = shard_piece(*dst, b);
      if (store) {
        fill_bucket(tmp, *store, b);
        assign(piece, own);
      } else {
        piece.zero_();
      }
    }
  }
  t_ = steps_taken;
}

void ZeroOptimizer::gather_state(ParamStore* master, ParamStore* exp_avg, ParamStore* exp_avg_sq,
                                 int root) {
  wait_weight_gathers();
  const bool me = dp_.rank() == root;
  for (size_t bi = 0; bi < layout_.buckets.size(); ++bi) {
    const int b = static_cast<int>(bi);
    const ZeroBucket& B = layout_.buckets[b];
    for (auto [store, piece] : {std::pair{master, master_copy(b, 0, B.piece, device_)}, std::pair{exp_avg, shard_piece(m_, b)},
                                std::pair{exp_avg_sq, shard_piece(v_, b)}}) {
      Tensor full = piece;  // one shard: the piece is the whole bucket
      if (layout_.shards > 1) {
        full = Tensor::empty({B.padded}, master_dtype_, device_);
        dp_.all_gather(piece, full);
      }
      if (!me || !store) continue;
      for (size_t i : B.tensors) {
        const int64_t rel = weights_.offset(i) - B.lo, n = shape_numel(specs_[i].shape);
        IEVO_CHECK((*store)[i].shape() == specs_[i].shape, "ZeRO: gather into ",
                   (*store)[i].describe(), " for ", specs_[i].name);
        assign((*store)[i], full.slice(0, rel, rel + n));
      }
    }
  }
}

void ZeroOptimizer::begin_step(int micro_batches) {
  IEVO_CHECK(micro_batches >= 0, "ZeRO: begin_step(", micro_batches, ")");
  drain_all();  // left over from an interrupted step
  release_prefetched();
  micro_batches_ = micro_batches;
  writes_seen_.assign(layout_.buckets.size(), 0);
  reduced_.assign(reduced_.size(), false);
  bwd_calls_ = 0;
  if (zc_.stage <= 1) {  // full_g_ zeroed lazily: the first write of each gradient overwrites it
    grads_.zero_lazily();
    return;
  }
  shard_g_.zero_();
  if (deferred_g_.defined()) deferred_g_.zero_();
  for (size_t b = 0; b < grad_buffers_.size(); ++b) {  // left over from an interrupted step
    if (grad_buffers_[b].defined()) unbind_bucket(grads_, static_cast<int>(b));
    grad_buffers_[b] = Tensor();
  }
  live_grad_ = 0;
}

ZeroOptimizer::~ZeroOptimizer() {
  try {
    drain_all();
    release_prefetched();
    wait_weight_gathers();
  } catch (const std::exception&) {  // a failed device: nothing left to order
  }
}

// Stage 0: all-reduce of the bucket in full_g_; 1: reduce-scatter in place there; 2-3: of the
// micro-batch's bucket buffer, whose piece is then added to the gradient shard (complete()).
void ZeroOptimizer::issue_grad_reduce(int b) {
  const ZeroBucket& B = layout_.buckets[b];
  Pending p{b, Tensor(), nullptr, bwd_calls_};
  Tensor bucket;
  if (zc_.stage >= 2) {
    p.buf = bucket = grad_buffers_[b];
    grad_buffers_[b] = Tensor();
    unbind_bucket(grads_, b);
  } else {
    for (size_t i : B.tensors) grads_.materialize(i);  // one the backward did not write: zero
    bucket = full_g_.slice(0, B.full_offset, B.full_offset + B.padded);
  }
  Tensor own = bucket.slice(0, shard_rank_ * B.piece, (shard_rank_ + 1) * B.piece);
  if (overlap_) {  // also with one rank: the stream ordering is the same
    p.work = zc_.stage == 0 ? dp_.all_reduce_async(bucket) : dp_.reduce_scatter_async(bucket, own);
  } else if (dp_.size() > 1) {
    if (zc_.stage == 0)
      dp_.all_reduce(bucket);
    else
      dp_.reduce_scatter(bucket, own);  // in place
  }
  reduced_[b] = true;
  ++stats_.hook_reductions;
  pending_.push_back(std::move(p));
  if (!overlap_) drain_all();
}

void ZeroOptimizer::complete(Pending& p) {
  if (p.work) p.work->wait();  // the compute stream waits; then p.buf may be freed
  p.work.reset();
  if (zc_.stage <= 1) return;
  const ZeroBucket& B = layout_.buckets[p.bucket];
  Tensor own = p.buf.slice(0, shard_rank_ * B.piece, (shard_rank_ + 1) * B.piece);
  Tensor dst = shard_piece(shard_g_, p.bucket);
  ops::axpy(1.0, own, dst);  // accumulate over micro-batches
  live_grad_ -= static_cast<int64_t>(p.buf.nbytes());
  p.buf = Tensor();
}

void ZeroOptimizer::drain(int64_t issued_before) {
  while (!pending_.empty() && pending_.front().issued < issued_before) {
    complete(pending_.front());
    pending_.pop_front();
  }
}

void ZeroOptimizer::drain_all() { drain(INT64_MAX); }

// A deferred bucket's whole gradient (all micro-batches) -> this rank's piece of the sum. The
// buffer stays bound (its other pieces are undefined until begin_step zeroes it).
void ZeroOptimizer::reduce_deferred_bucket(int b) {
  const ZeroBucket& B = layout_.buckets[b];
  Tensor buf = deferred_g_.slice(0, B.deferred_offset, B.deferred_offset + B.padded);
  Tensor own = buf.slice(0, shard_rank_ * B.piece, (shard_rank_ + 1) * B.piece);
  if (dp_.size() > 1) dp_.reduce_scatter(buf, own);  // in place
  Tensor dst = shard_piece(shard_g_, b);
  dst.copy_from(own);
  reduced_[b] = true;
}

void ZeroOptimizer::start_gather(int b) {
  const ZeroBucket& B = layout_.buckets[b];
  Tensor buf = Tensor::empty({B.padded}, compute_, device_);
  if (overlap_)
    gather_work_[b] = dp_.all_gather_async(shard_piece(shard_w_, b), buf);
  else
    dp_.all_gather(shard_piece(shard_w_, b), buf);
  gathered_[b] = buf;
  live_gathered_ += static_cast<int64_t>(buf.nbytes());
  peak_gathered_ = std::max(peak_gathered_, live_gathered_);
}

void ZeroOptimizer::claim_gather(int b) {
  if (gather_work_[b]) gather_work_[b]->wait();
  gather_work_[b].reset();
  const auto it = std::find(prefetched_.begin(), prefetched_.end(), b);
  if (it != prefetched_.end()) {
    ++stats_.prefetch_hits;
    prefetched_.erase(it);
  }
  bind_bucket(weights_, gathered_[b], b);
}

void ZeroOptimizer::free_gathered(int b) {
  // The caching allocator gives freed memory to the compute stream again: it must first wait
  // for a gather still writing it.
  if (gather_work_[b]) gather_work_[b]->wait();
  gather_work_[b].reset();
  unbind_bucket(weights_, b);
  live_gathered_ -= static_cast<int64_t>(gathered_[b].nbytes());
  gathered_[b] = Tensor();
}

void ZeroOptimizer::release_prefetched() {
  for (int b : prefetched_) free_gathered(b);
  stats_.prefetch_misses += static_cast<int64_t>(prefetched_.size());
  prefetched_.clear();
  next_.clear();
}

// Hook layers run forward 0..L+1, then backward L+1..0 (in training the head's forward runs in
// its Backward pass); layers with nothing to gather (other pipeline stages') are skipped. A wrong
// guess (pipeline schedules, evaluation) only costs the gather: the next before_layer frees it.
std::vector<int> ZeroOptimizer::next_buckets(int layer, Pass pass) const {
  const int n = static_cast<int>(layers_.size());
  for (int guard = 0; guard <= 2 * n; ++guard) {
    if (pass == Pass::Forward) {
      if (layer + 1 < n - 1) {
        ++layer;
      } else if (layer + 1 == n - 1) {
        layer = n - 1;
        pass = Pass::Backward;
      } else {
        return {};
      }
    } else {
      if (layer == 0) return {};
      --layer;
    }
    const std::vector<int>& v = pass == Pass::Forward ? fwd_buckets_[layer] : bwd_buckets_[layer];
    if (!v.empty()) return v;
  }
  return {};
}

void ZeroOptimizer::wait_weight_gathers() {
  for (auto& w : weight_gather_)
    if (w) {
      w->wait();
      w.reset();
    }
}

void ZeroOptimizer::before_layer(int layer, Pass pass) {
  IEVO_CHECK(layer >= 0 && static_cast<size_t>(layer) < layers_.size(), "ZeRO: hook layer ", layer,
             " of ", layers_.size());
  if (zc_.stage == 1 || zc_.stage == 2)  // the weights this layer reads: their post-step gathers
    for (int b : pass == Pass::Forward ? fwd_buckets_[layer] : bwd_buckets_[layer])
      if (weight_gather_[b]) {
        weight_gather_[b]->wait();
        weight_gather_[b].reset();
        ++stats_.weight_gathers_waited;
      }
  if (zc_.stage == 3) {
    const std::vector<int>& cur = pass == Pass::Forward ? fwd_buckets_[layer] : bwd_buckets_[layer];
    for (int b : cur) {
      if (gathered_refs_[b]++ > 0) continue;
      if (!gathered_[b].defined()) start_gather(b);
      claim_gather(b);
    }
    if (overlap_) {  // prefetch the next layer's weights; free unclaimed ones it does not read
      next_ = next_buckets(layer, pass);
      auto wanted = [&](int b) { return std::find(next_.begin(), next_.end(), b) != next_.end(); };
      for (int b : std::vector<int>(prefetched_))
        if (!wanted(b)) {
          free_gathered(b);
          ++stats_.prefetch_misses;
          prefetched_.erase(std::find(prefetched_.begin(), prefetched_.end(), b));
        }
      for (int b : next_)
        if (!gathered_[b].defined()) {
          start_gather(b);
          prefetched_.push_back(b);
          ++stats_.prefetches;
        }
    }
  }
  if (pass != Pass::Backward) return;
  for (int b : write_buckets_[layer]) {
    if (zc_.stage <= 1) {
      IEVO_CHECK(!reduced_[b], "ZeRO: a backward writes bucket ", b, " (", specs_[layout_.buckets[b].tensors.front()].name,
                 ", ...) after its reduction: more micro-batches than begin_step(", micro_batches_, ") declared");
      continue;
    }
    if (layout_.buckets[b].deferred || grad_buffers_[b].defined()) continue;
    grad_buffers_[b] = Tensor::zeros({layout_.buckets[b].padded}, compute_, device_);
    bind_bucket(grads_, grad_buffers_[b], b);
    pending_writers_[b] = writers_[b];
    live_grad_ += static_cast<int64_t>(grad_buffers_[b].nbytes());
    peak_grad_ = std::max(peak_grad_, live_grad_);
  }
}

void ZeroOptimizer::after_layer(int layer, Pass pass) {
  if (zc_.stage == 3) {
    for (int b : pass == Pass::Forward ? fwd_buckets_[layer] : bwd_buckets_[layer]) {
      IEVO_CHECK(gathered_refs_[b] > 0, "ZeRO-3: after_layer(", layer, ") without before_layer");
      if (--gathered_refs_[b] > 0) continue;
      if (std::find(next_.begin(), next_.end(), b) != next_.end()) {  // read next: keep it
        unbind_bucket(weights_, b);
        prefetched_.push_back(b);
      } else {
        free_gathered(b);
      }
    }
  }
  if (pass != Pass::Backward) return;
  const int64_t call = bwd_calls_++;
  // Stages 0-1 reduce a bucket once the last micro-batch has written it (when that is known and
  // overlapping pays); stages 2-3 every micro-batch's bucket as soon as it is complete.
  const bool early = zc_.stage >= 2 || (overlap_ && micro_batches_ > 0);
  if (early) {
    for (int b : write_buckets_[layer]) {
      if (layout_.buckets[b].deferred) continue;  // reduced in finish_gradients, after pre_reduce
      if (zc_.stage <= 1) {
        if (++writes_seen_[b] == writers_[b] * micro_batches_) issue_grad_reduce(b);
        continue;
      }
      IEVO_CHECK(grad_buffers_[b].defined(), "ZeRO: after_layer(", layer, ") without before_layer");
      if (--pending_writers_[b] == 0) issue_grad_reduce(b);
    }
  }
  drain(call);  // those issued by earlier layers: overlapped with this layer's backward
}

double ZeroOptimizer::local_sum_squares() {
  if (norm_runs_.empty()) {  // every weight 1: whole buffers (padding is zero)
    if (zc_.stage == 0) return ops::sum_squares(full_g_);
    if (zc_.stage >= 2) return ops::sum_squares(shard_g_);
    double sum = 0;
    for (size_t b = 0; b < layout_.buckets.size(); ++b) sum += ops::sum_squares(grad_piece(static_cast<int>(b)));
    return sum;
  }
  double sum = 0;
  for (const NormRun& r : norm_runs_)
    if (r.weight != 0) sum += r.weight * ops::sum_squares(grad_piece(r.bucket).slice(0, r.start, r.start + r.len));
  return sum;
}

double ZeroOptimizer::finish_gradients() {
  const int nb = static_cast<int>(layout_.buckets.size());
  grads_.materialize_all();  // full_g_ is read whole below
  drain_all();
  release_prefetched();
  if (zc_.pre_reduce) zc_.pre_reduce(grads_);  // deferred (stages 0-1: all) gradients whole
  if (zc_.stage <= 1) {  // the buckets the backward hooks did not reduce
    for (int b = 0; b < nb; ++b) {
      if (reduced_[b] || dp_.size() == 1) continue;
      const ZeroBucket& B = layout_.buckets[b];
      Tensor bucket = full_g_.slice(0, B.full_offset, B.full_offset + B.padded);
      if (zc_.stage == 0) {
        dp_.all_reduce(bucket);
      } else {
        Tensor own = grad_piece(b);
        dp_.reduce_scatter(bucket, own);
      }
    }
    const double local = local_sum_squares();
    return zc_.stage == 0 ? local : dp_.all_reduce_sum(local);  // stage 0: the same on every rank
  }
  for (int b = 0; b < nb; ++b) {
    if (layout_.buckets[b].deferred) {
      reduce_deferred_bucket(b);
      continue;
    }
    IEVO_CHECK(reduced_[b] && !grad_buffers_[b].defined(), "ZeRO-", zc_.stage, ": the gradient of bucket ",
               b, " (", specs_[layout_.buckets[b].tensors.front()].name,
               ", ...) was not reduced: the model's backward must call the layer hooks");
  }
  return dp_.all_reduce_sum(local_sum_squares());
}

void ZeroOptimizer::step(double lr, double grad_scale) {
  grads_.materialize_all();
  drain_all();
  release_prefetched();  // a gather in flight reads the weight shard AdamW rewrites
  wait_weight_gathers();
  ++t_;
  for (const Segment& s : adamw_runs_) {
    ops::AdamWHyper h;
    h.lr = lr;
    h.beta1 = oc_.beta1;
    h.beta2 = oc_.beta2;
    h.eps = oc_.eps;
    h.weight_decay = s.decay ? oc_.weight_decay : 0.0;
    h.step = t_;
    h.grad_scale = grad_scale;
    auto part = [&](Tensor piece) { return piece.slice(0, s.start, s.start + s.len); };
    Tensor g = part(grad_piece(s.bucket));
    Tensor m = part(shard_piece(m_, s.bucket)), v = part(shard_piece(v_, s.bucket));
    if (remainders_) {
      Tensor w = part(weight_piece(s.bucket)), r = part(shard_piece(master_, s.bucket));
      ops::adamw_step_remainder(w, r, g, m, v, h);
      continue;
    }
    Tensor p = part(master_piece(s.bucket));
    if (master_is_weights_) {
      ops::adamw_step(p, g, m, v, h);
    } else {
      Tensor w = part(weight_piece(s.bucket));
      ops::adamw_step(p, g, m, v, h, &w);
    }
  }
  if ((zc_.stage == 1 || zc_.stage == 2) && layout_.shards > 1)
    for (size_t b = 0; b < layout_.buckets.size(); ++b) {
      const ZeroBucket& B = layout_.buckets[b];
      Tensor bucket = full_w_.slice(0, B.full_offset, B.full_offset + B.padded);
      Tensor own = full_piece(full_w_, static_cast<int>(b));
      if (overlap_)  // waited for by the first hook layer reading it (before_layer)
        weight_gather_[b] = dp_.all_gather_async(own, bucket);  // in place
      else
        dp_.all_gather(own, bucket);
    }
}

int64_t ZeroOptimizer::first_nonfinite_gradient() {
  drain_all();
  const size_t n = specs_.size();
  std::vector<double> bad(n, 0.0);  // 1 where this rank's piece of the parameter is not finite
  for (const Segment& s : segments_)
    if (bad[s.param] == 0 && !ops::all_finite(grad_piece(s.bucket).slice(0, s.start, s.start + s.len)))
      bad[s.param] = 1;
  if (layout_.shards > 1 && dp_.size() > 1) {  // stage 0: every rank scanned the same whole tensors
    Tensor flags = Tensor::from_vector(bad, {static_cast<int64_t>(n)}).to(device_);
    dp_.all_reduce(flags);
    bad = flags.to_double_vector();
  }
  for (size_t i = 0; i < n; ++i)
    if (bad[i] != 0) return static_cast<int64_t>(i);
  return -1;
}

void ZeroOptimizer::poison_gradient(size_t i) {
  IEVO_CHECK(i < specs_.size(), "ZeRO: poison_gradient(", i, ") of ", specs_.size(), " parameters");
  drain_all();  // no reduction may still be reading or writing it
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (zc_.stage <= 1 || layout_.buckets[layout_.bucket_of[i]].deferred) {
    ops::scale(grads_[i], nan);
    return;
  }
  for (const Segment& s : segments_)
    if (s.param == i) {
      Tensor part = grad_piece(s.bucket).slice(0, s.start, s.start + s.len);
      ops::scale(part, nan);
    }
}

ZeroMemory ZeroOptimizer::memory() const {
  auto bytes = [](const Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : int64_t{0}; };
  ZeroMemory m;
  m.params = bytes(full_w_) + bytes(shard_w_);
  m.grads = bytes(full_g_) + bytes(shard_g_) + bytes(deferred_g_);
  m.optimizer = bytes(master_) + bytes(m_) + bytes(v_);
  m.peak_gathered_params = peak_gathered_;
  m.peak_grad_buckets = peak_grad_;
  return m;
}

}  // namespace ievo
