// main() for the test_mpi_* executables (run under mpirun): MPI for the whole run, one console
// (rank 0 prints the usual GoogleTest output; the other ranks print only their failures, prefixed
// with the rank), and a non-zero exit status from any rank fails the mpirun.
//   #include "mpi_main.h"   // at the end of the test file; defines main()
#pragma once
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "parallel/topology.h"

namespace ievo::test {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }

 private:
  int rank_;
};

}  // namespace ievo::test

int main(int argc, char** argv) {
  ievo::MpiSession mpi(&argc, &argv, /*force=*/true);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new ievo::test::RankFailurePrinter(rank));
  }
  return RUN_ALL_TESTS();
}
