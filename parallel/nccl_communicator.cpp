// The NCCL backend (CUDA builds only): device tensors, one GPU per rank.
//
// Bootstrap: rank 0 of the MPI group calls ncclGetUniqueId and broadcasts the id over MPI; every
// rank then joins with ncclCommInitRank on its current CUDA device (cuda::init picks it from the
// local rank). Collectives run on the communicator's own stream: each call first makes that
// stream wait for the work already queued on the compute stream (an event), and makes the compute
// stream wait for the collective afterwards, so callers see stream-ordered, synchronous semantics
// while the host never blocks. The *_async collectives skip that last wait: they record a pooled
// event on the communication stream instead, and CommWork::wait() makes the caller's stream wait
// for it (ZeRO overlaps bucket reductions and next-layer gathers with compute this way).
// Host scalars are reduced over MPI.
#include <nccl.h>

#include <memory>
#include <vector>

#include "parallel/communicator.h"
#include "runtime/cuda/cuda.h"
#include "runtime/cuda/check.h"

#define IEVO_NCCL_CHECK(call)                                                                   \
  do {                                                                                          \
    ncclResult_t ievo_r_ = (call);                                                              \
    if (ievo_r_ != ncclSuccess)                                                                 \
      IEVO_FAIL("NCCL error in ", #call, ": ", ncclGetErrorString(ievo_r_), " [", __FILE__, ":", \
                __LINE__, "]");                                                                 \
  } while (0)

namespace ievo {
namespace {

ncclDataType_t nccl_type(const Tensor& t, const char* op) {
  IEVO_CHECK(t.device() == Device::CUDA, "NcclCommunicator::", op, ": tensor ", t.describe(),
             " is not on the GPU");
  IEVO_CHECK(t.is_contiguous(), "NcclCommunicator::", op, ": tensor ", t.describe(),
             " is not contiguous");
  switch (t.dtype()) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    case DType::F16: return ncclFloat16;
    case DType::I32: return ncclInt32;
    default: IEVO_FAIL("NcclCommunicator::", op, ": unsupported dtype ", dtype_name(t.dtype()));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(MPI_Comm comm) : mpi_(comm) {
    MPI_Comm_rank(mpi_, &rank_);
    MPI_Comm_size(mpi_, &size_);
    ncclUniqueId id;
    if (rank_ == 0) IEVO_NCCL_CHECK(ncclGetUniqueId(&id));
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, mpi_);
    IEVO_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
  }
  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }

  void all_reduce(Tensor& t) override {
    Ordered o(*this);
    issue_all_reduce(t);
  }
  void reduce_scatter(const Tensor& in, Tensor& out) override {
    Ordered o(*this);
    issue_reduce_scatter(in, out);
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    Ordered o(*this);
    issue_all_gather(in, out);
  }

  std::unique_ptr<CommWork> all_reduce_async(Tensor& t) override {
    Async a(*this);
    issue_all_reduce(t);
    return a.work();
  }
  std::unique_ptr<CommWork> reduce_scatter_async(const Tensor& in, Tensor& out) override {
    Async a(*this);
    issue_reduce_scatter(in, out);
    return a.work();
  }
  std::unique_ptr<CommWork> all_gather_async(const Tensor& in, Tensor& out) override {
    Async a(*this);
    issue_all_gather(in, out);
    return a.work();
  }

  // Grouped point-to-point: one send and one receive per peer (NCCL has no all-to-all call).
  void all_to_all(const Tensor& in, Tensor& out) override {
    ncclDataType_t ty = nccl_type(in, "all_to_all");
    nccl_type(out, "all_to_all");
    IEVO_CHECK(in.dtype() == out.dtype() && in.numel() == out.numel() && in.numel() % size_ == 0,
               "NcclCommunicator::all_to_all: ", in.describe(), " and ", out.describe(),
               " must both hold ", size_, " equal blocks");
    IEVO_CHECK(in.raw() != out.raw() || in.numel() == 0, "NcclCommunicator::all_to_all: in and out alias");
    const size_t n = static_cast<size_t>(in.numel() / size_), bytes = n * dtype_size(in.dtype());
    const char* src = static_cast<const char*>(in.raw());
    char* dst = static_cast<char*>(out.raw());
    Ordered o(*this);
    IEVO_NCCL_CHECK(ncclGroupStart());
    for (int peer = 0; peer < size_; ++peer) {
      IEVO_NCCL_CHECK(ncclSend(src + peer * bytes, n, ty, peer, comm_, stream_.get()));
      IEVO_NCCL_CHECK(ncclRecv(dst + peer * bytes, n, ty, peer, comm_, stream_.get()));
    }
    IEVO_NCCL_CHECK(ncclGroupEnd());
  }

  void broadcast(Tensor& t, int root) override {
    ncclDataType_t ty = nccl_type(t, "broadcast");
    Ordered o(*this);
    IEVO_NCCL_CHECK(ncclBroadcast(t.raw(), t.raw(), t.numel(), ty, root, comm_, stream_.get()));
  }

  void send(const Tensor& t, int peer) override {
    ncclDataType_t ty = nccl_type(t, "send");
    Ordered o(*this);
    IEVO_NCCL_CHECK(ncclSend(t.raw(), t.numel(), ty, peer, comm_, stream_.get()));
  }

  void recv(Tensor& t, int peer) override {
    ncclDataType_t ty = nccl_type(t, "recv");
    Ordered o(*this);
    IEVO_NCCL_CHECK(ncclRecv(t.raw(), t.numel(), ty, peer, comm_, stream_.get()));
  }

  // One group: every send and receive progresses together (no deadlock between two ranks that
  // send to each other), stream-ordered like the collectives.
  void exchange(const std::vector<P2POp>& ops) override {
    if (ops.empty()) return;
    std::vector<ncclDataType_t> types;
    for (const P2POp& op : ops) types.push_back(nccl_type(op.t, "exchange"));
    Ordered o(*this);
    IEVO_NCCL_CHECK(ncclGroupStart());
    for (size_t i = 0; i < ops.size(); ++i) {
      const P2POp& op = ops[i];
      if (op.send)
        IEVO_NCCL_CHECK(ncclSend(op.t.raw(), op.t.numel(), types[i], op.peer, comm_, stream_.get()));
      else
        IEVO_NCCL_CHECK(ncclRecv(op.t.raw(), op.t.numel(), types[i], op.peer, comm_, stream_.get()));
    }
    IEVO_NCCL_CHECK(ncclGroupEnd());
  }

  void barrier() override {
    IEVO_CUDA_CHECK(cudaStreamSynchronize(cuda::current_stream()));
    MPI_Barrier(mpi_);
  }

  double all_reduce_sum(double x) override {
    MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_SUM, mpi_);
    return x;
  }
  int64_t all_reduce_sum(int64_t x) override {
    MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_INT64_T, MPI_SUM, mpi_);
    return x;
  }

 private:
  void issue_all_reduce(Tensor& t) {
    ncclDataType_t ty = nccl_type(t, "all_reduce");
    IEVO_NCCL_CHECK(ncclAllReduce(t.raw(), t.raw(), t.numel(), ty, ncclSum, comm_, stream_.get()));
  }
  void issue_reduce_scatter(const Tensor& in, Tensor& out) {
    ncclDataType_t ty = nccl_type(in, "reduce_scatter");
    nccl_type(out, "reduce_scatter");
    IEVO_CHECK(in.dtype() == out.dtype() && in.numel() == out.numel() * size_,
               "NcclCommunicator::reduce_scatter: ", in.describe(), " must hold ", size_, " x ",
               out.describe());
    IEVO_NCCL_CHECK(ncclReduceScatter(in.raw(), out.raw(), out.numel(), ty, ncclSum, comm_,
                                      stream_.get()));
  }
  void issue_all_gather(const Tensor& in, Tensor& out) {
    ncclDataType_t ty = nccl_type(in, "all_gather");
    nccl_type(out, "all_gather");
    IEVO_CHECK(in.dtype() == out.dtype() && out.numel() == in.numel() * size_,
               "NcclCommunicator::all_gather: ", out.describe(), " must hold ", size_, " x ",
               in.describe());
    IEVO_NCCL_CHECK(ncclAllGather(in.raw(), out.raw(), in.numel(), ty, comm_, stream_.get()));
  }

  // An async collective's completion: an event from the communicator's pool, recorded on the
  // communication stream; returned to the pool when the work is destroyed (an event may be
  // recorded again once every wait on it has been issued: cudaStreamWaitEvent uses the state at
  // the time of the call).
  class Work final : public CommWork {
   public:
    Work(NcclCommunicator& c, std::unique_ptr<cuda::Event> e) : c_(c), e_(std::move(e)) {}
    ~Work() override { c_.free_events_.push_back(std::move(e_)); }
    void wait() override { e_->wait(cuda::current_stream()); }

   private:
    NcclCommunicator& c_;
    std::unique_ptr<cuda::Event> e_;
  };

  // Orders an async collective after the caller's queued work; work() records its completion.
  struct Async {
    explicit Async(NcclCommunicator& c) : c_(c) {
      c_.ready_.record(cuda::current_stream());
      c_.ready_.wait(c_.stream_.get());
    }
    std::unique_ptr<CommWork> work() {
      std::unique_ptr<cuda::Event> e;
      if (c_.free_events_.empty()) {
        e = std::make_unique<cuda::Event>();
      } else {
        e = std::move(c_.free_events_.back());
        c_.free_events_.pop_back();
      }
      e->record(c_.stream_.get());
      return std::make_unique<Work>(c_, std::move(e));
    }
    NcclCommunicator& c_;
  };

  // Orders one collective between the caller's stream and the communication stream.
  struct Ordered {
    explicit Ordered(NcclCommunicator& c) : c_(c), caller_(cuda::current_stream()) {
      c_.ready_.record(caller_);
      c_.ready_.wait(c_.stream_.get());
    }
    ~Ordered() {
      c_.done_.record(c_.stream_.get());
      c_.done_.wait(caller_);
    }
    NcclCommunicator& c_;
    cudaStream_t caller_;
  };

  MPI_Comm mpi_;
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  cuda::Stream stream_;
  cuda::Event ready_, done_;
  std::vector<std::unique_ptr<cuda::Event>> free_events_;  // for async works (Work)
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm) {
  return std::make_unique<NcclCommunicator>(comm);
}

}  // namespace ievo
