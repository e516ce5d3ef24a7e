// The MPI backend (host tensors) and the one-process LocalCommunicator.
#include "parallel/communicator.h"

#include <algorithm>
#include <climits>
#include <cstring>

namespace ievo {
namespace {

// bf16 and f16 have no MPI type: they travel as MPI_UINT16_T with these user-defined sums (in
// f32, rounded to nearest even, as a 16-bit add on the GPU would).
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

void f16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = f32_to_f16(f16_to_f32(a[i]) + f16_to_f32(b[i]));
}

MPI_Op bf16_sum_op() {
  static MPI_Op op = [] {
    MPI_Op o;
    MPI_Op_create(&bf16_sum, /*commute=*/1, &o);
    return o;
  }();
  return op;
}

MPI_Op f16_sum_op() {
  static MPI_Op op = [] {
    MPI_Op o;
    MPI_Op_create(&f16_sum, /*commute=*/1, &o);
    return o;
  }();
  return op;
}

struct MpiType {
  MPI_Datatype type;
  MPI_Op sum;
};

MpiType mpi_type(const Tensor& t, const char* op) {
  IEVO_CHECK(t.is_cpu(), "MpiCommunicator::", op, ": tensor ", t.describe(),
             " is not on the host (device tensors need the NCCL backend)");
  IEVO_CHECK(t.is_contiguous(), "MpiCommunicator::", op, ": tensor ", t.describe(),
             " is not contiguous");
  switch (t.dtype()) {
    case DType::F32: return {MPI_FLOAT, MPI_SUM};
    case DType::F64: return {MPI_DOUBLE, MPI_SUM};
    case DType::I32: return {MPI_INT32_T, MPI_SUM};
    case DType::BF16: return {MPI_UINT16_T, bf16_sum_op()};
    case DType::F16: return {MPI_UINT16_T, f16_sum_op()};
    default: IEVO_FAIL("MpiCommunicator::", op, ": unsupported dtype ", dtype_name(t.dtype()));
  }
}

// MPI counts are int: element ranges larger than this are sent in pieces where the operation
// allows it (all-reduce, broadcast, send/recv).
constexpr int64_t kMaxChunk = int64_t{1} << 30;

int checked_count(int64_t n, const char* op) {
  IEVO_CHECK(n <= INT_MAX, "MpiCommunicator::", op, ": ", n,
             " elements per rank exceed MPI's int count; use smaller buckets (parallel.bucket_mb)");
  return static_cast<int>(n);
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }

  void all_reduce(Tensor& t) override {
    MpiType mt = mpi_type(t, "all_reduce");
    char* p = static_cast<char*>(t.raw());
    const size_t es = dtype_size(t.dtype());
    for (int64_t i = 0; i < t.numel(); i += kMaxChunk) {
      int n = static_cast<int>(std::min(kMaxChunk, t.numel() - i));
      MPI_Allreduce(MPI_IN_PLACE, p + i * es, n, mt.type, mt.sum, comm_);
    }
  }

  void reduce_scatter(const Tensor& in, Tensor& out) override {
    MpiType mt = mpi_type(in, "reduce_scatter");
    mpi_type(out, "reduce_scatter");
    check_pair(in, out, "reduce_scatter");  // in is the big side
    const int n = checked_count(out.numel(), "reduce_scatter");
    const size_t bytes = out.nbytes();
    char* own = static_cast<char*>(in.raw()) + static_cast<size_t>(rank_) * bytes;
    if (own == out.raw()) {  // in place: MPI leaves the result at the start of the buffer
      MPI_Reduce_scatter_block(MPI_IN_PLACE, in.raw(), n, mt.type, mt.sum, comm_);
      if (rank_ != 0) std::memmove(own, in.raw(), bytes);
    } else {
      MPI_Reduce_scatter_block(in.raw(), out.raw(), n, mt.type, mt.sum, comm_);
    }
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    MpiType mt = mpi_type(in, "all_gather");
    mpi_type(out, "all_gather");
    check_pair(out, in, "all_gather");
    const int n = checked_count(in.numel(), "all_gather");
    const char* own = static_cast<const char*>(out.raw()) + static_cast<size_t>(rank_) * in.nbytes();
    MPI_Allgather(own == in.raw() ? MPI_IN_PLACE : in.raw(), n, mt.type, out.raw(), n, mt.type, comm_);
  }

  void all_to_all(const Tensor& in, Tensor& out) override {
    MpiType mt = mpi_type(in, "all_to_all");
    mpi_type(out, "all_to_all");
    IEVO_CHECK(in.dtype() == out.dtype() && in.numel() == out.numel() && in.numel() % size_ == 0,
               "MpiCommunicator::all_to_all: ", in.describe(), " and ", out.describe(),
               " must both hold ", size_, " equal blocks");
    IEVO_CHECK(in.raw() != out.raw() || in.numel() == 0, "MpiCommunicator::all_to_all: in and out alias");
    const int n = checked_count(in.numel() / size_, "all_to_all");
    MPI_Alltoall(in.raw(), n, mt.type, out.raw(), n, mt.type, comm_);
  }

  void broadcast(Tensor& t, int root) override {
    MpiType mt = mpi_type(t, "broadcast");
    for_chunks(t, [&](void* p, int n) { MPI_Bcast(p, n, mt.type, root, comm_); });
  }

  void send(const Tensor& t, int peer) override {
    MpiType mt = mpi_type(t, "send");
    for_chunks(t, [&](void* p, int n) { MPI_Send(p, n, mt.type, peer, 0, comm_); });
  }

  void recv(Tensor& t, int peer) override {
    MpiType mt = mpi_type(t, "recv");
    for_chunks(t, [&](void* p, int n) { MPI_Recv(p, n, mt.type, peer, 0, comm_, MPI_STATUS_IGNORE); });
  }

  void exchange(const std::vector<P2POp>& ops) override {
    std::vector<MPI_Request> reqs;
    for (const P2POp& op : ops) {
      MpiType mt = mpi_type(op.t, "exchange");
      for_chunks(op.t, [&](void* p, int n) {
        reqs.emplace_back();
        if (op.send)
          MPI_Isend(p, n, mt.type, op.peer, 0, comm_, &reqs.back());
        else
          MPI_Irecv(p, n, mt.type, op.peer, 0, comm_, &reqs.back());
      });
    }
    MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE);
  }

  void barrier() override { MPI_Barrier(comm_); }

  double all_reduce_sum(double x) override {
    MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_SUM, comm_);
    return x;
  }
  int64_t all_reduce_sum(int64_t x) override {
    MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_INT64_T, MPI_SUM, comm_);
    return x;
  }

 private:
  // reduce_scatter / all_gather: the big side is size() times the small one, same dtype.
  void check_pair(const Tensor& big, const Tensor& small, const char* op) const {
    IEVO_CHECK(big.dtype() == small.dtype(), "MpiCommunicator::", op, ": dtypes differ (",
               big.describe(), ", ", small.describe(), ")");
    IEVO_CHECK(big.numel() == small.numel() * size_, "MpiCommunicator::", op, ": ", big.describe(),
               " must hold ", size_, " x ", small.describe());
  }

  template <class F>
  void for_chunks(const Tensor& t, F&& f) {
    char* p = static_cast<char*>(t.raw());
    const size_t es = dtype_size(t.dtype());
    for (int64_t i = 0; i < t.numel(); i += kMaxChunk)
      f(p + i * es, static_cast<int>(std::min(kMaxChunk, t.numel() - i)));
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* backend() const override { return "local"; }
  void all_reduce(Tensor&) override {}
  void reduce_scatter(const Tensor& in, Tensor& out) override {
    if (in.raw() != out.raw()) out.copy_from(in.view(out.shape()));
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    if (in.raw() != out.raw()) out.copy_from(in.view(out.shape()));
  }
  void all_to_all(const Tensor& in, Tensor& out) override {
    if (in.raw() != out.raw()) out.copy_from(in.view(out.shape()));
  }
  void broadcast(Tensor&, int root) override {
    IEVO_CHECK(root == 0, "broadcast from rank ", root, " in a group of one");
  }
  void send(const Tensor&, int peer) override { IEVO_FAIL("send to rank ", peer, " in a group of one"); }
  void recv(Tensor&, int peer) override { IEVO_FAIL("recv from rank ", peer, " in a group of one"); }
  void exchange(const std::vector<P2POp>& ops) override {
    IEVO_CHECK(ops.empty(), "exchange with rank ", ops.empty() ? 0 : ops[0].peer, " in a group of one");
  }
  void barrier() override {}
  double all_reduce_sum(double x) override { return x; }
  int64_t all_reduce_sum(int64_t x) override { return x; }
};

}  // namespace

void Communicator::all_to_all(const Tensor& in, Tensor&) {
  IEVO_FAIL("Communicator::all_to_all (", in.describe(), "): not supported by the '", backend(),
            "' backend (a wrapper that does not forward it?)");
}

void Communicator::exchange(const std::vector<P2POp>& ops) {
  IEVO_CHECK(ops.empty(), "Communicator::exchange: not supported by the '", backend(),
             "' backend (a wrapper that does not forward it?)");
}

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm) {
  return std::make_unique<MpiCommunicator>(comm);
}

std::unique_ptr<Communicator> make_local_communicator() {
  return std::make_unique<LocalCommunicator>();
}

std::unique_ptr<Communicator> make_communicator(Device device, MPI_Comm comm) {
  if (comm == MPI_COMM_NULL) return make_local_communicator();
  if (device == Device::CPU) return make_mpi_communicator(comm);
#ifdef IEVO_CUDA
  return make_nccl_communicator(comm);
#else
  IEVO_FAIL("a communicator for CUDA tensors needs a build with CUDA and NCCL");
#endif
}

}  // namespace ievo
