// Collective communication on a group of ranks. Layer and optimiser code never call MPI or NCCL
// directly: they get a Communicator for their group (data, tensor or pipeline; parallel/topology.h)
// and use these operations on whole, contiguous tensors.
//
// Backends:
//   MpiCommunicator   host tensors, over an MPI_Comm (the CPU path and CI);
//   NcclCommunicator  device tensors (parallel/nccl_communicator.cpp, CUDA builds only);
//   LocalCommunicator a group of one process without MPI (`ievo train` without mpirun).
// Supported element types: f32, f64, bf16, f16, i32 (16-bit sums are computed in f32 and rounded).
// Every rank of the group must call the same operations in the same order with the same sizes.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include <mpi.h>

#include "runtime/tensor.h"

namespace ievo {

// An asynchronous collective in flight (Communicator::*_async). wait() makes the caller's current
// CUDA stream wait for it (the host does not block); host backends finish at issue, so their
// wait() does nothing. Destroying a work without waiting is allowed.
class CommWork {
 public:
  virtual ~CommWork() = default;
  virtual void wait() {}
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend() const = 0;  // "mpi", "nccl", "local"

  // t = sum over ranks of t (in place).
  virtual void all_reduce(Tensor& t) = 0;
  // in: [size * n]; out: [n] = sum over ranks of in[rank*n : (rank+1)*n]. out is either disjoint
  // from in, or exactly in's own slice in[rank*n : (rank+1)*n] (in place; the other slices of in
  // are undefined afterwards).
  virtual void reduce_scatter(const Tensor& in, Tensor& out) = 0;
  // in: [n]; out: [size * n] with rank r's in at out[r*n : (r+1)*n]. in is either disjoint from
  // out, or exactly out's own slice (in place).
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // t on every rank = t of `root`.
  virtual void broadcast(Tensor& t, int root) = 0;
  // in, out: [size * n], disjoint. Block j of `in` goes to rank j; block j of `out` comes from
  // rank j (out[j*n : (j+1)*n] = rank j's in[rank*n : (rank+1)*n]). Ulysses sequence parallelism
  // (parallel/tensor_parallel.h). The base class's version is an error naming the backend.
  virtual void all_to_all(const Tensor& in, Tensor& out);
  // Point to point (pipeline stages): matched by order between the two ranks.
  virtual void send(const Tensor& t, int peer) = 0;
  virtual void recv(Tensor& t, int peer) = 0;
  // Several point-to-point transfers at once (pipeline exchanges, parallel/pipeline.h): posts every
  // send and receive of `ops` together and returns when all are complete (MPI Isend/Irecv +
  // Waitall; NCCL ncclSend/ncclRecv in one group). Messages between two ranks match in order, as
  // send/recv do. The base class's version is an error naming the backend.
  struct P2POp {
    bool send = false;  // else receive into t
    Tensor t;           // contiguous; a receive's t has the message's size
    int peer = 0;
  };
  virtual void exchange(const std::vector<P2POp>& ops);
  virtual void barrier() = 0;

  // Asynchronous versions of all_reduce / reduce_scatter / all_gather, for overlapping
  // communication with compute (parallel/zero.h). The collective is ordered after the work queued
  // so far on the caller's stream, but the caller's stream does not wait for it: until the
  // returned work's wait() the caller must neither read the outputs nor write the inputs, nor free
  // either (the CUDA caching allocator would hand the memory to the caller's stream again). Works
  // of one communicator complete in issue order. The base class runs the synchronous call.
  virtual std::unique_ptr<CommWork> all_reduce_async(Tensor& t) {
    all_reduce(t);
    return std::make_unique<CommWork>();
  }
  virtual std::unique_ptr<CommWork> reduce_scatter_async(const Tensor& in, Tensor& out) {
    reduce_scatter(in, out);
    return std::make_unique<CommWork>();
  }
  virtual std::unique_ptr<CommWork> all_gather_async(const Tensor& in, Tensor& out) {
    all_gather(in, out);
    return std::make_unique<CommWork>();
  }

  // Host scalars: the sum over ranks (loss sums, token counts, squared norms).
  virtual double all_reduce_sum(double x) = 0;
  virtual int64_t all_reduce_sum(int64_t x) = 0;
};

// Host tensors over `comm` (not owned; it must outlive the communicator).
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm);
// A group of one: collectives are copies or no-ops; send/recv are errors.
std::unique_ptr<Communicator> make_local_communicator();
// The backend for tensors on `device` over `comm`: MPI_COMM_NULL gives a LocalCommunicator, CPU an
// MpiCommunicator, CUDA an NcclCommunicator (an error in builds without CUDA).
std::unique_ptr<Communicator> make_communicator(Device device, MPI_Comm comm);

#ifdef IEVO_CUDA
// NCCL over the ranks of `comm`: the ncclUniqueId is made by rank 0 and broadcast over MPI; the
// current CUDA device (one GPU per rank, chosen from the local rank) is used.
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm);
#endif

}  // namespace ievo
