// The MPI communicator and the topology, under mpirun -np 2 and -np 4 (every rank runs every
// test; values are built from the rank so each rank knows the exact expected result).
#include <gtest/gtest.h>

#include <cmath>

#include "parallel/communicator.h"
#include "parallel/topology.h"
#include "runtime/dtype.h"

using namespace ievo;

namespace {

// Element i of rank r's tensor: small integers, exact in every dtype (bf16 included).
double value(int r, int64_t i) { return static_cast<double>((r + 1) * (i % 7 + 1)); }

Tensor make(DType dt, int64_t n, int r) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = value(r, i);
  return Tensor::from_vector(v, {n}).to(dt);
}

}  // namespace

class Comm : public ::testing::TestWithParam<DType> {};

TEST_P(Comm, AllReduceReduceScatterAllGatherBroadcast) {
  const DType dt = GetParam();
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  ASSERT_EQ(comm->rank(), world_rank());
  ASSERT_EQ(comm->size(), world_size());
  const int64_t n = 5;  // per rank
  const double ranks_sum = world_size() * (world_size() + 1) / 2.0;  // sum of (r + 1)

  Tensor t = make(dt, n * world_size(), world_rank());
  comm->all_reduce(t);
  for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.to(DType::F64).item(i), ranks_sum * (i % 7 + 1)) << i;

  // reduce_scatter into a separate tensor, and in place (out = in's own slice).
  Tensor in = make(dt, n * world_size(), world_rank()), out = Tensor::zeros({n}, dt);
  comm->reduce_scatter(in, out);
  Tensor in2 = make(dt, n * world_size(), world_rank());
  Tensor own = in2.slice(0, world_rank() * n, (world_rank() + 1) * n);
  comm->reduce_scatter(in2, own);
  for (int64_t i = 0; i < n; ++i) {
    const double want = ranks_sum * ((world_rank() * n + i) % 7 + 1);
    EXPECT_EQ(out.to(DType::F64).item(i), want) << i;
    EXPECT_EQ(own.to(DType::F64).item(i), want) << "in place " << i;
  }

  // all_gather from a separate tensor, and in place.
  Tensor mine = make(dt, n, world_rank()), all = Tensor::zeros({n * world_size()}, dt);
  comm->all_gather(mine, all);
  Tensor all2 = Tensor::zeros({n * world_size()}, dt);
  Tensor slot = all2.slice(0, world_rank() * n, (world_rank() + 1) * n);
  slot.copy_from(mine);
  comm->all_gather(slot, all2);
  for (int r = 0; r < world_size(); ++r)
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(all.to(DType::F64).item(r * n + i), value(r, i));
      EXPECT_EQ(all2.to(DType::F64).item(r * n + i), value(r, i)) << "in place";
    }

  Tensor b = make(dt, 3, world_rank());
  comm->broadcast(b, world_size() - 1);
  for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(b.to(DType::F64).item(i), value(world_size() - 1, i));
}

INSTANTIATE_TEST_SUITE_P(DTypes, Comm, ::testing::Values(DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(CommMpi, SendRecvRingAndScalars) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const int next = (world_rank() + 1) % world_size(), prev = (world_rank() + world_size() - 1) % world_size();
  Tensor mine = make(DType::F32, 4, world_rank()), got = Tensor::zeros({4}, DType::F32);
  if (world_rank() % 2 == 0) {
    comm->send(mine, next);
    comm->recv(got, prev);
  } else {
    comm->recv(got, prev);
    comm->send(mine, next);
  }
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(got.item(i), value(prev, i));
  EXPECT_EQ(comm->all_reduce_sum(0.5 * (world_rank() + 1)), 0.5 * world_size() * (world_size() + 1) / 2);
  EXPECT_EQ(comm->all_reduce_sum(int64_t{1} << 40), (int64_t{1} << 40) * world_size());
  comm->barrier();
}

TEST(CommMpi, ErrorsNameTheProblem) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Tensor in = Tensor::zeros({3 * world_size() + 1}, DType::F32), out = Tensor::zeros({3}, DType::F32);
  try {
    comm->reduce_scatter(in, out);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must hold"), std::string::npos) << e.what();
  }
  Tensor i64 = Tensor::zeros({2}, DType::I64);
  EXPECT_THROW(comm->all_reduce(i64), Error);
}

TEST(CommLocal, GroupOfOne) {
  auto comm = make_local_communicator();
  Tensor t = make(DType::F32, 4, 0);
  comm->all_reduce(t);
  EXPECT_EQ(t.item(3), value(0, 3));
  Tensor out = Tensor::zeros({4}, DType::F32);
  comm->all_gather(t, out);
  EXPECT_EQ(out.item(2), value(0, 2));
  EXPECT_EQ(comm->all_reduce_sum(2.5), 2.5);
  EXPECT_THROW(comm->send(t, 1), Error);
}

// world = pp x dp x tp, tensor innermost: check every group's members by summing world ranks.
TEST(Topology, GroupsFollowTheMegatronOrder) {
  for (int tp : {1, 2})
    for (int pp : {1, 2}) {
      if (world_size() % (tp * pp) != 0) continue;
      Topology t(MPI_COMM_WORLD, tp, pp);
      const int dp = world_size() / (tp * pp);
      ASSERT_EQ(t.dp(), dp);
      EXPECT_EQ(t.world_rank(), world_rank());
      EXPECT_EQ(t.rank_of(t.dp_rank(), t.pp_rank(), t.tp_rank()), world_rank());
      EXPECT_EQ(world_rank(), t.pp_rank() * dp * tp + t.dp_rank() * tp + t.tp_rank());
      struct G {
        MPI_Comm c;
        int size, my_index;
        double expected_sum;
      };
      double dp_sum = 0, tp_sum = 0, pp_sum = 0;
      for (int i = 0; i < dp; ++i) dp_sum += t.rank_of(i, t.pp_rank(), t.tp_rank());
      for (int i = 0; i < tp; ++i) tp_sum += t.rank_of(t.dp_rank(), t.pp_rank(), i);
      for (int i = 0; i < pp; ++i) pp_sum += t.rank_of(t.dp_rank(), i, t.tp_rank());
      for (G g : {G{t.dp_comm(), dp, t.dp_rank(), dp_sum}, G{t.tp_comm(), tp, t.tp_rank(), tp_sum},
                  G{t.pp_comm(), pp, t.pp_rank(), pp_sum}}) {
        auto c = make_mpi_communicator(g.c);
        EXPECT_EQ(c->size(), g.size) << t.describe();
        EXPECT_EQ(c->rank(), g.my_index) << t.describe();
        EXPECT_EQ(c->all_reduce_sum(static_cast<double>(world_rank())), g.expected_sum) << t.describe();
      }
    }
}

TEST(Topology, ErrorsNameTheKeys) {
  try {
    Topology t(MPI_COMM_WORLD, 3, 1);
    if (world_size() % 3 != 0) FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.tensor"), std::string::npos) << e.what();
  }
  try {
    (void)Topology::from_world(1, 3);  // 3 stages do not divide 2 or 4 ranks
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.pipeline"), std::string::npos) << e.what();
  }
  const LaunchEnv e = launch_env();
  EXPECT_TRUE(e.launched());
  EXPECT_EQ(e.rank, world_rank());
  EXPECT_EQ(e.size, world_size());
}

// main(): MPI for the whole run, one console.
#include "mpi_main.h"
