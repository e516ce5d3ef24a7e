// `ievo bench --comm`: the bus bandwidth of ievo's own collectives, the ones ZeRO and tensor
// parallelism call (parallel/communicator.h), over all ranks of the job:
//   mpirun -np 4 ievo bench --comm [--device cuda|cpu] [--comm-max-mib 1024] [--json OUT]
//
// For each collective and each size (powers of 4 from --comm-min-mib to --comm-max-mib), W warm-up
// and N timed calls back to back; the time is the slowest rank's mean (barrier, device sync, N
// calls, device sync). Sizes and bandwidths follow nccl-tests (its doc/PERFORMANCE.md), so the
// numbers compare with theirs and with the device's published figures:
//   size     the full buffer: all_reduce's tensor; reduce_scatter's input; all_gather's output
//   algbw    size / time
//   busbw    algbw x 2(n-1)/n (all_reduce), x (n-1)/n (reduce_scatter, all_gather): the bytes each
//            rank's link carries in a ring, i.e. what the hardware's bandwidth bounds
// The first call of every size is checked: each rank contributes (rank + 1) in every element, so
// the all_reduce / reduce_scatter result is n(n+1)/2 and all_gather's slice k is k + 1 (exact in
// bf16 up to n = 21 ranks); a wrong element is an error naming the collective and the size.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/dtype.h"

namespace ievo {

class Communicator;

struct CommBenchOptions {
  std::string device = "cuda";  // cuda: NCCL; cpu: MPI
  DType dtype = DType::BF16;
  int64_t min_bytes = int64_t{1} << 20, max_bytes = int64_t{1} << 30;
  int warmup = 5, iters = 20;
  std::string json;  // "": no JSON file
};

struct CommBenchRow {
  std::string op;     // all_reduce | reduce_scatter | all_gather
  int64_t bytes = 0;  // the full buffer (see above)
  double time_s = 0;  // mean per call, slowest rank
  double algbw = 0, busbw = 0;  // bytes/s
};

struct CommBenchResult {
  std::string backend, device, dtype;
  int ranks = 1;
  std::vector<CommBenchRow> rows;
};

// Runs the sweep over `comm` (every rank of it calls this); the tensors live on `device`.
CommBenchResult run_comm_bench(const CommBenchOptions& o, Communicator& comm, Device device);
// Under the launcher: MPI_COMM_WORLD's ranks, the GPU of the local rank with --device cuda.
CommBenchResult run_comm_bench(const CommBenchOptions& o);
nlohmann::json comm_bench_to_json(const CommBenchResult& r);
std::string format_comm_bench(const CommBenchResult& r);

}  // namespace ievo
