#include "launch/bench_comm.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "launch/device.h"
#include "parallel/communicator.h"
#include "parallel/topology.h"
#include "runtime/error.h"
#include "runtime/ops/elementwise.h"
#include "runtime/tensor.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

namespace ievo {
namespace {

// The slowest rank's value (MPI's world when active; the communicator's ranks are the world's).
double max_over_ranks(double x) {
  if (!mpi_active()) return x;
  double out = x;
  MPI_Allreduce(&x, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

// Every element of `t` equals `want`, else an error naming the collective and the size.
void check_all(const Tensor& t, double want, const char* op, int64_t bytes, int64_t offset = 0) {
  const Tensor h = t.to(DType::F32).to(Device::CPU);
  const float* p = h.data<float>();
  for (int64_t i = 0; i < h.numel(); ++i)
    IEVO_CHECK(p[i] == static_cast<float>(want), "ievo bench --comm: ", op, " of ", bytes, " bytes gave ", p[i],
               " at element ", offset + i, ", expected ", want);
}

}  // namespace

CommBenchResult run_comm_bench(const CommBenchOptions& o, Communicator& comm, Device device) {
  IEVO_CHECK(o.min_bytes > 0 && o.max_bytes >= o.min_bytes, "ievo bench --comm: sizes must satisfy 0 < min <= max, got ",
             o.min_bytes, " and ", o.max_bytes);
  IEVO_CHECK(o.iters >= 1 && o.warmup >= 0, "ievo bench --comm: --comm-iters must be >= 1 and the warm-up >= 0");
  const int n = comm.size(), r = comm.rank();
  const int64_t es = dtype_size(o.dtype);
  CommBenchResult res;
  res.backend = comm.backend();
  res.ranks = n;
  res.dtype = dtype_name(o.dtype);
  res.device = device_name(device);
#ifdef IEVO_CUDA
  if (device == Device::CUDA) res.device = cuda::device_description();
#endif
  const double ar_factor = 2.0 * (n - 1) / n, rs_factor = (n - 1.0) / n;
  const double sum = n * (n + 1) / 2.0;
  for (int64_t bytes = o.min_bytes; bytes <= o.max_bytes; bytes *= 4) {
    // Elements per rank's share, so the full buffer (n shares) is `bytes` rounded down.
    const int64_t share = std::max<int64_t>(1, bytes / (es * n)), full = share * n;
    Tensor big = Tensor::empty({full}, o.dtype, device), part = Tensor::empty({share}, o.dtype, device);
    struct Op {
      const char* name;
      double factor;
    };
    for (const Op& op : {Op{"all_reduce", ar_factor}, Op{"reduce_scatter", rs_factor}, Op{"all_gather", rs_factor}}) {
      const std::string name = op.name;
      auto call = [&] {
        if (name == "all_reduce") comm.all_reduce(big);
        else if (name == "reduce_scatter") comm.reduce_scatter(big, part);
        else comm.all_gather(part, big);
      };
      // The checked call: inputs of (rank + 1).
      ops::fill(name == "all_gather" ? part : big, r + 1.0);
      call();
      if (name == "all_reduce") check_all(big, sum, op.name, full * es);
      else if (name == "reduce_scatter") check_all(part, sum, op.name, full * es);
      else
        for (int k = 0; k < n; ++k) check_all(big.slice(0, k * share, (k + 1) * share), k + 1.0, op.name, full * es, k * share);
      // All-reduce in place grows the values: refill with zeros so the timed calls stay finite.
      ops::fill(big, 0.0);
      ops::fill(part, 0.0);
      for (int i = 0; i < o.warmup; ++i) call();
      sync_device(device);
      comm.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < o.iters; ++i) call();
      sync_device(device);
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / o.iters;
      CommBenchRow row;
      row.op = name;
      row.bytes = full * es;
      row.time_s = max_over_ranks(t);
      row.algbw = static_cast<double>(row.bytes) / row.time_s;
      row.busbw = row.algbw * op.factor;
      res.rows.push_back(row);
    }
  }
  return res;
}

CommBenchResult run_comm_bench(const CommBenchOptions& o) {
  IEVO_CHECK(o.device == "cuda" || o.device == "cpu", "ievo bench --comm: --device must be cuda or cpu, got ", o.device);
  const Device device = o.device == "cuda" ? Device::CUDA : Device::CPU;
  Topology topo = Topology::from_world(1, 1);
  if (device == Device::CUDA) init_device(topo.local_rank());
  auto comm = make_communicator(device, mpi_active() ? topo.dp_comm() : MPI_COMM_NULL);
  return run_comm_bench(o, *comm, device);
}

nlohmann::json comm_bench_to_json(const CommBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& x : r.rows)
    rows.push_back({{"op", x.op}, {"bytes", x.bytes}, {"time_s", x.time_s}, {"algbw_gbs", x.algbw / 1e9},
                    {"busbw_gbs", x.busbw / 1e9}});
  return {{"backend", r.backend}, {"device", r.device}, {"dtype", r.dtype}, {"ranks", r.ranks}, {"results", rows}};
}

std::string format_comm_bench(const CommBenchResult& r) {
  std::string s;
  char buf[256];
  std::snprintf(buf, sizeof buf, "collectives: %s over %d ranks, %s, %s (sizes and bus bandwidth as nccl-tests)\n",
                r.backend.c_str(), r.ranks, r.dtype.c_str(), r.device.c_str());
  s += buf;
  std::snprintf(buf, sizeof buf, "  %-15s %12s %12s %12s %12s\n", "op", "bytes", "time (us)", "algbw GB/s",
                "busbw GB/s");
  s += buf;
  for (const auto& x : r.rows) {
    std::snprintf(buf, sizeof buf, "  %-15s %12lld %12.1f %12.2f %12.2f\n", x.op.c_str(),
                  static_cast<long long>(x.bytes), 1e6 * x.time_s, x.algbw / 1e9, x.busbw / 1e9);
    s += buf;
  }
  if (r.ranks == 1) s += "  (one rank: nothing crosses a link, the bus bandwidth is 0)\n";
  return s;
}

}  // namespace ievo
