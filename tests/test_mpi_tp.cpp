// Tensor and sequence parallelism (parallel/tensor_parallel.h), run under mpirun -np 2 and -np 4.
//
// Regions: every ModelParallel point of TensorParallel over the world as the tensor (or Ulysses
// sequence) group against the one-rank math in f64 (all-reduce / all-gather / reduce-scatter
// along tokens, the all-to-all head exchange, the vocabulary-parallel embedding and LM-head loss
// against ops::lm_head_loss on the whole vocabulary, the replicated-gradient sums).
// Training: the HF fixtures trained in-process (run_train on a communicator) with tensor
// parallelism (tp 2, 4; tp 4 replicates the fixture's 2 key/value heads), tp x dp with ZeRO 1 and
// 3, Megatron sequence parallelism and Ulysses (S = 2, S x dp), against the one-process run:
// per-step loss and gradient norm within 1e-5 relative, final weights (rank 0's checkpoint of the
// global tensors) within 1e-5 relative L2. Per-rank parameter bytes are 1/T of the sharded
// tensors plus the replicated ones; bad layouts fail with a clear error before any work.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>


#include "launch/checkpoint.h"
#include "launch/config.h"
#include "launch/trainer.h"
#include "models/batch.h"
#include "models/hf_config.h"
#include "models/shard.h"
#include "models/llama.h"
#include "parallel/communicator.h"
#include "parallel/plan.h"
#include "parallel/tensor_parallel.h"
#include "parallel/topology.h"
#include "parallel/zero.h"
#include "runtime/allocator.h"
#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/embedding.h"
#include "mpi_util.h"
#include "util.h"

namespace fs = std::filesystem;
using namespace ievo;

namespace {

ModelConfig gqa_config() { return read_hf_model_config(test::fixture_dir("llama_gqa") + "/hf"); }

// The same random tensor on every rank (f64).
Tensor same_everywhere(const Shape& s, uint64_t seed, double lo = -1, double hi = 1) {
  return test::random_tensor(s, DType::F64, seed, lo, hi);
}

// Rows [r*n, (r+1)*n) of x, contiguous.
Tensor rows(const Tensor& x, int64_t r, int64_t n) { return x.slice(0, r * n, (r + 1) * n).clone(); }

ModelShard tp_shard(int tp, int rank) {
  ModelShard s;
  s.tp = tp;
  s.tp_rank = rank;
  return s;
}

}  // namespace

// Plain tensor parallelism and Megatron sequence parallelism: the f/g regions.
TEST(TensorParallelRegions, AllReduceAndSequenceShards) {
  const int T = world_size(), t = world_rank();
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const ModelConfig c = gqa_config();
  const int64_t N = 8, d = 6;
  // Rank r's partial sum y_r; the sum over ranks.
  std::vector<Tensor> y;
  Tensor sum = Tensor::zeros({N, d}, DType::F64);
  for (int r = 0; r < T; ++r) {
    y.push_back(same_everywhere({N, d}, 100 + r));
    ops::add(sum, y.back(), sum);
  }
  {
    TensorParallel tp(c, tp_shard(T, t), SequenceParallel::None, comm.get());
    Tensor x = same_everywhere({N, d}, 99);
    EXPECT_EQ(tp.gather_input(x).raw(), x.raw());        // f: identity
    EXPECT_EQ(tp.gather_output_grad(x).raw(), x.raw());  // g backward: identity
    EXPECT_LT(test::rel_l2(tp.reduce_output(y[t].clone()), sum), 1e-15);
    EXPECT_LT(test::rel_l2(tp.reduce_input_grad(y[t].clone()), sum), 1e-15);
    EXPECT_EQ(tp.attention_head_split(), 1);
  }
  {
    TensorParallel sp(c, tp_shard(T, t), SequenceParallel::Megatron, comm.get());
    Tensor whole = same_everywhere({N, d}, 98);
    const int64_t n = N / T;
    Tensor g = sp.gather_input(rows(whole, t, n));  // all-gather along the tokens
    EXPECT_EQ(g.shape(), (Shape{N, d}));
    EXPECT_EQ(test::max_abs_diff(g, whole), 0.0);
    EXPECT_EQ(test::max_abs_diff(sp.gather_output_grad(rows(whole, t, n)), whole), 0.0);
    Tensor rs = sp.reduce_output(y[t]);  // reduce-scatter: this rank's rows of the sum
    EXPECT_EQ(rs.shape(), (Shape{n, d}));
    EXPECT_LT(test::rel_l2(rs, rows(sum, t, n)), 1e-15);
    EXPECT_LT(test::rel_l2(sp.reduce_input_grad(y[t]), rows(sum, t, n)), 1e-15);
    // Tokens not divisible by T: a clear error.
    Tensor odd = same_everywhere({static_cast<int64_t>(T) * 3 + 1, d}, 97);
    try {
      sp.reduce_output(odd);
      ADD_FAILURE() << "no error for " << odd.size(0) << " tokens";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("not divisible by parallel.tensor"), std::string::npos) << e.what();
    }
  }
}

// Ulysses: [N/S, H, hd] of this rank's tokens <-> [N, H/S, hd] of every token, this rank's heads.
TEST(TensorParallelRegions, UlyssesAllToAll) {
  const int S = world_size(), r = world_rank();
  auto tp = make_local_communicator();
  auto sp = make_mpi_communicator(MPI_COMM_WORLD);
  ModelConfig c = gqa_config();
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 8;
  TensorParallel u(c, ModelShard{}, SequenceParallel::Ulysses, tp.get(), sp.get());
  EXPECT_EQ(u.attention_head_split(), S);
  const int64_t N = 4 * S, n = N / S, hd = 8;
  // part [N, H/S, hd] holds every token's heads [r H/S, (r+1) H/S) of whole [N, H, hd]
  auto expect_my_heads = [&](const Tensor& part, const Tensor& whole) {
    const int64_t H = whole.size(1);
    ASSERT_EQ(part.shape(), (Shape{N, H / S, hd}));
    Tensor p = part.clone();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t h = 0; h < H / S; ++h)
        for (int64_t k = 0; k < hd; ++k)
          ASSERT_EQ(p.item((i * (H / S) + h) * hd + k), whole.item((i * H + r * H / S + h) * hd + k));
  };
  for (int64_t H : {int64_t{8}, int64_t{4}}) {  // query and key/value heads, one at a time
    Tensor whole = same_everywhere({N, H, hd}, 110 + H);
    Tensor mine = rows(whole, r, n);
    Tensor scattered = u.scatter_heads({mine})[0];
    expect_my_heads(scattered, whole);
    Tensor back = u.gather_heads({scattered})[0];
    EXPECT_EQ(back.shape(), mine.shape());
    EXPECT_EQ(test::max_abs_diff(back, mine), 0.0);
  }
  // q (8 heads) and k (4) together, as the model has them: column slices of one [n, 12 hd] matrix
  // in, one all-to-all, column slices of one matrix out (and back).
  Tensor wq = same_everywhere({N, 8, hd}, 130), wk = same_everywhere({N, 4, hd}, 131);
  Tensor joint = Tensor::empty({n, 12 * hd}, DType::F64);
  Tensor q = joint.slice(1, 0, 8 * hd).view({n, 8, hd}), k = joint.slice(1, 8 * hd, 12 * hd).view({n, 4, hd});
  q.copy_from(rows(wq, r, n));
  k.copy_from(rows(wk, r, n));
  const std::vector<Tensor> sc = u.scatter_heads({q, k});
  ASSERT_EQ(sc.size(), 2u);
  expect_my_heads(sc[0], wq);
  expect_my_heads(sc[1], wk);
  EXPECT_TRUE(adjacent_view({sc[0].view({N, -1}), sc[1].view({N, -1})}, 1).defined()) << "not one matrix";
  const std::vector<Tensor> g = u.gather_heads(sc);
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[0].shape(), q.shape());
  EXPECT_EQ(g[1].shape(), k.shape());
  EXPECT_TRUE(adjacent_view({g[0].view({n, -1}), g[1].view({n, -1})}, 1).defined()) << "not one matrix";
  EXPECT_EQ(test::max_abs_diff(g[0].clone(), rows(wq, r, n)), 0.0);
  EXPECT_EQ(test::max_abs_diff(g[1].clone(), rows(wk, r, n)), 0.0);
  // parts that are not side by side go through a copy, with the same result
  const std::vector<Tensor> g2 = u.gather_heads({sc[1].clone(), sc[0].clone()});
  EXPECT_EQ(test::max_abs_diff(g2[0].clone(), rows(wk, r, n)), 0.0);
  EXPECT_EQ(test::max_abs_diff(g2[1].clone(), rows(wq, r, n)), 0.0);
}

// Vocabulary-parallel embedding and LM-head loss against the whole-vocabulary ops (f64).
TEST(TensorParallelRegions, VocabularyParallelEmbeddingAndLoss) {
  const int T = world_size(), t = world_rank();
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const ModelConfig c = gqa_config();  // V = 96, d = 64
  const int64_t V = c.vocab_size, D = c.hidden_size, N = 37, vl = V / T;
  TensorParallel tp(c, tp_shard(T, t), SequenceParallel::None, comm.get());
  std::vector<int32_t> idv(N);
  for (int64_t i = 0; i < N; ++i) idv[i] = static_cast<int32_t>((i * 37 + 5) % V);
  Tensor ids = Tensor::from_vector(idv, {N});
  Tensor table = same_everywhere({V, D}, 120);
  Tensor out = Tensor::empty({N, D}, DType::F64), whole = Tensor::empty({N, D}, DType::F64);
  tp.embedding_forward(rows(table, t, vl), ids, out, Tensor());
  ops::embedding_forward(table, ids, whole);
  EXPECT_EQ(test::max_abs_diff(tp.reduce_output(out), whole), 0.0);  // one nonzero row per token
  Tensor dout = same_everywhere({N, D}, 121), dtable = Tensor::zeros({V, D}, DType::F64),
         dpart = Tensor::zeros({vl, D}, DType::F64);
  ops::embedding_backward(dout, ids, dtable);
  tp.embedding_backward(dout, ids, dpart, Tensor());
  EXPECT_EQ(test::max_abs_diff(dpart, rows(dtable, t, vl)), 0.0);

  // Loss: chunks of 8 (37 = 4 x 8 + 5), some targets ignored.
  std::vector<int32_t> tv = idv;
  tv[3] = tv[20] = ops::kIgnoreIndex;
  Tensor targets = Tensor::from_vector(tv, {N});
  Tensor h = same_everywhere({N, D}, 122), w = same_everywhere({V, D}, 123, -0.3, 0.3);
  const double scale = 1.0 / 35;
  Tensor dh = Tensor::empty({N, D}, DType::F64), dw = Tensor::zeros({V, D}, DType::F64);
  int64_t count = 0;
  const double loss = ops::lm_head_loss(h, w, targets, scale, 8, &count, &dh, &dw);
  Tensor pdh = Tensor::empty({N, D}, DType::F64), pdw = Tensor::zeros({vl, D}, DType::F64);
  int64_t pcount = 0;
  const double ploss = tp.head_loss(h, rows(w, t, vl), targets, scale, 8, &pcount, &pdh, &pdw, 1.0f);
  EXPECT_EQ(pcount, count);  // counted once, not T times
  EXPECT_EQ(count, N - 2);
  EXPECT_NEAR(ploss, loss, 1e-12 * loss);
  // Every rank got the same loss bits.
  const double sum_loss = comm->all_reduce_sum(ploss);
  EXPECT_EQ(sum_loss, ploss * T);
  EXPECT_LT(test::rel_l2(tp.reduce_input_grad(pdh), dh), 1e-12);  // partial dh, summed
  EXPECT_LT(test::rel_l2(pdw, rows(dw, t, vl)), 1e-12);
  // Forward only.
  int64_t fcount = 0;
  EXPECT_NEAR(tp.head_loss(h, rows(w, t, vl), targets, 1.0, 1000, &fcount, nullptr, nullptr, 1.0f), loss, 1e-12 * loss);
  EXPECT_EQ(fcount, count);
}

// Partial gradients of replicated slices are summed over the ranks holding the slice.
TEST(TensorParallelRegions, ReplicaGradientSums) {
  const int T = world_size(), t = world_rank();
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const ModelConfig c = gqa_config();  // 4 heads, 2 key/value heads: T = 4 replicates k/v on 2 ranks
  const ModelShard shard = tp_shard(T, t);
  const auto specs = param_specs(c, shard);
  for (SequenceParallel mode : {SequenceParallel::None, SequenceParallel::Megatron}) {
    SCOPED_TRACE(sequence_parallel_name(mode));
    ReplicaGradients rg = replica_gradients(c, shard, mode, *comm);
    ASSERT_EQ(rg.deferred.size(), specs.size());
    ParamStore g(specs, DType::F64, Device::CPU);
    for (size_t i = 0; i < specs.size(); ++i) ops::fill(g[i], 1.0 + t + 10.0 * static_cast<double>(i));
    size_t partial = 0;
    for (size_t i = 0; i < specs.size(); ++i) {
      const ParamSpec& s = specs[i];
      EXPECT_EQ(rg.norm_weight[i], 1.0 / s.replicas) << s.name;
      const bool norm = s.shape.size() == 1;
      const bool kv = s.name.find("k_proj") != std::string::npos || s.name.find("v_proj") != std::string::npos;
      const bool want = (norm && mode == SequenceParallel::Megatron) || (kv && T > c.num_kv_heads);
      EXPECT_EQ(rg.deferred[i], want) << s.name;
      partial += want;
    }
    EXPECT_EQ(rg.any(), partial > 0);
    if (!rg.pre_reduce) {
      EXPECT_EQ(partial, 0u);
      continue;
    }
    rg.pre_reduce(g);
    for (size_t i = 0; i < specs.size(); ++i) {
      double want = 1.0 + t + 10.0 * static_cast<double>(i);  // untouched
      if (rg.deferred[i]) {
        const int group = specs[i].replicas;  // consecutive ranks share a slice
        const int first = specs[i].shape.size() == 1 ? 0 : t / group * group;
        want = 0;
        for (int r = first; r < first + group; ++r) want += 1.0 + r + 10.0 * static_cast<double>(i);
      }
      EXPECT_EQ(g[i].item(0), want) << specs[i].name;
      EXPECT_EQ(g[i].item(g[i].numel() - 1), want) << specs[i].name;
    }
  }
}

// ------------------------------------------------------------------------------- training

namespace {

Config fixture_config(const std::string& variant, const std::string& run_dir, std::vector<std::string> sets) {
  const std::string fx = test::fixture_dir(variant);
  // Validation on the training data every 3 steps: the forward-only path under each layout.
  sets.insert(sets.begin(), {"model.init_from_hf=" + fx + "/hf", "data.paths=[" + fx + "/data]",
                             "data.valid_paths=[" + fx + "/data]", "train.eval_every=3", "train.eval_batches=2",
                             "run.dir=" + run_dir, "train.log_every=1000"});
  return load_config(fx + "/train.yaml", sets);
}

using test::TrainRun;

TrainRun train(const std::string& variant, const std::string& run_dir, const std::vector<std::string>& sets,
               MPI_Comm comm) {
  return test::train_run(fixture_config(variant, run_dir, sets), comm);
}

ParamStore load_params(const std::string& ckpt, const ModelConfig& c) {
  ParamStore p(param_specs(c), DType::F32, Device::CPU);
  load_checkpoint(ckpt, {{"params", &p}}, /*optimizer_optional=*/true);
  return p;
}

// The one-process run of (variant, gbs, micro) on this rank, computed once.
const TrainRun& reference(const std::string& variant, int gbs, int micro) {
  const std::string name = variant + "_gbs" + std::to_string(gbs) + "_micro" + std::to_string(micro);
  return test::one_process_run("tp_ref", name, [&](const std::string& dir) {
    return fixture_config(variant, dir,
                          {"train.global_batch_size=" + std::to_string(gbs), "train.micro_batch_size=" + std::to_string(micro)});
  });
}

// One layout of the world's ranks. group: ranks per independent run (consecutive world ranks).
struct Layout {
  std::string name;
  int group;             // world ranks in one run
  int tp;                // parallel.tensor
  std::string sequence;  // parallel.sequence
  int sp;                // parallel.sequence_size
  int zero;
  int gbs, micro;
};

std::vector<Layout> layouts(int world) {
  std::vector<Layout> v;
  // Tensor parallelism over the whole world (tp 4 replicates the 2 key/value heads).
  v.push_back({"tp" + std::to_string(world), world, world, "none", 1, 0, 4, 2});
  v.push_back({"tp" + std::to_string(world) + "_megatron", world, world, "megatron", 1, 1, 4, 2});
  // Ulysses over 2 ranks (x dp 2 in a world of 4).
  v.push_back({"ulysses2_dp" + std::to_string(world / 2), world, 1, "ulysses", 2, world == 4 ? 3 : 1, 4,
               world == 4 ? 2 : 4});
  if (world == 4) {
    v.push_back({"tp2_dp2_zero1", 4, 2, "none", 1, 1, 4, 2});
    v.push_back({"tp2_dp2_zero3", 4, 2, "none", 1, 3, 4, 2});
    v.push_back({"tp2_megatron_dp2_zero2", 4, 2, "megatron", 1, 2, 8, 2});
    v.push_back({"tp2_groups_of_2", 2, 2, "none", 1, 0, 4, 2});  // two independent tp-2 runs
  }
  return v;
}

}  // namespace

class TensorParallelTraining : public ::testing::TestWithParam<const char*> {};

TEST_P(TensorParallelTraining, EqualsOneProcess) {
  const std::string variant = GetParam();
  const int world = world_size();
  const std::string base = test::shared_dir("tp_" + variant);
  const ModelConfig mc = read_hf_model_config(test::fixture_dir(variant) + "/hf");
  for (const Layout& L : layouts(world)) {
    SCOPED_TRACE(variant + " " + L.name);
    const int group = world_rank() / L.group;
    MPI_Comm comm;
    MPI_Comm_split(MPI_COMM_WORLD, group, world_rank(), &comm);
    const std::string dir = base + "/" + L.name + "_g" + std::to_string(group);
    TrainRun run = train(variant, dir,
                         {"parallel.tensor=" + std::to_string(L.tp), "parallel.sequence=" + L.sequence,
                          "parallel.sequence_size=" + std::to_string(L.sp), "parallel.zero=" + std::to_string(L.zero),
                          "parallel.bucket_mb=0.004", "train.global_batch_size=" + std::to_string(L.gbs),
                          "train.micro_batch_size=" + std::to_string(L.micro)},
                         comm);
    MPI_Barrier(comm);  // the group's rank 0 has written the checkpoint
    MPI_Comm_free(&comm);
    const TrainRun& ref = reference(variant, L.gbs, L.micro);
    ASSERT_EQ(run.metrics.size(), ref.metrics.size());
    double worst_loss = 0, worst_norm = 0;
    for (size_t i = 0; i < run.metrics.size(); ++i) {
      const StepMetrics &a = run.metrics[i], &b = ref.metrics[i];
      EXPECT_NEAR(a.loss, b.loss, 1e-5 * std::fabs(b.loss)) << "step " << i + 1;
      EXPECT_NEAR(a.grad_norm, b.grad_norm, 1e-5 * b.grad_norm) << "step " << i + 1;
      worst_loss = std::max(worst_loss, std::fabs(a.loss - b.loss) / std::fabs(b.loss));
      worst_norm = std::max(worst_norm, std::fabs(a.grad_norm - b.grad_norm) / b.grad_norm);
    }
    const std::vector<double> val = test::val_losses(run.dir), ref_val = test::val_losses(ref.dir);
    ASSERT_EQ(val.size(), 2u);  // after steps 3 and 6
    ASSERT_EQ(ref_val.size(), 2u);
    double worst_val = 0;
    for (size_t i = 0; i < val.size(); ++i) {
      EXPECT_NEAR(val[i], ref_val[i], 1e-5 * ref_val[i]) << "evaluation " << i;
      worst_val = std::max(worst_val, std::fabs(val[i] - ref_val[i]) / ref_val[i]);
    }
    const ParamStore got = load_params(run.checkpoint, mc), want = load_params(ref.checkpoint, mc);
    double worst_w = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double e = test::rel_l2(got[i], want[i]);
      EXPECT_LT(e, 1e-5) << got.spec(i).name;
      worst_w = std::max(worst_w, e);
    }
    if (world_rank() == 0)
      std::printf("  %-12s %-24s vs one process: loss %.1e, grad norm %.1e, val loss %.1e, weights %.1e (max rel)\n",
                  variant.c_str(), L.name.c_str(), worst_loss, worst_norm, worst_val, worst_w);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TensorParallelTraining, ::testing::Values("llama_gqa", "llama_tied"),
                         [](const auto& info) { return std::string(info.param); });

// Ulysses inside a tensor group: tp 2 x S 2 on 4 ranks (8 heads and 4 key/value heads: 4 and 2
// per tensor rank, split again over the 2 sequence ranks), a model of configs/tiny.yaml's shape
// from random weights, against one process.
TEST(TensorParallelTraining, UlyssesTimesTensorParallel) {
  if (world_size() != 4) GTEST_SKIP() << "needs 4 ranks (tp 2 x sequence 2)";
  const std::string base = test::shared_dir("tp_ulysses_tp");
  auto run = [&](const std::string& dir, const std::vector<std::string>& extra, MPI_Comm comm) {
    std::vector<std::string> sets = {"run.dir=" + dir, "data.paths=[" + test::source_dir() + "/configs/data/tiny]",
                                     "train.steps=4", "schedule.warmup_steps=1",
                                     "train.log_every=1000", "model.num_heads=8", "model.num_kv_heads=4",
                                     "train.global_batch_size=4", "train.micro_batch_size=2"};
    sets.insert(sets.end(), extra.begin(), extra.end());
    return run_train(load_config(test::source_dir() + "/configs/tiny.yaml", sets), comm);
  };
  const auto ref = run(base + "/one_r" + std::to_string(world_rank()), {}, MPI_COMM_SELF);
  const auto got = run(base + "/tp2_sp2",
                       {"parallel.tensor=2", "parallel.sequence=ulysses", "parallel.sequence_size=2", "parallel.zero=1"},
                       MPI_COMM_WORLD);
  ASSERT_EQ(got.size(), ref.size());
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i].loss, ref[i].loss, 1e-5 * ref[i].loss) << "step " << i + 1;
    EXPECT_NEAR(got[i].grad_norm, ref[i].grad_norm, 1e-5 * ref[i].grad_norm) << "step " << i + 1;
    worst = std::max({worst, std::fabs(got[i].loss - ref[i].loss) / ref[i].loss,
                      std::fabs(got[i].grad_norm - ref[i].grad_norm) / ref[i].grad_norm});
  }
  if (world_rank() == 0) std::printf("  tp 2 x Ulysses 2: loss and grad norm max rel %.1e vs one process\n", worst);
}

// Checkpoints hold global tensors whatever the layout, so any layout resumes any other: a tp run's
// step-3 checkpoint continued by one process, and a one-process checkpoint continued under tp with
// Megatron sequence parallelism and ZeRO-1, both end at the uninterrupted one-process run's weights.
TEST(TensorParallelCheckpoints, ResumeAcrossLayouts) {
  const int W = world_size(), r = world_rank();
  const std::string variant = "llama_gqa", base = test::shared_dir("tp_resume");
  const ModelConfig mc = gqa_config();
  const TrainRun& ref = reference(variant, 4, 2);
  const std::vector<std::string> common = {"train.global_batch_size=4", "train.micro_batch_size=2",
                                           "checkpoint.every=3"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), common.begin(), common.end());
    return extra;
  };
  // tp = W from scratch, saving at step 3; then each rank alone from that checkpoint.
  train(variant, base + "/tp", with({"parallel.tensor=" + std::to_string(W)}), MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string tp_step3 = checkpoint_dir(base + "/tp", 3);
  TrainRun one = train(variant, base + "/one_from_tp_r" + std::to_string(r), with({"checkpoint.resume=" + tp_step3}),
                       MPI_COMM_SELF);
  ASSERT_EQ(one.metrics.size(), 3u);  // steps 4-6
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(one.metrics[i].loss, ref.metrics[i + 3].loss, 1e-5 * ref.metrics[i + 3].loss) << "step " << i + 4;
  // One process saving at step 3 (rank 0's), continued by tp = W with Megatron SP and ZeRO-1.
  if (r == 0) train(variant, base + "/single", common, MPI_COMM_SELF);
  MPI_Barrier(MPI_COMM_WORLD);
  TrainRun tp = train(variant, base + "/tp_from_one",
                      with({"checkpoint.resume=" + checkpoint_dir(base + "/single", 3),
                            "parallel.tensor=" + std::to_string(W), "parallel.sequence=megatron", "parallel.zero=1"}),
                      MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);
  ASSERT_EQ(tp.metrics.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(tp.metrics[i].loss, ref.metrics[i + 3].loss, 1e-5 * ref.metrics[i + 3].loss) << "step " << i + 4;
  const ParamStore want = load_params(ref.checkpoint, mc);
  double worst = 0;
  for (const std::string& ckpt : {one.checkpoint, tp.checkpoint}) {
    const ParamStore got = load_params(ckpt, mc);
    for (size_t i = 0; i < got.size(); ++i) {
      const double e = test::rel_l2(got[i], want[i]);
      EXPECT_LT(e, 1e-5) << ckpt << " " << got.spec(i).name;
      worst = std::max(worst, e);
    }
  }
  if (r == 0) std::printf("  resumed across layouts: final weights max rel L2 %.1e vs one process\n", worst);
}

// Per-rank parameter bytes: every local slice is global x replicas / T elements (1/T of a split
// tensor; a replicated one whole), and ZeroOptimizer's weights over them take exactly what
// `ievo plan` says for tensor rank 0 (f32; allocator statistics).
TEST(TensorParallelMemory, PerRankParameterBytes) {
  const ModelConfig c = gqa_config();
  auto one = make_local_communicator();
  for (int T : {1, 2, 4}) {
    SCOPED_TRACE("tp " + std::to_string(T));
    int64_t sharded = 0, replicated = 0, local_total = 0;
    const auto global = param_specs(c);
    for (int t = 0; t < T; ++t) {
      const auto specs = param_specs(c, tp_shard(T, t));
      ASSERT_EQ(specs.size(), global.size());
      int64_t total = 0;
      for (size_t i = 0; i < specs.size(); ++i) {
        const int64_t n = shape_numel(specs[i].shape), g = shape_numel(global[i].shape);
        EXPECT_EQ(n * T, g * specs[i].replicas) << specs[i].name;
        if (T > 1 && specs[i].split_dim < 0) {
          EXPECT_EQ(specs[i].replicas, T) << specs[i].name;  // norms
        }
        total += n;
        if (t == 0) (specs[i].split_dim < 0 ? replicated : sharded) += n;
      }
      if (t == 0) local_total = total;
      EXPECT_EQ(total, local_total) << "rank " << t << " holds another amount";
    }
    // By hand for the fixture (d 64, L 2, 4 heads of 16, 2 kv heads, F 160, V 96, untied).
    const int64_t d = 64, L = 2, F = 160, V = 96, kv = T > 2 ? 16 : 32 / T;
    const int64_t split = 2 * V * d / T + L * (64 * d / T * 2 + 2 * kv * d + 3 * F * d / T);
    EXPECT_EQ(sharded, T == 1 ? 0 : split);  // T = 1: every tensor whole
    EXPECT_EQ(replicated, T == 1 ? c.num_params() : (2 * L + 1) * d);
    EXPECT_EQ(split + (2 * L + 1) * d, local_total);
    PlanInput in;
    in.model = c;
    in.tp = T;
    in.zero = ZeroConfig{0, 0.01};
    in.seq_len = 32;
    const Plan plan = make_plan(in);
    EXPECT_EQ(plan.psi, local_total);
    EXPECT_EQ(plan.sharded, sharded);
    EXPECT_EQ(plan.replicated, replicated);
    EXPECT_EQ(plan.psi_global, c.num_params());
    Llama model(c, Recompute::None, tp_shard(T, 0));
    const int64_t before = memory_stats(Device::CPU).live_bytes;
    ZeroOptimizer z(param_specs(c, tp_shard(T, 0)), model.hook_layers(), DType::F32, Device::CPU, *one,
                    in.zero, AdamWConfig{});
    EXPECT_EQ(memory_stats(Device::CPU).live_bytes - before, z.memory().total());
    EXPECT_EQ(z.memory().params, plan.exact.params);
    EXPECT_EQ(z.memory().params, 4 * (local_total + plan.padding_elements));
    if (world_rank() == 0)
      std::printf("  tp %d: per rank %lld parameters = %lld in slices + %lld replicated (global %lld)\n", T,
                  static_cast<long long>(local_total), static_cast<long long>(sharded),
                  static_cast<long long>(replicated), static_cast<long long>(c.num_params()));
  }
}

// `ievo plan`'s activation estimate for tensor / sequence layouts against the allocator's peak
// during one measured step of this rank (fp32, CPU), as tests/test_plan.cpp does for one rank:
// an upper bound that overcounts by at most a quarter (observed ratios 0.89-0.98, np 2 and 4).
TEST(TensorParallelMemory, ActivationEstimateBoundsAMeasuredStep) {
  const int W = world_size(), r = world_rank();
  ModelConfig c;
  c.vocab_size = 256;
  c.hidden_size = 128;
  c.num_layers = 2;
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.ffn_hidden_size = 384;
  c.max_position_embeddings = 512;
  const int64_t B = 3, T = 128;
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  auto one = make_local_communicator();
  std::vector<int32_t> rows(static_cast<size_t>(B * (T + 1)));
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int32_t>(i * 31 % c.vocab_size);
  const Batch whole = make_batch(rows, B, T);
  for (SequenceParallel mode : {SequenceParallel::None, SequenceParallel::Megatron, SequenceParallel::Ulysses}) {
    const bool ulysses = mode == SequenceParallel::Ulysses;
    const int tp = ulysses ? 1 : W, sp = ulysses ? W : 1;
    SCOPED_TRACE(std::string(sequence_parallel_name(mode)) + " tp " + std::to_string(tp) + " sp " + std::to_string(sp));
    const ModelShard shard = tp_shard(tp, ulysses ? 0 : r);
    TensorParallel par(c, shard, mode, ulysses ? one.get() : world.get(), ulysses ? world.get() : nullptr);
    Llama model(c, Recompute::None, shard, &par);
    ParamStore w(param_specs(c, shard), DType::F32, Device::CPU), g(param_specs(c, shard), DType::F32, Device::CPU);
    for (size_t i = 0; i < w.size(); ++i) ops::fill(w[i], 0.01 * static_cast<double>(i % 7 + 1));
    const Batch b = sequence_slice(whole, sp, ulysses ? r : 0);
    PlanInput in;
    in.model = c;
    in.tp = tp;
    in.sequence = mode;
    in.sp = sp;
    in.dp = sp;
    in.micro_batch_size = B;
    in.seq_len = T;
    const Plan plan = make_plan(in);
    const int64_t live0 = memory_stats(Device::CPU).live_bytes;
    allocator(Device::CPU).reset_peak();
    model.forward_backward(w, b, 1.0 / (B * T), g);
    const double measured = static_cast<double>(memory_stats(Device::CPU).peak_bytes - live0);
    const double estimate = static_cast<double>(plan.activations);
    if (r == 0)
      std::printf("  activations %-8s tp %d sp %d: measured %8.0f B, estimate %8.0f B, ratio %.3f\n",
                  sequence_parallel_name(mode), tp, sp, measured, estimate, measured / estimate);
    EXPECT_LE(measured, estimate);
    EXPECT_GE(measured, 0.75 * estimate);
  }
}

// Bad layouts: errors that name the keys, before any training (no metrics written).
TEST(TensorParallelErrors, BadLayoutsFailBeforeWork) {
  const int world = world_size();
  const std::string base = test::shared_dir("tp_err");
  int k = 0;
  auto expect_error = [&](std::vector<std::string> sets, const std::vector<std::string>& words) {
    const std::string dir = base + "/run" + std::to_string(k++);
    sets.insert(sets.begin(), {"run.dir=" + dir, "data.paths=[" + test::source_dir() + "/configs/data/tiny]",
                               "train.steps=2", "schedule.warmup_steps=0", "checkpoint.at_end=false"});
    try {
      const Config cfg = load_config(test::source_dir() + "/configs/tiny.yaml", sets);
      run_train(cfg, MPI_COMM_WORLD);
      ADD_FAILURE() << "no error for " << sets.back();
    } catch (const Error& e) {
      for (const auto& w : words) EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
      if (world_rank() == 0) std::printf("  %s\n", e.what());
    }
    EXPECT_FALSE(fs::exists(dir + "/metrics.jsonl")) << sets.back();
  };
  // world != dp x tp x pp.
  expect_error({"parallel.tensor=3"}, {"parallel.tensor", "not divisible"});
  // Heads not divisible by tp.
  expect_error({"model.num_heads=1", "model.num_kv_heads=1", "parallel.tensor=" + std::to_string(world)},
               {"parallel.tensor", "model.num_heads"});
  // Megatron: tokens of a micro-batch not divisible by tp.
  expect_error({"data.seq_len=127", "train.micro_batch_size=1", "train.global_batch_size=8",
                "parallel.tensor=" + std::to_string(world), "parallel.sequence=megatron"},
               {"megatron", "not divisible by parallel.tensor"});
  // Ulysses: more sequence ranks than heads; sequence length not divisible by S; S not dividing dp.
  expect_error({"model.num_heads=1", "model.num_kv_heads=1", "parallel.sequence=ulysses", "parallel.sequence_size=2"},
               {"parallel.sequence_size = 2 exceeds the 1 attention heads"});
  expect_error({"data.seq_len=127", "parallel.sequence=ulysses", "parallel.sequence_size=2"},
               {"data.seq_len = 127", "not divisible by parallel.sequence_size = 2"});
  if (world == 2)
    expect_error({"parallel.sequence=ulysses", "parallel.sequence_size=4"}, {"parallel.sequence_size"});
  else
    expect_error({"parallel.sequence=ulysses", "parallel.sequence_size=3"}, {"parallel.sequence_size = 3"});
}

// main(): MPI for the whole run, one console.
#include "mpi_main.h"
