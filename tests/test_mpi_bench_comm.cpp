// `ievo bench --comm` (launch/bench_comm.h) over MPI under mpirun -np 2 and -np 4: the sizes and
// bus-bandwidth factors of nccl-tests, the slowest rank's time on every rank, and a collective that
// computes the wrong thing is caught by name.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "launch/bench_comm.h"
#include "parallel/communicator.h"
#include "parallel/topology.h"
#include "runtime/error.h"

using namespace ievo;

namespace {

CommBenchOptions small(DType dt) {
  CommBenchOptions o;
  o.device = "cpu";
  o.dtype = dt;
  o.min_bytes = 4096;
  o.max_bytes = 4096 * 16;  // 4, 16 and 64 KiB
  o.warmup = 1;
  o.iters = 3;
  return o;
}

// The MPI communicator, except that one collective does nothing.
class Broken : public Communicator {
 public:
  explicit Broken(std::string op) : in_(make_mpi_communicator(MPI_COMM_WORLD)), op_(std::move(op)) {}
  int rank() const override { return in_->rank(); }
  int size() const override { return in_->size(); }
  const char* backend() const override { return "broken"; }
  void all_reduce(Tensor& t) override {
    if (op_ != "all_reduce") in_->all_reduce(t);
  }
  void reduce_scatter(const Tensor& in, Tensor& out) override {
    if (op_ != "reduce_scatter") in_->reduce_scatter(in, out);
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    if (op_ != "all_gather") in_->all_gather(in, out);
  }
  void broadcast(Tensor& t, int root) override { in_->broadcast(t, root); }
  void send(const Tensor& t, int peer) override { in_->send(t, peer); }
  void recv(Tensor& t, int peer) override { in_->recv(t, peer); }
  void barrier() override { in_->barrier(); }
  double all_reduce_sum(double x) override { return in_->all_reduce_sum(x); }
  int64_t all_reduce_sum(int64_t x) override { return in_->all_reduce_sum(x); }

 private:
  std::unique_ptr<Communicator> in_;
  std::string op_;
};

}  // namespace

TEST(BenchComm, SizesFactorsAndTimesOverMpi) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const int n = comm->size();
  for (DType dt : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(dtype_name(dt));
    const CommBenchResult r = run_comm_bench(small(dt), *comm, Device::CPU);
    EXPECT_EQ(r.backend, "mpi");
    EXPECT_EQ(r.ranks, n);
    ASSERT_EQ(r.rows.size(), 9u);  // 3 sizes x 3 collectives
    const char* ops[] = {"all_reduce", "reduce_scatter", "all_gather"};
    for (size_t i = 0; i < r.rows.size(); ++i) {
      const CommBenchRow& x = r.rows[i];
      SCOPED_TRACE(x.op + " " + std::to_string(x.bytes));
      EXPECT_EQ(x.op, ops[i % 3]);
      // The full buffer: n equal shares, the requested size rounded down to them.
      const int64_t want = 4096 << (2 * (i / 3));
      const int64_t share = want / static_cast<int64_t>(dtype_size(dt) * n);
      EXPECT_EQ(x.bytes, share * n * static_cast<int64_t>(dtype_size(dt)));
      EXPECT_GT(x.time_s, 0);
      EXPECT_DOUBLE_EQ(x.algbw, x.bytes / x.time_s);
      const double factor = x.op == "all_reduce" ? 2.0 * (n - 1) / n : (n - 1.0) / n;
      EXPECT_DOUBLE_EQ(x.busbw, x.algbw * factor);
      // The slowest rank's time: the same on every rank.
      double mx = x.time_s, mn = x.time_s;
      MPI_Allreduce(MPI_IN_PLACE, &mx, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      MPI_Allreduce(MPI_IN_PLACE, &mn, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
      EXPECT_EQ(mx, mn);
    }
    const auto j = comm_bench_to_json(r);
    EXPECT_EQ(j["results"].size(), 9u);
    EXPECT_NEAR(j["results"][0]["busbw_gbs"].get<double>(), r.rows[0].busbw / 1e9, 1e-12);
  }
}

TEST(BenchComm, AWrongCollectiveIsNamed) {
  for (const char* op : {"all_reduce", "reduce_scatter", "all_gather"}) {
    Broken comm(op);
    try {
      run_comm_bench(small(DType::BF16), comm, Device::CPU);
      ADD_FAILURE() << op << " computed nothing and was not caught";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string(op) + " of 4096 bytes"), std::string::npos) << e.what();
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
}

#include "mpi_main.h"
