// Data-parallel training state with ZeRO stages 0-3 (Rajbhandari et al., 2020), over one
// data-parallel Communicator. It owns the weights the model reads, the gradients it writes, and
// the AdamW state, and decides which of them each rank keeps whole and which only in shards:
//
//   stage  weights (compute dtype)  gradients               master weights, Adam moments (f32)
//   0      full                     full, all-reduced       full, on every rank
//   1      full                     full, reduce-scattered  shard
//   2      full                     bucket while its layer's backward runs, then reduce-scattered
//                                   into a shard            shard
//   3      shard; a layer's weights  as 2                   shard
//          are gathered just before
//          it runs and freed after
//
// Layout. The parameters keep ParamStore's order and 64-element alignment. Consecutive tensors
// are grouped into buckets of about parallel.bucket_mb (stage 3: never across hook layers, so a
// layer is gathered bucket by bucket; never between a tensor and the one it joins,
// ParamSpec::joins_previous, so the model's joint projections find q/k/v and gate/up adjacent);
// each bucket is padded to a multiple of N*64 elements (N = data-parallel size; 1 for stage 0)
// and split evenly: rank r owns elements
// [r*S, (r+1)*S) of every bucket (S = padded / N). A rank's shard is its pieces of all buckets,
// back to back; the full buffers hold the padded buckets back to back. A piece may span tensors
// (or end in padding), so AdamW runs per segment = one tensor's part of a piece, with that
// tensor's weight decay.
//
// Deferred parameters (ZeroConfig::deferred; tensor/pipeline parallelism): their gradients stay
// whole through the backward (stages 2-3: in buckets of their own, bound all step) so that
// ZeroConfig::pre_reduce can sum them over another group first; finish_gradients then reduces them
// over data parallelism like the rest.
//
// Overlap (ZeroConfig::overlap; on for CUDA). The reductions a backward hook issues run on the
// communicator's stream (Communicator::*_async, ordered after the compute queued so far); the
// compute stream waits for them one hook layer later, or in finish_gradients, and only then are
// their buffers freed (the caching allocator hands freed memory to the compute stream at once).
// ZeRO-3 also issues the next hook layer's gathers before the current layer computes; a wrong
// guess is waited for and freed at the next hook. The price: about one more layer of gathered
// weights and of gradient buckets alive at once.
//
// One optimiser step:  begin_step(micro_batches); model forward/backward of every micro-batch on
// weights() and grads() (the model calls the LayerHooks); finish_gradients() -> global squared
// norm; step().
// With fp32 compute the master weights are the weights themselves (no second copy); with bf16
// the master is an f32 shard and the weights are rewritten from it (then all-gathered), or, with
// ZeroConfig::param_remainders, an i16 shard of remainders that with the weights' own bits make
// the f32 master (the weights are then the master's upper half, rounded).
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#include "models/llama.h"
#include "models/params.h"
#include "optim/adamw.h"
#include "parallel/communicator.h"

namespace ievo {

struct ZeroConfig {
  int stage = 0;           // 0..3
  double bucket_mb = 25;   // MiB of gradient (compute dtype) per bucket
  // Per parameter (empty: none). A deferred parameter's gradient stays whole and unreduced on
  // this rank for the whole step, at every stage (stages 2-3: its buckets hold only deferred
  // parameters, stay bound in grads() and are never reduced by the hooks); finish_gradients
  // reduces it over the data-parallel group right after pre_reduce.
  std::vector<bool> deferred{};
  // Called (if set) once per step at the start of finish_gradients, before any data-parallel
  // reduction in it. `grads` has at least every deferred parameter's whole local gradient bound
  // (stages 0-1: every parameter's). For linear cross-group sums that must precede the dp sum:
  // tensor-parallel replicas (sum over the tensor group), the tied embedding's pipeline copies.
  std::function<void(ParamStore& grads)> pre_reduce{};
  // Per parameter (empty: all 1): the weight of its squared gradient in the squared norm
  // finish_gradients returns (1/replicas for a slice replicated on several tensor-parallel
  // ranks, 0 for a copy counted on another rank). The caller sums the result over the tensor
  // and pipeline groups.
  std::vector<double> norm_weight{};
  // Communication overlapping compute (Auto: on for CUDA tensors, whose communicator runs
  // collectives on its own stream; On also works on the CPU, where it only reorders host work):
  // a gradient bucket's reduction is issued asynchronously in the backward hook that completes
  // it and waited for one hook layer later (or in finish_gradients); ZeRO-3 gathers the next hook
  // layer's weights (order: forward 0..L+1, backward L+1..0) while the current one computes.
  enum class Overlap { Auto, Off, On };
  Overlap overlap = Overlap::Auto;
  // bf16 compute only: keep the master weights as 16-bit remainders beside the bf16 weights
  // (ops::adamw_step_remainder; TransformerEngine's store_param_remainders) instead of an f32
  // copy: the same f32 master bit for bit, 2 bytes a parameter less. The weights are then the
  // master rounded to nearest with ties away from zero (ties to even without).
  bool param_remainders = false;
};

struct ZeroBucket {
  int64_t lo = 0, hi = 0;      // element range in the ParamStore layout (ParamStore::offset)
  int64_t padded = 0;          // hi - lo rounded up to a multiple of shards * ParamStore::kAlign
  int64_t full_offset = 0;     // where it starts in the full (padded) buffers
  int64_t piece = 0;           // padded / shards: elements each rank owns
  int64_t shard_offset = 0;    // where this rank's piece starts in the shard buffers
  std::vector<size_t> tensors; // parameter indices, in order
  bool deferred = false;       // only deferred parameters (stages 2-3: gradient kept whole)
  int64_t deferred_offset = 0; // stages 2-3: where it starts in the whole deferred gradient buffer
};

struct ZeroLayout {
  int shards = 1;               // ranks the buckets are split over (1 for stage 0)
  std::vector<ZeroBucket> buckets;
  std::vector<int> bucket_of;   // parameter index -> bucket
  int64_t numel = 0;            // parameters without any padding (Ψ)
  int64_t full_numel = 0;       // sum of padded bucket sizes
  int64_t shard_numel = 0;      // sum of pieces = full_numel / shards
  int64_t deferred_numel = 0;   // sum of padded sizes of the deferred buckets
};

// The bucket layout for these parameters. layer_of[i]: the hook layer of parameter i (buckets
// are split where it changes when split_at_layers); bucket_elems: target bucket size; deferred
// (empty: none): buckets are also split where it changes and those of deferred parameters marked.
ZeroLayout make_zero_layout(const std::vector<ParamSpec>& specs, const std::vector<int>& layer_of,
                            int shards, int64_t bucket_elems, bool split_at_layers,
                            const std::vector<bool>& deferred = {});
// The layout ZeroOptimizer uses for a model (the hook layers give layer_of; zc.deferred splits
// buckets at every stage).
ZeroLayout make_zero_layout(const std::vector<ParamSpec>& specs,
                            const std::vector<HookLayerParams>& layers, const ZeroConfig& zc,
                            int dp_size, DType compute);

// Bytes this rank holds between steps; transient peaks are what the hooks gathered at once.
struct ZeroMemory {
  int64_t params = 0;     // weights in the compute dtype (with fp32 compute: also the master)
  int64_t grads = 0;
  int64_t optimizer = 0;  // separate master copy (bf16 compute: f32, or i16 remainders) + Adam moments
  int64_t peak_gathered_params = 0;  // stage 3: most gathered weight bytes alive at once
  int64_t peak_grad_buckets = 0;     // stages 2-3: most gradient bucket bytes alive at once
  int64_t total() const { return params + grads + optimizer; }
};
// The same numbers from the layout alone (what `ievo plan` prints; transient peaks not included;
// stages 2-3 gradients include the whole deferred buckets).
// param_remainders: ZeroConfig's (only bf16 compute uses it).
ZeroMemory zero_memory(const ZeroLayout& layout, int stage, DType compute, bool param_remainders = false);

// What the overlap did (counts since construction).
struct ZeroOverlapStats {
  int64_t hook_reductions = 0;  // bucket reductions issued by the backward hooks
  int64_t prefetches = 0;       // stage 3: gathers issued for the predicted next hook layer
  int64_t prefetch_hits = 0;    // ... claimed by a layer (including buckets kept for the next)
  int64_t prefetch_misses = 0;  // ... freed unclaimed (a wrong guess)
  int64_t weight_gathers_waited = 0;  // stages 1-2: post-step weight all-gathers a forward hook waited for
};

class ZeroOptimizer final : public LayerHooks {
 public:
  // layers: the model's hook layers (Llama::hook_layers()). dp must outlive this object.
  ZeroOptimizer(std::vector<ParamSpec> specs, std::vector<HookLayerParams> layers, DType compute,
                Device device, Communicator& dp, const ZeroConfig& zc, const AdamWConfig& oc);
  // Waits (on the device) for collectives still in flight before their buffers are freed.
  ~ZeroOptimizer() override;

  // Starting weights, full and identical on every rank (any dtype/device): each rank keeps its part.
  void set_weights(const ParamStore& full);
  // Full optimiser state (resume): every rank passes the same full stores; nullptr moments: zero.
  void load_state(const ParamStore& master, const ParamStore* exp_avg, const ParamStore* exp_avg_sq,
                  int64_t steps_taken);
  // Full master weights and moments (ParamStore layout, any dtype/device) on `root`; the other
  // ranks take part in the gathers and may pass nullptr. Collective.
  void gather_state(ParamStore* master, ParamStore* exp_avg, ParamStore* exp_avg_sq, int root);
  // This rank's part of the optimiser state, without communication (sharded checkpoints,
  // launch/checkpoint_shards.h): one piece per segment (a tensor's part of this rank's piece of a
  // bucket; stage 0: every whole tensor). begin/end: the element range [begin, end) of parameter
  // `param`'s flat tensor; master/exp_avg/exp_avg_sq: views (this device, master dtype) of it.
  struct StatePiece {
    size_t param;
    int64_t begin, end;
    Tensor master, exp_avg, exp_avg_sq;
  };
  std::vector<StatePiece> state_pieces();

  // What the model reads and writes. With stage 3 (weights) and stages 2-3 (gradients) the
  // tensors are bound only while their hook layer runs; the model must call the hooks.
  const ParamStore& weights() const { return weights_; }
  ParamStore& grads() { return grads_; }

  // micro_batches: the forward_backward calls before finish_gradients (0: not known). With
  // overlap, stages 0-1 then reduce each bucket during the last micro-batch's backward (stages
  // 2-3 reduce during every micro-batch's backward anyway).
  void begin_step(int micro_batches = 0);
  // After the last micro-batch: zc.pre_reduce, then all-reduce (0) or reduce-scatter (1) the
  // gradient (2-3: the hooks did, except deferred buckets, reduce-scattered here). Returns the
  // squared L2 norm of the whole reduced gradient (sum over shards, all-reduced over dp), each
  // parameter weighted by zc.norm_weight.
  double finish_gradients();
  // AdamW on this rank's shard; gradients are multiplied by grad_scale (clipping) first. Then the
  // updated weights are all-gathered (stages 1-2). With overlap the gathers are only issued here:
  // each bucket's is waited for (on the device) by the first hook layer that reads it, so the
  // next step's forward starts while later buckets still travel (Megatron's
  // overlap_param_gather); everything else that reads the weights waits for all of them.
  void step(double lr, double grad_scale);

  // Numerical safety (launch/numerics.h), after finish_gradients: the lowest parameter index whose
  // reduced gradient holds a NaN or Inf on any data-parallel rank, -1 if none. Each rank scans its
  // own pieces (the AdamW segments; stage 0: every whole tensor) and the ranks agree by summing a
  // per-parameter flag vector. Collective over the data-parallel group.
  int64_t first_nonfinite_gradient();
  // Test hook (debug.nan_at_step), after the backward and before finish_gradients: multiplies
  // parameter i's gradient by NaN — its whole local gradient where that is kept (stages 0-1,
  // deferred parameters), else this rank's pieces of it in the reduced shard (some rank holds one).
  void poison_gradient(size_t i);
  int64_t steps_taken() const { return t_; }

  const ZeroLayout& layout() const { return layout_; }
  int stage() const { return zc_.stage; }
  bool overlap() const { return overlap_; }
  const ZeroOverlapStats& overlap_stats() const { return stats_; }
  ZeroMemory memory() const;

  void before_layer(int layer, Pass pass) override;
  void after_layer(int layer, Pass pass) override;

 private:
  struct Segment {   // one tensor's part of this rank's piece of a bucket
    int bucket;
    int64_t start;   // offset inside the piece
    int64_t len;
    bool decay;
    size_t param;    // parameter index
  };
  // segments_ merged where adjacent with the same decay (the AdamW launches; param: the first's)
  std::vector<Segment> adamw_runs_;
  struct NormRun {   // consecutive segments of one piece with the same norm weight
    int bucket;
    int64_t start, len;
    double weight;
  };
  Tensor full_piece(Tensor& full, int b);   // this rank's piece of bucket b in a full buffer
  Tensor shard_piece(Tensor& shard, int b); // ... in a shard buffer
  Tensor master_piece(int b);               // f32 or f64 (not with remainders_)
  // Elements [start, start + len) of this rank's master piece of bucket b in f32/f64: a view, or
  // with remainders_ joined into a new tensor on `where`.
  Tensor master_copy(int b, int64_t start, int64_t len, Device where);
  Tensor grad_piece(int b);
  Tensor weight_piece(int b);               // in the compute dtype (may be the master)
  void bind_bucket(ParamStore& store, const Tensor& bucket_buffer, int b);
  void unbind_bucket(ParamStore& store, int b);
  // Gradient reductions issued by the backward hooks, completed in issue order.
  struct Pending {
    int bucket;
    Tensor buf;                      // stages 2-3: the bucket's gradient buffer (freed when done)
    std::unique_ptr<CommWork> work;  // null: nothing to wait for
    int64_t issued;                  // backward hook call that issued it
  };
  void issue_grad_reduce(int b);     // bucket b's gradient of this micro-batch (0-1: step) is whole
  void complete(Pending& p);
  void drain(int64_t issued_before); // complete the pending reductions issued before that call
  void drain_all();
  void start_gather(int b);          // stage 3: allocate bucket b's weights, issue the all-gather
  void claim_gather(int b);          // ... wait for it and bind the weights
  void free_gathered(int b);
  void release_prefetched();         // free gathered buckets nobody has claimed
  std::vector<int> next_buckets(int layer, Pass pass) const;  // predicted next hook layer's
  void reduce_deferred_bucket(int b);
  double local_sum_squares();  // this rank's pieces of the reduced gradient, weighted
  std::vector<int> buckets_of(const std::vector<size_t>& params) const;
  // Buffer of bucket b in ParamStore layout -> ParamStore tensors, and back.
  void fill_bucket(Tensor& dst, const ParamStore& src, int b) const;

  std::vector<ParamSpec> specs_;
  std::vector<HookLayerParams> layers_;
  DType compute_, master_dtype_;
  Device device_;
  Communicator& dp_;
  ZeroConfig zc_;
  AdamWConfig oc_;
  ZeroLayout layout_;
  int shard_rank_ = 0;           // this rank's index among layout_.shards
  bool master_is_weights_ = false;
  bool remainders_ = false;      // master_ holds i16 remainders of the weights (param_remainders)
  std::vector<Segment> segments_;
  std::vector<NormRun> norm_runs_;  // empty: every weight is 1

  ParamStore weights_, grads_;   // what the model sees (bound to the buffers below)
  Tensor full_w_, full_g_;       // stages 0-2 / 0-1: padded full buffers
  Tensor shard_w_, shard_g_;     // stage 3 / 2-3: shard buffers
  Tensor deferred_g_;            // stages 2-3: whole gradients of the deferred buckets
  Tensor master_, m_, v_;        // shard buffers (master_ undefined when master_is_weights_; i16 with remainders_)

  // Hook state per bucket.
  std::vector<std::vector<int>> fwd_buckets_, bwd_buckets_, write_buckets_;  // per hook layer
  std::vector<int> writers_;     // hook layers whose backward writes into the bucket
  std::vector<int> gathered_refs_, pending_writers_;
  std::vector<Tensor> gathered_, grad_buffers_;
  std::vector<bool> reduced_;    // this step's gradient of the bucket is in the shard
  // Overlap state.
  bool overlap_ = false;
  int micro_batches_ = 0;        // declared by begin_step (0: unknown)
  std::vector<int> writes_seen_; // stages 0-1: backward hook calls that wrote the bucket
  std::deque<Pending> pending_;
  int64_t bwd_calls_ = 0;
  std::vector<std::unique_ptr<CommWork>> gather_work_;  // stage 3: all-gathers in flight
  // Stages 1-2 with overlap: the updated weights' all-gather of each bucket, issued by step() and
  // waited for by the first hook layer that reads the bucket (or wait_weight_gathers()).
  std::vector<std::unique_ptr<CommWork>> weight_gather_;
  void wait_weight_gathers();
  std::vector<int> next_;        // stage 3: buckets the next hook layer is expected to read
  std::vector<int> prefetched_;  // ... gathered but not yet claimed
  ZeroOverlapStats stats_;
  int64_t live_gathered_ = 0, live_grad_ = 0;
  int64_t peak_gathered_ = 0, peak_grad_ = 0;
  int64_t t_ = 0;
};

}  // namespace ievo
