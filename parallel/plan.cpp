#include "parallel/plan.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <sstream>

#include "models/llama.h"
#include "parallel/pipeline_schedule.h"
#include "runtime/error.h"

namespace ievo {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr int64_t kOverhead = int64_t{1} << 30;  // CUDA context + cuBLAS/cuDNN workspaces

// The table's unit: GiB, or MiB / KiB for small models (set by format_plan).
double g_unit = kGiB;
const char* g_unit_name = "GiB";

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%9.3f %s", bytes / g_unit, g_unit_name);
  return buf;
}

// Right-aligned to the width of gib() so the columns line up.
std::string pad(const std::string& s) { return s.size() >= 13 ? s : std::string(13 - s.size(), ' ') + s; }

std::string human(double bytes) {
  char buf[32];
  if (bytes >= kGiB) std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / kGiB);
  else if (bytes >= 1048576) std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / 1048576);
  else if (bytes >= 1024) std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024);
  else std::snprintf(buf, sizeof buf, "%.0f B", bytes);
  return buf;
}

// The activation estimate of plan.h, in bytes.
// block_sets: how many blocks' activations are kept (L; pipeline: stage 0's in-flight chunks'
// blocks); head: the stage runs the LM head.
int64_t activation_bytes(const PlanInput& in, int64_t block_sets, bool with_head) {
  const ModelConfig& m = in.model;
  const int64_t N = in.micro_batch_size * in.seq_len, b = static_cast<int64_t>(dtype_size(in.compute));
  const bool ulysses = in.sequence == SequenceParallel::Ulysses;
  // Tokens inside the tensor-parallel regions (Nr) and in the residual stream (n).
  const int64_t Nr = ulysses ? N / in.sp : N;
  const int64_t n = in.sequence == SequenceParallel::Megatron ? N / in.tp : Nr;
  ModelShard sh;
  sh.tp = in.tp;
  const int64_t d = m.hidden_size, q = m.q_dim() / in.tp, kv = sh.kv_heads(m) * m.hd(),
                F = m.ffn_hidden_size / in.tp, H = m.num_heads / in.tp, V = m.vocab_size / in.tp;
  const int64_t block = (2 * n * d + 2 * Nr * d + Nr * (2 * q + 2 * kv + 3 * F) + (ulysses ? Nr * q : 0)) * b +
                        (2 * n + Nr * H) * 4;
  const int64_t dropped = Nr * (2 * d + F) * b;  // selective: n1, n2, silu(gate)*up
  const int64_t kept = in.recompute == Recompute::Full        ? block_sets * n * d * b + block
                       : in.recompute == Recompute::Selective ? block_sets * (block - dropped) + dropped
                                                              : block_sets * block;
  // A block's backward: dout, dq, dk, dv and dx (dh, dgate/dup, dn2, da and dn1 are written over
  // the activations they replace, models/llama.cpp).
  const int64_t backward_tmp = Nr * (2 * q + 2 * kv) * b + n * d * b;
  const int64_t chunk = in.head_chunk_tokens > 0 ? in.head_chunk_tokens : Llama::default_head_chunk_tokens(V);
  const int64_t head = with_head ? (2 * Nr + n) * d * b + 2 * std::min<int64_t>(Nr, chunk) * V * 4 : 0;
  // The head's temporaries (before the blocks' backward) and a block's backward temporaries are
  // never alive at once.
  return kept + std::max(backward_tmp, head) + Nr * d * b;
}

// Stage 3: the most weight bytes gathered at once (one hook layer at a time, no prefetch).
// Stages 2-3: the most gradient-bucket bytes alive at once, replaying the backward order.
void transients(const ZeroLayout& L, const std::vector<HookLayerParams>& layers, int stage,
                DType compute, int64_t* params, int64_t* grads) {
  const int64_t cs = static_cast<int64_t>(dtype_size(compute));
  auto buckets = [&](const std::vector<size_t>& ps) {
    std::set<int> s;
    for (size_t i : ps) s.insert(L.bucket_of[i]);
    return s;
  };
  *params = *grads = 0;
  if (stage == 3)
    for (const auto& l : layers)
      for (const auto* reads : {&l.reads_forward, &l.reads_backward}) {
        int64_t sum = 0;
        for (int b : buckets(*reads)) sum += L.buckets[b].padded * cs;
        *params = std::max(*params, sum);
      }
  if (stage >= 2) {
    std::vector<int> writers(L.buckets.size(), 0);
    for (const auto& l : layers)
      for (int b : buckets(l.writes)) ++writers[b];
    std::vector<int> pending(L.buckets.size(), -1);
    int64_t live = 0;
    for (size_t k = layers.size(); k-- > 0;) {  // backward: last hook layer first
      const auto bs = buckets(layers[k].writes);
      for (int b : bs)
        if (pending[b] < 0) pending[b] = writers[b], live += L.buckets[b].padded * cs;
      *grads = std::max(*grads, live);
      for (int b : bs)
        if (--pending[b] == 0) live -= L.buckets[b].padded * cs;
    }
  }
}

const char* stage_formula(int stage, bool mixed, bool remainders) {
  static const char* mixed_f[] = {"2Ψ + 2Ψ + 12Ψ", "2Ψ + 2Ψ + 12Ψ/N", "2Ψ + 14Ψ/N", "16Ψ/N"};
  static const char* rem_f[] = {"2Ψ + 2Ψ + 10Ψ", "2Ψ + 2Ψ + 10Ψ/N", "2Ψ + 12Ψ/N", "14Ψ/N"};
  static const char* fp32_f[] = {"4Ψ + 4Ψ + 8Ψ", "4Ψ + 4Ψ + 8Ψ/N", "4Ψ + 12Ψ/N", "16Ψ/N"};
  return (!mixed ? fp32_f : remainders ? rem_f : mixed_f)[stage];
}

// ZeroConfig::param_remainders applies to bf16 compute only.
bool uses_remainders(const PlanInput& in) { return in.compute == DType::BF16 && in.zero.param_remainders; }

}  // namespace

Recompute recompute_mode(const std::string& checkpointing) {
  if (checkpointing == "none") return Recompute::None;
  if (checkpointing == "selective") return Recompute::Selective;
  if (checkpointing == "full") return Recompute::Full;
  IEVO_FAIL("model.checkpointing: unknown value '", checkpointing, "' (expected none, selective or full)");
}

const char* recompute_name(Recompute r) {
  return r == Recompute::Full ? "full" : r == Recompute::Selective ? "selective" : "none";
}

double bytes_per_element(const std::string& name, const char* what) {
  if (name == "fp32" || name == "f32") return 4;
  if (name == "bf16" || name == "fp16" || name == "f16") return 2;
  if (name == "int8" || name == "fp8") return 1;
  if (name == "int4") return 0.5;
  IEVO_FAIL(what, ": unknown precision '", name, "' (expected fp32, bf16, fp16, fp8, int8 or int4)");
}

ZeroMemory zero_formula(int64_t psi, int dp, int stage, DType compute, bool param_remainders) {
  IEVO_CHECK(stage >= 0 && stage <= 3, "parallel.zero: unknown ZeRO stage ", stage,
             " (expected 0, 1, 2 or 3)");
  const bool mixed = !(compute == DType::F32 || compute == DType::F64);
  const int64_t w = static_cast<int64_t>(dtype_size(compute));  // weights and gradients
  // Optimiser state per parameter: f32 master + m + v (12), the master as bf16 remainders (10).
  const int64_t k = !mixed ? 2 * w : compute == DType::BF16 && param_remainders ? 10 : 12;
  const double n = dp;
  ZeroMemory m;
  m.params = static_cast<int64_t>(stage == 3 ? w * psi / n : w * psi);
  m.grads = static_cast<int64_t>(stage >= 2 ? w * psi / n : w * psi);
  m.optimizer = static_cast<int64_t>(stage >= 1 ? k * psi / n : k * psi);
  return m;
}

Plan make_plan(const PlanInput& in) {
  IEVO_CHECK(in.dp >= 1, "plan: data-parallel size must be >= 1, got ", in.dp);
  IEVO_CHECK(in.sp >= 1 && in.dp % in.sp == 0, "plan: parallel.sequence_size ", in.sp,
             " must divide the data-parallel size ", in.dp);
  ModelShard shard;  // tensor rank 0 (every rank's slices have the same sizes)
  Plan p;
  int64_t block_sets = in.model.num_layers;
  if (in.pp > 1) {  // pipeline stage 0: its chunks, as many block activations as it holds in flight
    const int P = in.pp, V = in.virtual_stages, m = static_cast<int>(in.micro_batches);
    p.pipeline_split = pipeline_layer_split(in.model, P, V, in.seq_len, in.pipeline_layers);
    shard = pipeline_shard(p.pipeline_split, P, V, 0);
    p.pipeline_stage0 = shard;
    const PipelineSchedule sched = make_pipeline_schedule(pipeline_kind_from_name(in.schedule), P, m, V);
    const ScheduleReport r = check_pipeline_schedule(sched);
    p.in_flight = r.max_in_flight[0];
    p.bubble = pipeline_bubble(P, m, V);
    p.bubble_simulated = r.bubble;
    int64_t widest = 0;
    for (const LayerRange& c : shard.chunks) widest = std::max(widest, c.end - c.begin);
    block_sets = p.in_flight * widest;
  }
  shard.tp = in.tp;
  Llama model(in.model, in.recompute, shard);
  const auto specs = param_specs(in.model, shard);
  const auto layers = model.hook_layers();
  ZeroConfig zc = in.zero;  // partial replicated gradients get buckets of their own (parallel/zero.h)
  if (in.tp > 1) zc.deferred = partial_replicas(specs, in.sequence);
  const ZeroLayout L = make_zero_layout(specs, layers, zc, in.dp, in.compute);
  p.psi = L.numel;
  p.psi_global = in.model.num_params();
  for (const ParamSpec& s : specs) (s.split_dim < 0 ? p.replicated : p.sharded) += shape_numel(s.shape);
  p.exact = zero_memory(L, in.zero.stage, in.compute, in.zero.param_remainders);
  p.formula = zero_formula(p.psi, in.dp, in.zero.stage, in.compute, in.zero.param_remainders);
  p.padding_elements = L.full_numel - L.numel;
  transients(L, layers, in.zero.stage, in.compute, &p.transient_params, &p.transient_grads);
  p.activations = activation_bytes(in, block_sets, shard.last);
  p.overhead = kOverhead;
  p.total = p.exact.total() + p.transient_params + p.transient_grads + p.activations + p.overhead;
  p.fits = static_cast<double>(p.total) <= in.gpu_mem_gib * kGiB;
  const ModelConfig& m = in.model;
  p.infer_weights = static_cast<double>(p.psi_global) * in.infer_weight_bytes;
  p.kv_per_token = 2.0 * static_cast<double>(m.num_layers * m.num_kv_heads * m.hd()) * in.infer_kv_bytes;
  const double room = in.gpu_mem_gib * kGiB - p.infer_weights - static_cast<double>(kOverhead);
  p.kv_tokens_that_fit = room > 0 ? static_cast<int64_t>(room / p.kv_per_token) : 0;
  return p;
}

std::string format_plan(const PlanInput& in, const Plan& p) {
  const ModelConfig& m = in.model;
  const bool mixed = !(in.compute == DType::F32 || in.compute == DType::F64);
  const int s = in.zero.stage;
  const char* wname = dtype_name(in.compute);
  const double states = static_cast<double>(p.exact.total());
  g_unit = states >= kGiB ? kGiB : states >= 1048576 ? 1048576 : 1024;
  g_unit_name = states >= kGiB ? "GiB" : states >= 1048576 ? "MiB" : "KiB";
  std::ostringstream o;
  char head[256];
  std::snprintf(head, sizeof head, "%s model: %.3fM parameters (Ψ = %lld), L %lld, d %lld, heads %lld/%lld kv, F %lld, V %lld\n",
                arch_name(m.arch), static_cast<double>(p.psi_global) / 1e6, static_cast<long long>(p.psi_global),
                static_cast<long long>(m.num_layers), static_cast<long long>(m.hidden_size),
                static_cast<long long>(m.num_heads), static_cast<long long>(m.num_kv_heads),
                static_cast<long long>(m.ffn_hidden_size), static_cast<long long>(m.vocab_size));
  o << head;
  const bool rem = uses_remainders(in);
  o << "training: "
    << (!mixed ? std::string("fp32")
               : "mixed precision (" + std::string(wname) + " weights/gradients, " +
                     (rem ? "fp32 master as the weights + 16-bit remainders" : "fp32 master") + " + Adam)")
    << ", ZeRO-" << s << " over dp = N = " << in.dp << ", bucket " << in.zero.bucket_mb << " MiB\n";
  if (in.tp > 1 || in.sp > 1) {
    char tpl[512];
    std::snprintf(tpl, sizeof tpl,
                  "tensor parallel T = %d, sequence parallel %s%s: per rank Ψ = %lld = %lld in slices of split "
                  "tensors + %lld in replicated ones (sum of global x replicas / T)\n",
                  in.tp, sequence_parallel_name(in.sequence),
                  in.sp > 1 ? (" (S = " + std::to_string(in.sp) + ", part of dp)").c_str() : "",
                  static_cast<long long>(p.psi), static_cast<long long>(p.sharded),
                  static_cast<long long>(p.replicated));
    o << tpl;
  }
  if (in.pp > 1) {
    std::string split, chunks;
    for (int64_t k : p.pipeline_split) split += (split.empty() ? "" : ", ") + std::to_string(k);
    for (const LayerRange& c : p.pipeline_stage0.chunks)
      chunks += detail::cat(chunks.empty() ? "" : ", ", "[", c.begin, ", ", c.end, ")");
    char ppl[768];
    std::snprintf(ppl, sizeof ppl,
                  "pipeline P = %d stages x V = %d chunks, %s schedule, m = %lld micro-batches per step: "
                  "bubble (P-1)/(m*V+P-1) = %.1f%% (simulated %.1f%%); blocks per virtual stage [%s]; "
                  "the plan is for stage 0: embedding + blocks %s, at most %d micro-batch chunks in flight\n",
                  in.pp, in.virtual_stages, in.schedule.c_str(), static_cast<long long>(in.micro_batches),
                  100 * p.bubble, 100 * p.bubble_simulated, split.c_str(), chunks.c_str(), p.in_flight);
    o << ppl;
  }
  o << "per rank                           exact (layout)    formula\n";
  auto row = [&](const char* name, int64_t exact, int64_t formula, const std::string& what) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "  %-30s %s  %s  %s\n", name, gib(exact).c_str(), gib(formula).c_str(),
                  what.c_str());
    o << buf;
  };
  const std::string full = "full", shard = "shard (1/N)";
  row("parameters", p.exact.params, p.formula.params,
      std::string(wname) + ", " + (s == 3 ? shard : full) + (mixed ? "" : ", also the master"));
  row("gradients", p.exact.grads, p.formula.grads, std::string(wname) + ", " + (s >= 2 ? shard : full));
  row("optimizer state", p.exact.optimizer, p.formula.optimizer,
      std::string(!mixed ? "fp32 m + v" : rem ? "i16 master remainders + fp32 m + v" : "fp32 master + m + v") +
          ", " + (s >= 1 ? shard : full));
  row("model states", p.exact.total(), p.formula.total(), stage_formula(s, mixed, rem));
  char buf[512];
  std::snprintf(buf, sizeof buf, "  (padding: %lld elements = %.3f%% of Ψ)\n",
                static_cast<long long>(p.padding_elements),
                100.0 * static_cast<double>(p.padding_elements) / static_cast<double>(std::max<int64_t>(1, p.psi)));
  o << buf;
  if (s == 3) o << "  gathered weights (one layer)   " << gib(static_cast<double>(p.transient_params)) << "\n";
  if (s >= 2) o << "  gradient buckets in flight     " << gib(static_cast<double>(p.transient_grads)) << "\n";
  std::snprintf(buf, sizeof buf, "  activations (estimate)         %s  micro-batch %lld x %lld tokens, checkpointing %s\n",
                gib(static_cast<double>(p.activations)).c_str(), static_cast<long long>(in.micro_batch_size),
                static_cast<long long>(in.seq_len), recompute_name(in.recompute));
  o << buf;
  o << "  CUDA context, workspaces       " << gib(static_cast<double>(p.overhead)) << "  allowance\n";
  std::snprintf(buf, sizeof buf, "  total                          %s  of %.1f GiB: %s\n",
                gib(static_cast<double>(p.total)).c_str(), in.gpu_mem_gib,
                p.fits ? "fits" : "does NOT fit");
  o << buf;
  o << "inference (" << in.infer_weight_bytes << " B per weight, " << in.infer_kv_bytes
    << " B per KV-cache element):\n";
  o << "  weights                        " << gib(p.infer_weights) << "\n";
  const int64_t ctx = m.max_position_embeddings;
  std::snprintf(buf, sizeof buf, "  KV cache per token             %s  2 x L %lld x kv_heads %lld x head_dim %lld x %g B\n",
                pad(human(p.kv_per_token)).c_str(), static_cast<long long>(m.num_layers),
                static_cast<long long>(m.num_kv_heads), static_cast<long long>(m.hd()), in.infer_kv_bytes);
  o << buf;
  std::snprintf(buf, sizeof buf, "  KV cache per sequence          %s  %lld tokens (model.max_position_embeddings)\n",
                pad(human(p.kv_per_token * static_cast<double>(ctx))).c_str(), static_cast<long long>(ctx));
  o << buf;
  std::snprintf(buf, sizeof buf, "  KV tokens beside the weights   %13lld  = %lld sequences of %lld in %.1f GiB\n",
                static_cast<long long>(p.kv_tokens_that_fit),
                static_cast<long long>(p.kv_tokens_that_fit / std::max<int64_t>(1, ctx)),
                static_cast<long long>(ctx), in.gpu_mem_gib);
  o << buf;
  return o.str();
}

}  // namespace ievo
