// Pipeline schedules as data (parallel/pipeline_schedule.h): GPipe, 1F1B and interleaved 1F1B
// for P in {1, 2, 4}, m in 1..8, V in {1, 2}: every stage runs each (micro-batch, chunk) forward
// then backward once, in-flight limits, messages paired in order, no deadlock under rendezvous
// semantics, and the simulated bubble equals (P-1)/(mV+P-1). The checker itself is shown to fail
// on broken schedules. Also the layer split into stages, the errors for bad layouts, and
// `ievo plan` for a pipeline (stage 0's memory, the bubble).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "parallel/pipeline_schedule.h"
#include "parallel/plan.h"
#include "runtime/error.h"

using namespace ievo;

namespace {

std::string compute_ops(const PipelineSchedule& s, int stage) {  // compute ops only
  std::string out;
  for (const PipeOp& op : s.programs[stage])
    if (op.type != PipeOp::Type::Exchange) out += (out.empty() ? "" : " ") + op.str(s.chunks > 1);
  return out;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

PipeOp compute(bool backward, int micro) {
  return {backward ? PipeOp::Type::Backward : PipeOp::Type::Forward, micro, 0, {}};
}
PipeOp exchange(std::vector<PipeTransfer> t) { return {PipeOp::Type::Exchange, -1, -1, std::move(t)}; }
PipeTransfer send_act(int micro, int to) { return {true, to, {false, micro, to - 1}}; }
PipeTransfer recv_act(int micro, int from) { return {false, from, {false, micro, from}}; }
PipeTransfer send_grad(int micro, int to) { return {true, to, {true, micro, to + 1}}; }
PipeTransfer recv_grad(int micro, int from) { return {false, from, {true, micro, from}}; }

}  // namespace

TEST(PipelineSchedule, EveryLayoutChecksAndMatchesTheBubbleFormula) {
  int checked = 0;
  for (PipelineKind kind : {PipelineKind::GPipe, PipelineKind::OneFOneB, PipelineKind::Interleaved})
    for (int P : {1, 2, 4})
      for (int V : {1, 2})
        for (int m = 1; m <= 8; ++m) {
          SCOPED_TRACE(std::string(pipeline_kind_name(kind)) + " P " + std::to_string(P) + " m " +
                       std::to_string(m) + " V " + std::to_string(V));
          const bool valid = (V == 1 || (kind == PipelineKind::Interleaved && P > 1)) &&
                             (kind != PipelineKind::Interleaved || m % P == 0);
          if (!valid) {
            EXPECT_THROW(make_pipeline_schedule(kind, P, m, V), Error);
            continue;
          }
          const PipelineSchedule s = make_pipeline_schedule(kind, P, m, V);
          ScheduleReport r;
          ASSERT_NO_THROW(r = check_pipeline_schedule(s));
          ++checked;
          // Forward 1, backward 2 per chunk: the idle fraction is exactly the formula.
          EXPECT_NEAR(r.bubble, pipeline_bubble(P, m, V), 1e-12);
          EXPECT_DOUBLE_EQ(r.makespan, 3.0 * (m * V + P - 1));
          for (int p = 0; p < P; ++p) {
            int f = 0, b = 0;
            for (const PipeOp& op : s.programs[p]) {
              f += op.type == PipeOp::Type::Forward;
              b += op.type == PipeOp::Type::Backward;
            }
            EXPECT_EQ(f, m * V) << "stage " << p;
            EXPECT_EQ(b, m * V) << "stage " << p;
            const int in_flight = kind == PipelineKind::GPipe      ? m
                                  : kind == PipelineKind::OneFOneB ? std::min(P - p, m)
                                                                   : std::min(m * V, 2 * (P - 1 - p) + (V - 1) * P + 1);
            EXPECT_EQ(r.max_in_flight[p], in_flight) << "stage " << p;
            EXPECT_LE(r.max_in_flight[p], kind == PipelineKind::OneFOneB ? P : m * V);
            if (P == 1) {
              EXPECT_EQ(r.exchanges[p], 0);
            }
          }
        }
  EXPECT_EQ(checked, 3 * 8 + 3 * 8 + (8 + 4 + 2) + (4 + 2));  // interleaved: m % P == 0; V 2: P > 1
}

TEST(PipelineSchedule, ForwardOnlySchedulesCheck) {
  for (int P : {1, 2, 4})
    for (int V : {1, 2})
      for (int m = 1; m <= 8; ++m) {
        if (V > 1 && P == 1) continue;
        SCOPED_TRACE("P " + std::to_string(P) + " m " + std::to_string(m) + " V " + std::to_string(V));
        const PipelineSchedule s = make_forward_schedule(P, m, V);
        ScheduleReport r;
        ASSERT_NO_THROW(r = check_pipeline_schedule(s));
        for (int p = 0; p < P; ++p) {
          int f = 0, b = 0;
          for (const PipeOp& op : s.programs[p]) {
            f += op.type == PipeOp::Type::Forward;
            b += op.type == PipeOp::Type::Backward;
          }
          EXPECT_EQ(f, m * V);
          EXPECT_EQ(b, 0);
        }
        // One forward per time unit, pipelined (a last group of fewer than P waits for its inputs).
        if (m % P == 0 || V == 1) {
          EXPECT_DOUBLE_EQ(r.makespan, m * V + P - 1);
        } else {
          EXPECT_GT(r.makespan, m * V + P - 1);
        }
      }
  EXPECT_EQ(compute_ops(make_forward_schedule(2, 3, 2), 1), "F0.0 F1.0 F0.1 F1.1 F2.0 F2.1");
}

TEST(PipelineSchedule, KnownOrders) {
  // Megatron's non-interleaved 1F1B, P 4, m 6: warmup 3 - p forwards.
  const PipelineSchedule a = make_pipeline_schedule(PipelineKind::OneFOneB, 4, 6, 1);
  EXPECT_EQ(compute_ops(a, 0), "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5");
  EXPECT_EQ(compute_ops(a, 2), "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5");
  EXPECT_EQ(compute_ops(a, 3), "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5");
  const PipelineSchedule g = make_pipeline_schedule(PipelineKind::GPipe, 2, 3, 1);
  EXPECT_EQ(compute_ops(g, 1), "F0 F1 F2 B0 B1 B2");
  // Interleaved P 2, m 4, V 2: groups of 2 micro-batches per chunk, warmup 2(P-1-p) + (V-1)P.
  const PipelineSchedule i = make_pipeline_schedule(PipelineKind::Interleaved, 2, 4, 2);
  EXPECT_EQ(compute_ops(i, 0), "F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0");
  EXPECT_EQ(compute_ops(i, 1), "F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0");
  // Exchanges: stage 1's steady 1F1B pairs a send with the receive of the next op's input.
  const PipelineSchedule b = make_pipeline_schedule(PipelineKind::OneFOneB, 2, 2, 1);
  std::string prog1;
  for (const PipeOp& op : b.programs[1]) prog1 += op.str(false) + "; ";
  EXPECT_EQ(prog1,
            "X[recv act(mb 0, vs 0) < 0]; F0; B0; X[send grad(mb 0, vs 1) > 0, recv act(mb 1, vs 0) < 0]; "
            "F1; B1; X[send grad(mb 1, vs 1) > 0]; ");
  const std::string text = format_pipeline_schedule(i);
  EXPECT_NE(text.find("bubble (P-1)/(m*V+P-1) = 11.1%"), std::string::npos) << text;
  EXPECT_NE(text.find("stage 1 (at most 3 in flight): F0.0 F1.0 F0.1 B0.1"), std::string::npos) << text;
}

// The checker fails on broken schedules (so the checks above can fail).
TEST(PipelineSchedule, CheckerCatchesBrokenSchedules) {
  PipelineSchedule s;
  s.kind = PipelineKind::GPipe;
  s.stages = 2;
  s.micro_batches = 2;
  // Each send in its own exchange before the receives: runs with buffered sends, but with
  // rendezvous (NCCL) stage 0 waits in "send act 1" for stage 1, which waits in "send grad 0".
  s.programs = {{compute(false, 0), exchange({send_act(0, 1)}), compute(false, 1), exchange({send_act(1, 1)}),
                 exchange({recv_grad(0, 1)}), compute(true, 0), exchange({recv_grad(1, 1)}), compute(true, 1)},
                {exchange({recv_act(0, 0)}), compute(false, 0), compute(true, 0), exchange({send_grad(0, 0)}),
                 exchange({recv_act(1, 0)}), compute(false, 1), compute(true, 1), exchange({send_grad(1, 0)})}};
  std::string e = error_of([&] { check_pipeline_schedule(s); });
  EXPECT_NE(e.find("deadlocks"), std::string::npos) << e;
  EXPECT_NE(e.find("stage 0 op 3 (X[send act(mb 1, vs 0) > 1]) waits"), std::string::npos) << e;
  // The same with stage 1's send and receive in one exchange runs.
  s.programs[1] = {exchange({recv_act(0, 0)}), compute(false, 0), compute(true, 0),
                   exchange({send_grad(0, 0), recv_act(1, 0)}), compute(false, 1), compute(true, 1),
                   exchange({send_grad(1, 0)})};
  EXPECT_NO_THROW(check_pipeline_schedule(s));

  // Messages received in another order than sent: MPI and NCCL would hand over the wrong tensor.
  PipelineSchedule t = make_pipeline_schedule(PipelineKind::GPipe, 2, 2, 1);
  t.programs[1][0].transfers[0].msg.micro = 1;  // stage 1 first receives micro-batch 1
  t.programs[1][2].transfers[0].msg.micro = 0;
  e = error_of([&] { check_pipeline_schedule(t); });
  EXPECT_NE(e.find("point-to-point messages match in order"), std::string::npos) << e;

  // A backward before its forward; a forward that runs before its input arrived; a lost message.
  PipelineSchedule u = make_pipeline_schedule(PipelineKind::OneFOneB, 1, 2, 1);
  std::swap(u.programs[0][0], u.programs[0][1]);  // B0 F0 ...
  e = error_of([&] { check_pipeline_schedule(u); });
  EXPECT_NE(e.find("backward before its forward"), std::string::npos) << e;
  PipelineSchedule v = make_pipeline_schedule(PipelineKind::OneFOneB, 2, 1, 1);
  std::swap(v.programs[1][0], v.programs[1][1]);  // stage 1: F0 before receiving its input
  e = error_of([&] { check_pipeline_schedule(v); });
  EXPECT_NE(e.find("runs before its input act(mb 0, vs 0) arrived"), std::string::npos) << e;
  PipelineSchedule w = make_pipeline_schedule(PipelineKind::OneFOneB, 2, 1, 1);
  w.programs[1].erase(w.programs[1].begin());
  e = error_of([&] { check_pipeline_schedule(w); });
  EXPECT_NE(e.find("which never receives it"), std::string::npos) << e;
  // More in flight than 1F1B allows: stage 0 of a 2-stage 1F1B running GPipe's order.
  PipelineSchedule x = make_pipeline_schedule(PipelineKind::GPipe, 2, 3, 1);
  x.kind = PipelineKind::OneFOneB;
  e = error_of([&] { check_pipeline_schedule(x); });
  EXPECT_NE(e.find("1f1b stage 0 holds 3 micro-batches in flight; at most 2 allowed"), std::string::npos) << e;
}

TEST(PipelineSchedule, BadLayoutsFailClearly) {
  std::string e = error_of([] { make_pipeline_schedule(PipelineKind::OneFOneB, 2, 4, 2); });
  EXPECT_NE(e.find("parallel.virtual_stages = 2 needs parallel.schedule: interleaved"), std::string::npos) << e;
  e = error_of([] { make_pipeline_schedule(PipelineKind::Interleaved, 1, 4, 2); });
  EXPECT_NE(e.find("needs parallel.pipeline > 1"), std::string::npos) << e;
  e = error_of([] { make_pipeline_schedule(PipelineKind::Interleaved, 4, 2, 2); });
  EXPECT_NE(e.find("multiple of parallel.pipeline = 4"), std::string::npos) << e;
  EXPECT_NE(e.find("got 2"), std::string::npos) << e;
  e = error_of([] { make_pipeline_schedule(PipelineKind::Interleaved, 4, 6, 2); });
  EXPECT_NE(e.find("multiple of parallel.pipeline = 4"), std::string::npos) << e;
  e = error_of([] { pipeline_kind_from_name("zb"); });
  EXPECT_NE(e.find("parallel.schedule: unknown pipeline schedule 'zb'"), std::string::npos) << e;
}

TEST(PipelineSplit, BalancedExplicitAndErrors) {
  ModelConfig c;
  c.vocab_size = 96;
  c.hidden_size = 64;
  c.num_layers = 8;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 160;
  // The head (d*V) costs less than a block: an even split; an odd count leaves the last stage less.
  EXPECT_EQ(pipeline_layer_split(c, 4, 1, 32), (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(pipeline_layer_split(c, 2, 2, 32), (std::vector<int64_t>{2, 2, 2, 2}));
  c.num_layers = 5;
  EXPECT_EQ(pipeline_layer_split(c, 2, 1, 32), (std::vector<int64_t>{3, 2}));
  // A larger vocabulary: the head (d*V = 131072) is worth 2.9 blocks (45056 each, seq_len 32), so
  // [5, 3] (5.9 blocks at most) beats [4, 4] (6.9) and [6, 2] (6).
  c.num_layers = 8;
  c.vocab_size = 2048;
  const std::vector<int64_t> big = pipeline_layer_split(c, 2, 1, 32);
  EXPECT_EQ(big, (std::vector<int64_t>{5, 3}));
  c.vocab_size = 96;
  EXPECT_EQ(pipeline_layer_split(c, 2, 1, 32, {1, 7}), (std::vector<int64_t>{1, 7}));

  std::string e = error_of([&] { pipeline_layer_split(c, 2, 1, 32, {4, 4, 0}); });
  EXPECT_NE(e.find("parallel.pipeline_layers has 3 entries; expected parallel.pipeline x "
                   "parallel.virtual_stages = 2 x 1 = 2"), std::string::npos) << e;
  e = error_of([&] { pipeline_layer_split(c, 2, 1, 32, {8, 0}); });
  EXPECT_NE(e.find("parallel.pipeline_layers[1] = 0"), std::string::npos) << e;
  e = error_of([&] { pipeline_layer_split(c, 2, 1, 32, {4, 3}); });
  EXPECT_NE(e.find("parallel.pipeline_layers sums to 7 blocks but model.num_layers is 8"), std::string::npos) << e;
  e = error_of([&] { pipeline_layer_split(c, 4, 3, 32); });
  EXPECT_NE(e.find("= 12 virtual stages, but the model has 8 layers (model.num_layers)"), std::string::npos) << e;

  // Stage 1 of P 2, V 2 over [1, 2, 3, 2]: virtual stages 1 and 3.
  const ModelShard s1 = pipeline_shard({1, 2, 3, 2}, 2, 2, 1);
  ASSERT_EQ(s1.chunks.size(), 2u);
  EXPECT_EQ(s1.chunks[0].begin, 1);
  EXPECT_EQ(s1.chunks[0].end, 3);
  EXPECT_EQ(s1.chunks[1].begin, 6);
  EXPECT_EQ(s1.chunks[1].end, 8);
  EXPECT_FALSE(s1.first);
  EXPECT_TRUE(s1.last);
  const ModelShard s0 = pipeline_shard({1, 2, 3, 2}, 2, 2, 0);
  EXPECT_EQ(s0.chunks[1].begin, 3);
  EXPECT_EQ(s0.chunks[1].end, 6);
  EXPECT_TRUE(s0.first);
  EXPECT_FALSE(s0.last);
  const ModelShard whole = pipeline_shard({8}, 1, 1, 0);
  EXPECT_TRUE(whole.whole(c));
}

// `ievo plan` with parallel.pipeline: stage 0's parameters, its in-flight activations and the
// bubble.
TEST(PipelinePlan, StageZeroAndBubble) {
  ModelConfig c;
  c.vocab_size = 96;  // the head costs 0.14 blocks: an even split
  c.hidden_size = 64;
  c.num_layers = 8;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 160;
  PlanInput in;
  in.model = c;
  in.micro_batch_size = 2;
  in.seq_len = 32;
  const Plan whole = make_plan(in);
  in.pp = 4;
  in.micro_batches = 8;
  const Plan p = make_plan(in);
  EXPECT_EQ(p.pipeline_split, (std::vector<int64_t>{2, 2, 2, 2}));
  int64_t stage0 = 0;
  for (const ParamSpec& s : param_specs(c, pipeline_shard(p.pipeline_split, 4, 1, 0))) stage0 += shape_numel(s.shape);
  EXPECT_EQ(p.psi, stage0);  // embedding + 2 blocks
  EXPECT_EQ(p.psi_global, whole.psi);
  EXPECT_EQ(p.in_flight, 4);  // 1F1B: min(P, m) on stage 0
  EXPECT_NEAR(p.bubble, 3.0 / 11.0, 1e-12);
  EXPECT_NEAR(p.bubble_simulated, 3.0 / 11.0, 1e-12);
  // 4 in flight x 2 blocks = the 8 blocks' activations of one process, without the LM head's.
  EXPECT_LT(p.activations, whole.activations);
  // GPipe keeps all 8 micro-batches: twice the blocks' activations.
  in.schedule = "gpipe";
  const Plan g = make_plan(in);
  EXPECT_EQ(g.in_flight, 8);
  EXPECT_GT(g.activations, p.activations);
  in.schedule = "interleaved";
  in.virtual_stages = 2;
  const Plan i = make_plan(in);
  EXPECT_EQ(i.in_flight, std::min(16, 2 * 3 + 4 + 1));
  EXPECT_NEAR(i.bubble, 3.0 / 19.0, 1e-12);
  EXPECT_NE(format_plan(in, i).find("bubble (P-1)/(m*V+P-1) = 15.8% (simulated 15.8%)"), std::string::npos)
      << format_plan(in, i);
}
