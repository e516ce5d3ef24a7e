// Helpers shared by the MPI tests (tests/test_mpi_*.cpp, run under mpirun -np 2 and -np 4).
#pragma once
#include <mpi.h>

#include <string>

#include "util.h"

namespace ievo::test {

// A fresh directory made by world rank 0, the same path on every rank (collective).
inline std::string shared_dir(const std::string& tag) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::string d = rank == 0 ? temp_dir(tag) : "";
  int n = static_cast<int>(d.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  d.resize(static_cast<size_t>(n));
  MPI_Bcast(d.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
  return d;
}

}  // namespace ievo::test
