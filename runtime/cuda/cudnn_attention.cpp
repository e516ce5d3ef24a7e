// cuDNN SDPA through the cudnn-frontend graph API (see cudnn_attention.h). Kept in its own
// compilation unit: the frontend headers are large.
//
// Layout: ievo's packed q [N, Hq, hd] is cuDNN's ragged "THD" form: dims [S, Hq, smax, hd] with
// strides [smax*R, hd, R, 1] (R: q's row stride, Hq*hd when packed; q, k, v and their gradients
// may be column slices of wider matrices) and a ragged offset tensor [S+1] giving each sequence's
// first element (cu[s] * R); sequence lengths [S] drive the padding mask; the causal mask
// is the top-left diagonal band (right bound 0), equal to bottom-right since q and kv lengths
// match. Stats (natural-log lse) stay padded [S, Hq, smax, 1] in a scratch buffer.
// Graphs are cached by (direction, S', smax', Hq, Hkv, hd, deterministic, dtype), where S' and smax'
// are S and max_seqlen rounded up to powers of two (smax' >= 64): packed batches whose number
// of documents and longest document vary from step to step reuse a few graphs (building one
// takes ~1 s). The S' - S extra sequences are empty (length 0, offsets at the end).
// IEVO_CUDNN_ATTN_EXACT=1 in the environment disables the rounding (S' = S, smax' = max_seqlen
// rounded up to 64), e.g. to compare the two.
// Dense fast path: when the caller knows (from cu_seqlens on the host) that all S sequences have
// the same length L (a batch of B rows of T tokens, no packing), the graph is the plain BSHD one:
// dims [S, H, L, hd] with the same strides and no offsets, lengths or padding mask (no per-call
// offset kernel, cuDNN's dense kernels).
// IEVO_CUDNN_ATTN_DENSE=0 turns it off (e.g. to compare).
// Plan choice: as for the GEMMs (runtime/ops/matmul.cu), every execution plan the heuristics
// offer (modes A and FALLBACK) is built and each is timed on the graph's first call with the real
// operands (1 warm-up + 3 runs, CUDA events); the fastest is kept. The outputs are written by
// every trial and again by the real call. IEVO_CUDNN_ATTN_AUTOTUNE=0 (or run.deterministic) keeps
// the heuristic's first plan; IEVO_CUDNN_ATTN_AUTOTUNE=log also prints each plan's time.
#include "runtime/cuda/cudnn_attention.h"

#include <cudnn.h>
#include <cudnn_frontend.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "runtime/cuda/attention_aux.h"
#include "runtime/cuda/check.h"
#include "runtime/cuda/cuda.h"
#include "runtime/env.h"

namespace fe = cudnn_frontend;

namespace ievo::cuda::cudnn_attn {
namespace {

enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kSeqQ, kSeqKV, kOffQ, kOffK, kOffV, kOffO,
  kDO = 101, kDQ, kDK, kDV
};

struct Key {
  bool bwd;
  int64_t b, smax, hq, hkv, hd;
  bool det;
  bool f16;    // io type: fp16, else bf16
  bool dense;  // b sequences of exactly smax tokens: no offsets, no padding mask
  // Row strides (elements between tokens) of Q, K, V, and of dQ, dK, dV in the backward; O and
  // dO are packed (hq * hd).
  int64_t rs_q, rs_k, rs_v;
  auto tie() const { return std::tie(bwd, b, smax, hq, hkv, hd, det, f16, dense, rs_q, rs_k, rs_v); }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

struct Entry {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;  // of `plan`
  int64_t plan = -1;      // index of the plan that runs; -1: the heuristic's choice
  bool tune = false;      // all plans built; time them on the first call
};

// 0: off, 1: on, 2: on and print each plan's time.
int autotune_mode() {
  static const int env = [] {
    const char* e = std::getenv("IEVO_CUDNN_ATTN_AUTOTUNE");
    if (!e) return 1;
    if (std::string(e) == "0") return 0;
    return std::string(e) == "log" ? 2 : 1;
  }();
  return deterministic() ? 0 : env;
}

struct State {
  std::mutex mu;
  cudnnHandle_t handle = nullptr;
  std::map<Key, Entry> graphs;
  bool dense_refused = false;
};

State& state() {
  static State* s = new State();  // leaked: graphs live until exit
  return *s;
}

#define IEVO_FE_CHECK(expr)                                                                  \
  do {                                                                                       \
    auto ievo_st_ = (expr);                                                                  \
    if (!ievo_st_.is_good())                                                                 \
      IEVO_FAIL("cuDNN attention: ", #expr, " failed: ", ievo_st_.get_message(), " [",        \
                __FILE__, ":", __LINE__, "]");                                               \
  } while (0)

cudnnHandle_t handle(State& st) {
  if (!st.handle) {
    cudnnStatus_t e = cudnnCreate(&st.handle);
    IEVO_CHECK(e == CUDNN_STATUS_SUCCESS, "cudnnCreate failed: ", cudnnGetErrorString(e));
  }
  return st.handle;
}

bool offsets_64() { return cudnnGetVersion() >= 90600; }

using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;

TensorPtr index_tensor(fe::graph::Graph& g, const char* name, int64_t uid, int64_t n, bool i64) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({n, 1, 1, 1})
                      .set_stride({1, 1, 1, 1})
                      .set_data_type(i64 ? fe::DataType_t::INT64 : fe::DataType_t::INT32));
}

// Strides of the ragged THD layout for dims [b, h, smax, hd], tokens rs elements apart (h * hd
// when packed).
std::vector<int64_t> thd_stride(int64_t rs, int64_t smax, int64_t hd) { return {smax * rs, hd, rs, 1}; }

// ragged == nullptr: the dense layout (same strides, every sequence smax long).
TensorPtr thd_tensor(fe::graph::Graph& g, const char* name, int64_t uid, int64_t b, int64_t h,
                     int64_t smax, int64_t hd, int64_t rs, const TensorPtr& ragged) {
  auto attrs = fe::graph::Tensor_attributes()
                   .set_name(name)
                   .set_uid(uid)
                   .set_dim({b, h, smax, hd})
                   .set_stride(thd_stride(rs, smax, hd));
  if (ragged) attrs.set_ragged_offset(ragged);
  return g.tensor(attrs);
}

// Stats [b, h, smax, 1], packed BHSD in a scratch buffer, converted to/from ievo's lse [h, N].
// (A dense graph could use lse itself, strides [smax, N, 1, 1], but cuDNN < 9.26 refuses
// non-packed stats in the backward.)
std::vector<int64_t> stats_stride(const Key& k) { return {k.hq * k.smax, k.smax, 1, 1}; }

void finish_build(fe::graph::Graph& g, cudnnHandle_t h, Entry& e) {
  IEVO_FE_CHECK(g.validate());
  IEVO_FE_CHECK(g.build_operation_graph(h));
  IEVO_FE_CHECK(g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}));
  IEVO_FE_CHECK(g.check_support(h));
  e.tune = autotune_mode() > 0;
  if (e.tune) {
    IEVO_FE_CHECK(g.build_plans(h, fe::BuildPlanPolicy_t::ALL));
    e.tune = g.get_execution_plan_count() > 1;
  } else {
    IEVO_FE_CHECK(g.build_plans(h));
  }
  IEVO_FE_CHECK(g.get_workspace_size(e.workspace));
}

// The ragged offsets of Q, K, V, O (none for a dense graph); a ragged graph's sequence lengths
// and padding mask go on the forward or backward attributes.
struct Offsets {
  TensorPtr q, k, v, o;
};
template <typename Attributes>
Offsets ragged_inputs(fe::graph::Graph& g, const Key& k, Attributes& opts) {
  if (k.dense) return {};
  const bool i64 = offsets_64();
  opts.set_padding_mask(true)
      .set_seq_len_q(index_tensor(g, "seq_q", kSeqQ, k.b, false))
      .set_seq_len_kv(index_tensor(g, "seq_kv", kSeqKV, k.b, false));
  return {index_tensor(g, "off_q", kOffQ, k.b + 1, i64), index_tensor(g, "off_k", kOffK, k.b + 1, i64),
          index_tensor(g, "off_v", kOffV, k.b + 1, i64), index_tensor(g, "off_o", kOffO, k.b + 1, i64)};
}

// A plan's graph: bf16 or f16 in and out, fp32 inside.
fe::graph::Graph& new_graph(Entry& e, const Key& k) {
  e.graph = std::make_shared<fe::graph::Graph>();
  e.graph->set_io_data_type(k.f16 ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return *e.graph;
}

// Both directions' inputs Q, K, V (ragged or dense), with the offsets for the other tensors.
struct Inputs {
  TensorPtr q, k, v;
  Offsets off;
};
template <typename Attributes>
Inputs qkv_inputs(fe::graph::Graph& g, const Key& k, Attributes& opts) {
  const Offsets off = ragged_inputs(g, k, opts);
  return {thd_tensor(g, "Q", kQ, k.b, k.hq, k.smax, k.hd, k.rs_q, off.q),
          thd_tensor(g, "K", kK, k.b, k.hkv, k.smax, k.hd, k.rs_k, off.k),
          thd_tensor(g, "V", kV, k.b, k.hkv, k.smax, k.hd, k.rs_v, off.v), off};
}

// The softmax stats' attributes, the forward's output and the backward's input.
fe::graph::Tensor_attributes& stats_attributes(fe::graph::Tensor_attributes& t, const Key& k) {
  return t.set_uid(kStats)
      .set_data_type(fe::DataType_t::FLOAT)
      .set_dim({k.b, k.hq, k.smax, 1})
      .set_stride(stats_stride(k));
}

Entry build_forward(const Key& k, cudnnHandle_t h, float scale) {
  Entry e;
  auto& g = new_graph(e, k);
  auto opts = fe::graph::SDPA_attributes()
                  .set_name("ievo_sdpa")
                  .set_generate_stats(true)
                  .set_attn_scale(scale)
                  .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                  .set_diagonal_band_right_bound(0);
  const Inputs in = qkv_inputs(g, k, opts);
  auto [o, stats] = g.sdpa(in.q, in.k, in.v, opts);
  o->set_output(true)
      .set_uid(kO)
      .set_dim({k.b, k.hq, k.smax, k.hd})
      .set_stride(thd_stride(k.hq * k.hd, k.smax, k.hd));
  if (in.off.o) o->set_ragged_offset(in.off.o);
  stats_attributes(stats->set_output(true), k);
  finish_build(g, h, e);
  return e;
}

Entry build_backward(const Key& k, cudnnHandle_t h, float scale) {
  Entry e;
  auto& g = new_graph(e, k);
  auto opts = fe::graph::SDPA_backward_attributes()
                  .set_name("ievo_sdpa_backward")
                  .set_attn_scale(scale)
                  .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                  .set_diagonal_band_right_bound(0)
                  .set_deterministic_algorithm(k.det);
  const Inputs in = qkv_inputs(g, k, opts);
  auto o = thd_tensor(g, "O", kO, k.b, k.hq, k.smax, k.hd, k.hq * k.hd, in.off.o);
  auto dout = thd_tensor(g, "dO", kDO, k.b, k.hq, k.smax, k.hd, k.hq * k.hd, in.off.o);
  fe::graph::Tensor_attributes stats_in;
  auto stats = g.tensor(stats_attributes(stats_in.set_name("Stats"), k));
  auto [dq, dk, dv] = g.sdpa_backward(in.q, in.k, in.v, o, dout, stats, opts);
  dq->set_output(true).set_uid(kDQ).set_dim({k.b, k.hq, k.smax, k.hd})
      .set_stride(thd_stride(k.rs_q, k.smax, k.hd));
  dk->set_output(true).set_uid(kDK).set_dim({k.b, k.hkv, k.smax, k.hd})
      .set_stride(thd_stride(k.rs_k, k.smax, k.hd));
  dv->set_output(true).set_uid(kDV).set_dim({k.b, k.hkv, k.smax, k.hd})
      .set_stride(thd_stride(k.rs_v, k.smax, k.hd));
  if (in.off.q) {
    dq->set_ragged_offset(in.off.q);
    dk->set_ragged_offset(in.off.k);
    dv->set_ragged_offset(in.off.v);
  }
  finish_build(g, h, e);
  return e;
}

// Per-call scratch: lengths, ragged offsets (of Q, K, V, and of O and dO) and padded stats.
struct Aux {
  DeviceBuffer seq_len, off_q, off_k, off_v, off_o, stats;
};

Aux make_aux(const int32_t* cu, int num_seqs, const Key& k, cudaStream_t s) {
  Aux a;
  const bool i64 = offsets_64();
  const size_t osz = i64 ? 8 : 4;
  a.seq_len = DeviceBuffer(k.b * sizeof(int32_t));
  a.off_q = DeviceBuffer((k.b + 1) * osz);
  a.off_k = DeviceBuffer((k.b + 1) * osz);
  a.off_v = DeviceBuffer((k.b + 1) * osz);
  a.off_o = DeviceBuffer((k.b + 1) * osz);
  a.stats = DeviceBuffer(static_cast<size_t>(k.b * k.hq * k.smax) * sizeof(float));
  const attn::OffsetMuls muls{{k.rs_q, k.rs_k, k.rs_v, k.hq * k.hd}};
  const attn::OffsetPtrs offs{{a.off_q.data(), a.off_k.data(), a.off_v.data(), a.off_o.data()}};
  attn::build_ragged_aux(cu, num_seqs, static_cast<int>(k.b), muls, i64, a.seq_len.as<int32_t>(), offs, s);
  return a;
}

// Times every built plan on the real operands and keeps the fastest (see the top of the file).
// A plan that fails to run is skipped; if none runs, the heuristic's first plan stays.
void tune(Entry& e, cudnnHandle_t h, std::unordered_map<int64_t, void*>& pack, cudaStream_t s) {
  e.tune = false;
  const int count = static_cast<int>(e.graph->get_execution_plan_count());
  std::vector<int64_t> wsz(static_cast<size_t>(count), -1);  // -1: the plan did not build
  int64_t most = 1;
  for (int i = 0; i < count; ++i) {
    int64_t w = 0;
    if (e.graph->get_workspace_size_plan_at_index(i, w).is_good()) most = std::max(most, wsz[i] = w);
  }
  DeviceBuffer ws(static_cast<size_t>(most));
  std::vector<float> ms;
  const int best = fastest_candidate(count, s, [&](int i) {
    return wsz[i] >= 0 && e.graph->execute_plan_at_index(h, pack, ws.data(), i).is_good();
  }, &ms);
  if (best >= 0) {
    e.plan = best;
    e.workspace = wsz[best];
  }
  if (autotune_mode() == 2) {
    std::string log;
    for (int i = 0; i < count; ++i) log += detail::cat("\n  plan ", i, ": ", ms[i] * 1000.0f, " us");
    std::fprintf(stderr, "ievo: cuDNN attention autotune: %d plans, plan %lld kept%s\n", count,
                 static_cast<long long>(e.plan), log.c_str());
  }
}

void run(State& st, Entry& e, std::unordered_map<int64_t, void*>& pack, cudaStream_t s) {
  cudnnHandle_t h = handle(st);
  cudnnStatus_t cs = cudnnSetStream(h, s);
  IEVO_CHECK(cs == CUDNN_STATUS_SUCCESS, "cudnnSetStream failed: ", cudnnGetErrorString(cs));
  if (e.tune) tune(e, h, pack, s);
  DeviceBuffer ws(static_cast<size_t>(std::max<int64_t>(e.workspace, 1)));
  if (e.plan < 0) IEVO_FE_CHECK(e.graph->execute(h, pack, ws.data()));
  else IEVO_FE_CHECK(e.graph->execute_plan_at_index(h, pack, ws.data(), e.plan));
}

int64_t pow2_at_least(int64_t x, int64_t lo) {
  int64_t p = lo;
  while (p < x) p *= 2;
  return p;
}

// Graph shape (S', smax') for a call; see the top of the file.
std::pair<int64_t, int64_t> graph_shape(int num_seqs, int max_seqlen) {
  const char* e = std::getenv("IEVO_CUDNN_ATTN_EXACT");
  if (e && std::string(e) == "1")
    return {num_seqs, std::max<int64_t>(64, (max_seqlen + 63) / 64 * 64)};
  return {pow2_at_least(num_seqs, 1), pow2_at_least(max_seqlen, 64)};
}

void* mut(const void* p) { return const_cast<void*>(p); }

Entry& graph_for(State& st, const Key& key, float scale) {
  auto it = st.graphs.find(key);
  if (it == st.graphs.end())
    it = st.graphs.emplace(key, key.bwd ? build_backward(key, handle(st), scale)
                                        : build_forward(key, handle(st), scale)).first;
  return it->second;
}

// The dense graph (uniform sequences), or nullptr: turned off with IEVO_CUDNN_ATTN_DENSE=0, or
// refused by this cuDNN (said once on stderr; the ragged graph is used from then on).
Entry* dense_graph(State& st, const Key& key, float scale) {
  static const bool on = env_switch_on("IEVO_CUDNN_ATTN_DENSE");
  if (!on || st.dense_refused) return nullptr;
  try {
    return &graph_for(st, key, scale);
  } catch (const std::exception& e) {
    st.dense_refused = true;
    std::fprintf(stderr, "ievo: cuDNN attention: the dense layout was refused (%s); using the ragged one\n",
                 e.what());
    return nullptr;
  }
}

}  // namespace

bool usable(std::string* why) {
  static std::string reason;
  static const bool ok = [] {
    const size_t v = cudnnGetVersion();
    if (v < 90000) {
      reason = detail::cat("cuDNN ", v, " < 9.0");
      return false;
    }
    const cudaDeviceProp& p = device_properties();
    if (p.major < 9) {
      reason = detail::cat("ragged (packed) layouts need sm_90+, this GPU is sm_", p.major, p.minor);
      return false;
    }
    return true;
  }();
  if (!ok && why) *why = reason;
  return ok;
}

bool supports_head_dim(int64_t hd) { return hd > 0 && hd % 8 == 0 && hd <= 128; }

void forward(const Tensor& q, const Tensor& k, const Tensor& v, const int32_t* cu, int num_seqs,
             int max_seqlen, int uniform_len, Tensor& out, Tensor& lse) {
  const int64_t n = q.size(0), hq = q.size(1), hkv = k.size(1), hd = q.size(2);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const bool f16 = q.dtype() == DType::F16;
  cudaStream_t s = current_stream();
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  const int64_t rq = q.row_stride(), rk = k.row_stride(), rv = v.row_stride();
  if (uniform_len > 0) {
    const Key key{false, num_seqs, uniform_len, hq, hkv, hd, false, f16, true, rq, rk, rv};
    if (Entry* e = dense_graph(st, key, scale)) {
      DeviceBuffer stats(static_cast<size_t>(n * hq) * sizeof(float));
      std::unordered_map<int64_t, void*> pack = {{kQ, mut(q.raw())}, {kK, mut(k.raw())},
                                                 {kV, mut(v.raw())}, {kO, out.raw()},
                                                 {kStats, stats.data()}};
      run(st, *e, pack, s);
      attn::padded_to_packed(stats.as<float>(), cu, num_seqs, static_cast<int>(hq), uniform_len,
                             static_cast<int>(n), lse.data<float>(), s);
      return;
    }
  }
  const auto [b, smax] = graph_shape(num_seqs, max_seqlen);
  const Key key{false, b, smax, hq, hkv, hd, false, f16, false, rq, rk, rv};
  Entry& e = graph_for(st, key, scale);
  Aux a = make_aux(cu, num_seqs, key, s);
  std::unordered_map<int64_t, void*> pack = {
      {kQ, mut(q.raw())},          {kK, mut(k.raw())},          {kV, mut(v.raw())},
      {kO, out.raw()},             {kStats, a.stats.data()},    {kSeqQ, a.seq_len.data()},
      {kSeqKV, a.seq_len.data()},  {kOffQ, a.off_q.data()},     {kOffK, a.off_k.data()},
      {kOffV, a.off_v.data()},     {kOffO, a.off_o.data()}};
  run(st, e, pack, s);
  attn::padded_to_packed(a.stats.as<float>(), cu, num_seqs, static_cast<int>(hq),
                         static_cast<int>(smax), static_cast<int>(n), lse.data<float>(), s);
}

void backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
              const Tensor& out, const Tensor& lse, const int32_t* cu, int num_seqs,
              int max_seqlen, int uniform_len, Tensor& dq, Tensor& dk, Tensor& dv) {
  const int64_t n = q.size(0), hq = q.size(1), hkv = k.size(1), hd = q.size(2);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const bool f16 = q.dtype() == DType::F16;
  cudaStream_t s = current_stream();
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  const int64_t rq = q.row_stride(), rk = k.row_stride(), rv = v.row_stride();
  IEVO_CHECK(dq.row_stride() == rq && dk.row_stride() == rk && dv.row_stride() == rv,
             "cuDNN attention backward: dq, dk, dv need the row strides of q, k, v");
  if (uniform_len > 0) {
    const Key key{true, num_seqs, uniform_len, hq, hkv, hd, deterministic(), f16, true, rq, rk, rv};
    if (Entry* e = dense_graph(st, key, scale)) {
      DeviceBuffer stats(static_cast<size_t>(n * hq) * sizeof(float));
      attn::packed_to_padded(lse.data<float>(), cu, num_seqs, static_cast<int>(hq), uniform_len,
                             static_cast<int>(n), stats.as<float>(), s);
      std::unordered_map<int64_t, void*> pack = {
          {kQ, mut(q.raw())},   {kK, mut(k.raw())},     {kV, mut(v.raw())},
          {kO, mut(out.raw())}, {kDO, mut(dout.raw())}, {kStats, stats.data()},
          {kDQ, dq.raw()},      {kDK, dk.raw()},        {kDV, dv.raw()}};
      run(st, *e, pack, s);
      return;
    }
  }
  const auto [b, smax] = graph_shape(num_seqs, max_seqlen);
  const Key key{true, b, smax, hq, hkv, hd, deterministic(), f16, false, rq, rk, rv};
  Entry& e = graph_for(st, key, scale);
  Aux a = make_aux(cu, num_seqs, key, s);
  IEVO_CUDA_CHECK(cudaMemsetAsync(a.stats.data(), 0, a.stats.size(), s));
  attn::packed_to_padded(lse.data<float>(), cu, num_seqs, static_cast<int>(hq),
                         static_cast<int>(smax), static_cast<int>(n), a.stats.as<float>(), s);
  std::unordered_map<int64_t, void*> pack = {
      {kQ, mut(q.raw())},        {kK, mut(k.raw())},         {kV, mut(v.raw())},
      {kO, mut(out.raw())},      {kDO, mut(dout.raw())},     {kStats, a.stats.data()},
      {kDQ, dq.raw()},           {kDK, dk.raw()},            {kDV, dv.raw()},
      {kSeqQ, a.seq_len.data()}, {kSeqKV, a.seq_len.data()}, {kOffQ, a.off_q.data()},
      {kOffK, a.off_k.data()},   {kOffV, a.off_v.data()},    {kOffO, a.off_o.data()}};
  run(st, e, pack, s);
}

}  // namespace ievo::cuda::cudnn_attn
