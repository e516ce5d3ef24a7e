// Pipeline parallelism (run under mpirun -np 2 and -np 4).
//
// Executor: P stages (groups of P neighbouring ranks) run m micro-batches of a random 8-layer
// model through PipelineExecutor with every schedule (GPipe, 1F1B, interleaved with V = 2), tied
// and untied; each stage's gradients (the tied embedding after its pre_reduce over the first and
// last stage) and the loss equal one process's forward_backward over the same micro-batches
// within 1e-5 relative.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "models/batch.h"
#include "models/llama.h"
#include "parallel/communicator.h"
#include "parallel/pipeline.h"
#include "parallel/topology.h"
#include "util.h"

using namespace ievo;

namespace {

ModelConfig small_model(bool tied) {
  ModelConfig c;
  c.vocab_size = 50;
  c.hidden_size = 32;
  c.num_layers = 8;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.ffn_hidden_size = 64;
  c.tie_embeddings = tied;
  c.init_std = 0.1;
  c.max_position_embeddings = 64;
  return c;
}

std::vector<Batch> micro_batches(const ModelConfig& c, int m, int64_t B, int64_t T) {
  std::vector<Batch> out;
  for (int j = 0; j < m; ++j) {
    std::vector<int32_t> rows(B * (T + 1));
    for (size_t i = 0; i < rows.size(); ++i)
      rows[i] = static_cast<int32_t>((i * 7919 + j * 104729 + i * i * 31) % c.vocab_size);
    out.push_back(make_batch(rows, B, T));
  }
  return out;
}

// A communicator over groups of `size` neighbouring world ranks (MPI_Comm freed with it).
struct Group {
  explicit Group(int size) {
    MPI_Comm_split(MPI_COMM_WORLD, world_rank() / size, world_rank(), &mpi);
    comm = make_mpi_communicator(mpi);
  }
  ~Group() {
    comm.reset();
    MPI_Comm_free(&mpi);
  }
  MPI_Comm mpi;
  std::unique_ptr<Communicator> comm;
};

struct Case {
  PipelineKind kind;
  int P, V, m;
  bool tied;
  Recompute recompute = Recompute::None;
};

std::string name(const Case& k) {
  return std::string(pipeline_kind_name(k.kind)) + " P " + std::to_string(k.P) + " V " + std::to_string(k.V) +
         " m " + std::to_string(k.m) + (k.tied ? " tied" : " untied") +
         (k.recompute == Recompute::Full ? " recompute full" : k.recompute == Recompute::Selective ? " selective" : "");
}

void run_case(const Case& k) {
  SCOPED_TRACE(name(k));
  const ModelConfig c = small_model(k.tied);
  const std::vector<Batch> micros = micro_batches(c, k.m, 2, 16);
  int64_t targets = 0;
  for (const Batch& b : micros) targets += b.num_targets();
  const double scale = 1.0 / static_cast<double>(targets);

  // One process: the whole model.
  ParamStore full(param_specs(c), DType::F32, Device::CPU), full_g(param_specs(c), DType::F32, Device::CPU);
  init_params(c, full, 7);
  full_g.zero();
  Llama whole(c);
  LossSum ref;
  for (const Batch& b : micros) {
    LossSum l = whole.forward_backward(full, b, scale, full_g);
    ref.sum += l.sum;
    ref.count += l.count;
  }

  // The pipeline: world = P stages x dp (Megatron order, parallel/topology.h); this rank is stage
  // pp_rank of its pipeline group.
  Topology topo(MPI_COMM_WORLD, 1, k.P);
  auto pp = make_mpi_communicator(topo.pp_comm());
  const int stage = pp->rank();
  EXPECT_EQ(stage, topo.pp_rank());
  const std::vector<int64_t> split = pipeline_layer_split(c, k.P, k.V, 16);
  const ModelShard shard = pipeline_shard(split, k.P, k.V, stage);
  Llama model(c, k.recompute, shard);
  ParamStore w(model.specs(), DType::F32, Device::CPU), g(model.specs(), DType::F32, Device::CPU);
  for (size_t i = 0; i < w.size(); ++i) w[i].copy_from(full.get(w.spec(i).name));
  g.zero();
  PipelineExecutor exec(make_pipeline_schedule(k.kind, k.P, k.m, k.V), *pp);
  const LossSum got = exec.run(model, w, g, micros, scale);
  EXPECT_NEAR(got.sum, ref.sum, 1e-6 * std::fabs(ref.sum));
  EXPECT_EQ(got.count, ref.count);

  // Tied: the first and last stage sum their embedding gradients (ZeroConfig::pre_reduce).
  EmbeddingGroup embed(topo, Device::CPU);
  ZeroConfig zc;
  tie_pipeline_embeddings(zc, model.specs(), c, shard, embed.comm.get());
  const bool ends_stage = stage == 0 || stage == k.P - 1;
  EXPECT_EQ(static_cast<bool>(zc.pre_reduce), k.tied && ends_stage);
  if (zc.pre_reduce) {
    zc.pre_reduce(g);
    const size_t e = g.index_of("model.embed_tokens.weight");
    EXPECT_TRUE(zc.deferred[e]);
    EXPECT_EQ(zc.norm_weight[e], stage == 0 ? 1.0 : 0.0);
  }
  double worst = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double err = test::rel_l2(g[i], full_g.get(g.spec(i).name));
    EXPECT_LT(err, 1e-5) << "stage " << stage << " " << g.spec(i).name;
    worst = std::max(worst, err);
  }
  double all_worst = worst;
  MPI_Allreduce(&worst, &all_worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (world_rank() == 0)
    std::printf("  %-44s loss %.6f vs %.6f, max rel L2 of gradients %.1e\n", name(k).c_str(),
                got.sum / got.count, ref.sum / ref.count, all_worst);
}

}  // namespace

TEST(PipelineExecutor, GradientsEqualOneProcess) {
  const int world = world_size();
  std::vector<Case> cases;
  for (int P : {2, 4}) {
    if (P > world) continue;
    for (bool tied : {false, true}) {
      for (int m : {3, 4}) {
        cases.push_back({PipelineKind::GPipe, P, 1, m, tied});
        cases.push_back({PipelineKind::OneFOneB, P, 1, m, tied});
      }
      cases.push_back({PipelineKind::Interleaved, P, 2, P, tied});
      cases.push_back({PipelineKind::Interleaved, P, 2, 2 * P, tied});
    }
  }
  cases.push_back({PipelineKind::OneFOneB, 2, 1, 4, true, Recompute::Full});
  cases.push_back({PipelineKind::Interleaved, 2, 2, 4, false, Recompute::Selective});
  for (const Case& k : cases) run_case(k);
}

TEST(PipelineExecutor, RefusesAMismatchedSchedule) {
  Group pp(2);
  try {
    PipelineExecutor exec(make_pipeline_schedule(PipelineKind::OneFOneB, 4, 4, 1), *pp.comm);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("schedule for 4 stages on a pipeline group of 2 ranks"), std::string::npos)
        << e.what();
  }
}

#include "mpi_main.h"
