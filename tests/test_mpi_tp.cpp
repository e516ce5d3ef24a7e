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
#include "models/hf_config.h"
#include "models/shard.h"
#include "parallel/communicator.h"
#include "parallel/tensor_parallel.h"
#include "parallel/topology.h"
#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/embedding.h"
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
  for (int64_t H : {int64_t{8}, int64_t{4}}) {  // query and key/value heads
    Tensor whole = same_everywhere({N, H, hd}, 110 + H);
    Tensor mine = rows(whole, r, n);
    Tensor scattered = u.scatter_heads(mine);
    ASSERT_EQ(scattered.shape(), (Shape{N, H / S, hd}));
    for (int64_t i = 0; i < N; ++i)  // every token, heads [r H/S, (r+1) H/S)
      for (int64_t h = 0; h < H / S; ++h)
        for (int64_t k = 0; k < hd; ++k)
          ASSERT_EQ(scattered.item((i * (H / S) + h) * hd + k), whole.item((i * H + r * H / S + h) * hd + k));
    Tensor back = u.gather_heads(scattered);
    EXPECT_EQ(back.shape(), mine.shape());
    EXPECT_EQ(test::max_abs_diff(back, mine), 0.0);
  }
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
  tp.embedding_forward(rows(table, t, vl), ids, out);
  ops::embedding_forward(table, ids, whole);
  EXPECT_EQ(test::max_abs_diff(tp.reduce_output(out), whole), 0.0);  // one nonzero row per token
  Tensor dout = same_everywhere({N, D}, 121), dtable = Tensor::zeros({V, D}, DType::F64),
         dpart = Tensor::zeros({vl, D}, DType::F64);
  ops::embedding_backward(dout, ids, dtable);
  tp.embedding_backward(dout, ids, dpart);
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
  const double ploss = tp.head_loss(h, rows(w, t, vl), targets, scale, 8, &pcount, &pdh, &pdw);
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
  EXPECT_NEAR(tp.head_loss(h, rows(w, t, vl), targets, 1.0, 1000, &fcount, nullptr, nullptr), loss, 1e-12 * loss);
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

// main(): MPI for the whole run, one console.
#include "mpi_main.h"
