// Pipeline-parallel schedules as data, and the layer split into stages.
//
// P stages (ranks of a pipeline group), m micro-batches per step, V model chunks per stage
// (virtual stages, Megatron's interleaved schedule). Virtual stage v = chunk * P + stage holds the
// v-th group of consecutive blocks; the embedding is in virtual stage 0, the final norm + LM head
// + loss in virtual stage V*P - 1 (the last stage's last chunk).
//
// A schedule is, per stage, a program of ops:
//   Forward(micro, chunk)   one micro-batch through one chunk (Llama::stage_forward);
//   Backward(micro, chunk)  its backward (Llama::stage_backward);
//   Exchange{transfers}     sends and receives to neighbouring stages, posted together and
//                           complete together (MPI Isend/Irecv + Waitall; NCCL grouped
//                           ncclSend/ncclRecv; Communicator::exchange).
// The compute order comes from the schedule kind (below); the exchanges are derived from it:
// an output is sent right after the op that made it, an input received right before the op
// that needs it, and the sends after one op and the receives before the next form one exchange
// (Megatron's send_forward_recv_backward / send_backward_recv_forward).
//
// Compute orders (stage p, 0-based):
//   gpipe        F0 .. F(m-1), then B0 .. B(m-1)                     (all forward, all backward)
//   1f1b         warmup min(P-1-p, m) forwards, then alternate one forward and one backward,
//                then the remaining backwards                         (Megatron, non-interleaved)
//   interleaved  Megatron's interleaved 1F1B: the k-th forward is (micro, chunk) = table[k],
//                the k-th backward (micro, V-1-chunk) = table[k], where the table walks groups of
//                P micro-batches through chunk 0, then chunk 1, ...; warmup
//                min(2(P-1-p) + (V-1)P, mV) forwards, then forward + backward pairs, then the
//                remaining backwards. Needs m to be a multiple of P (Megatron-LM with its default
//                microbatch_group_size_per_vp_stage = P). Its exchanges go after each pair, as
//                Megatron's send_forward_backward_recv_forward_backward: an exchange between the
//                forward and the backward of a pair deadlocks (the checker finds it).
// Bubble (idle fraction when every chunk's forward and backward cost the same on every stage):
//   (P-1) / (m*V + P-1); the checker's simulation (forward 1, backward 2 per chunk) reproduces
//   it exactly for every schedule here.
//
// check_pipeline_schedule() proves a schedule runs: every (micro, chunk) forwarded then
// backwarded exactly once per stage; every input received before use; the k-th message one stage
// sends to another is the k-th that the other receives from it (MPI without tags and NCCL match
// point-to-point messages in order); and a simulation of all stages completes when an exchange
// waits until every partner has posted its side (rendezvous: the strictest semantics either
// backend has, so no deadlock with either).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/model_config.h"
#include "models/shard.h"

namespace ievo {

enum class PipelineKind { GPipe, OneFOneB, Interleaved };
const char* pipeline_kind_name(PipelineKind k);                // gpipe | 1f1b | interleaved
PipelineKind pipeline_kind_from_name(const std::string& name);  // throws naming parallel.schedule

// A message between stages: the output activation of virtual stage `vstage` (to vstage + 1), or
// the gradient with respect to vstage's input (grad; to vstage - 1). [n, d], the compute dtype.
struct PipeMessage {
  bool grad = false;
  int micro = 0;
  int vstage = 0;  // the virtual stage that produced it
  bool operator==(const PipeMessage& o) const {
    return grad == o.grad && micro == o.micro && vstage == o.vstage;
  }
  std::string str() const;  // "act(mb 3, vs 1)" / "grad(mb 3, vs 2)"
};

struct PipeTransfer {
  bool send = false;  // else receive
  int peer = 0;       // stage (rank in the pipeline group)
  PipeMessage msg;
};

struct PipeOp {
  enum class Type { Forward, Backward, Exchange };
  Type type = Type::Forward;
  int micro = -1, chunk = -1;          // Forward / Backward
  std::vector<PipeTransfer> transfers;  // Exchange
  // "F3.1" (micro 3, chunk 1; the ".c" only when with_chunk), "B3", "X[send act(mb 0, vs 0) > 1, ...]"
  std::string str(bool with_chunk = true) const;
};

struct PipelineSchedule {
  PipelineKind kind = PipelineKind::OneFOneB;
  int stages = 1, micro_batches = 1, chunks = 1;  // P, m, V
  int group = 1;  // interleaved: micro-batches per chunk group (P; Megatron's microbatch_group_size_per_vp_stage)
  bool forward_only = false;  // evaluation: forwards only (make_forward_schedule)
  std::vector<std::vector<PipeOp>> programs;  // per stage
  int vstage(int stage, int chunk) const { return chunk * stages + stage; }
  int num_vstages() const { return stages * chunks; }
};

// Throws (naming parallel.pipeline, parallel.virtual_stages, parallel.schedule and the
// micro-batch count) for layouts that cannot run: V > 1 without the interleaved schedule or with
// P = 1, interleaved with m not a multiple of P (in particular m < P).
PipelineSchedule make_pipeline_schedule(PipelineKind kind, int P, int m, int V);

// Evaluation: every micro-batch forward only through every chunk, in the interleaved schedule's
// forward order (groups of P micro-batches through chunk 0, then chunk 1, ...; the last group
// takes what is left; V = 1: GPipe's first half). Any P, m >= 1, V.
PipelineSchedule make_forward_schedule(int P, int m, int V);

struct ScheduleReport {
  std::vector<int> max_in_flight;  // per stage: most (micro, chunk) forwarded and not yet backwarded
  std::vector<int> exchanges;      // per stage: Exchange ops
  double makespan = 0;             // simulated time: forward 1, backward 2 per chunk, messages free
  double bubble = 0;               // idle fraction of makespan, mean over stages
};
// Throws, naming the stage and op, when the schedule is wrong (see the top of the file) or, for
// 1f1b, a stage ever holds more than P - p micro-batches in flight (interleaved: its warmup + 1).
ScheduleReport check_pipeline_schedule(const PipelineSchedule& s);

// Text: a header with P, m, V, the bubble formula and the simulated one; one line of compute ops
// per stage; with `exchanges` also the sends/receives.
std::string format_pipeline_schedule(const PipelineSchedule& s, bool exchanges = false);

// (P-1) / (m*V + P-1).
double pipeline_bubble(int P, int m, int V);

// Blocks per virtual stage (P*V entries, in virtual-stage order). `explicit_layers` (the
// parallel.pipeline_layers key) if given, checked: P*V entries, each >= 1, summing to
// model.num_layers. Else balanced by cost: contiguous groups of >= 1 block minimising the most
// expensive virtual stage, with per-token training FLOPs 6*(block matmul weights) + 6*d*seq_len
// per block, the LM head 6*d*vocab on the last virtual stage (the embedding's lookup, 2*d, on
// the first). Throws when P*V > num_layers.
std::vector<int64_t> pipeline_layer_split(const ModelConfig& c, int P, int V, int64_t seq_len,
                                          const std::vector<int64_t>& explicit_layers = {});
// Stage `stage`'s chunks (virtual stages stage, stage + P, ...) as a ModelShard (tp fields left 1/0).
ModelShard pipeline_shard(const std::vector<int64_t>& split, int P, int V, int stage);

}  // namespace ievo
