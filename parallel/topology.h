// Where this process sits: the world of ranks split into data × pipeline × tensor groups.
//
// Rank layout (Megatron / InternEvo order, tensor innermost, then data, then pipeline):
//   world_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank,   world = pp * dp * tp
// so the ranks of one tensor-parallel group are neighbours (same node, NVLink) and a data-parallel
// group strides by tp. Each group gets its own MPI communicator (MPI_Comm_split); every parallel
// issue asks this object instead of computing ranks itself.
//
// Launch: under mpirun (OMPI_COMM_WORLD_*) or srun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)
// the process initialises MPI (MpiSession); started plainly it is a world of one and MPI is never
// touched (Topology::single()).
#pragma once
#include <string>

#include <mpi.h>

namespace ievo {

// What the launcher's environment says about this process.
struct LaunchEnv {
  int rank = 0, size = 1, local_rank = 0;
  std::string launcher = "none";  // "openmpi", "slurm", "pmi" or "none"
  bool launched() const { return launcher != "none"; }
};
LaunchEnv launch_env();

// MPI for the lifetime of the process: initialised when launched by mpirun/srun (or when `force`),
// finalised on destruction. One per process (the CLI's main, or an MPI test's main).
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv, bool force = false);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
};
// True between MPI_Init and MPI_Finalize.
bool mpi_active();
// The world rank and size (0 and 1 without MPI).
int world_rank();
int world_size();

class Topology {
 public:
  // The ranks of `world` (duplicated; e.g. MPI_COMM_WORLD, or a sub-communicator in tests) as
  // pp × dp × tp with dp = size / (tp * pp); an error names the keys when it does not divide.
  Topology(MPI_Comm world, int tensor, int pipeline);
  // The same with Ulysses sequence parallelism (parallel.sequence: ulysses, parallel.sequence_size
  // S): the dp ranks are dp / S data groups x S sequence ranks, sequence innermost
  //   dp_rank = data_rank * S + sp_rank
  // The S ranks of a sequence group (sp_comm) split every micro-batch's tokens; dp_comm() still
  // spans all dp ranks, the data x sequence group over which gradients are summed (ZeRO shards
  // over it). An error names parallel.sequence_size when S does not divide dp.
  Topology(MPI_Comm world, int tensor, int pipeline, int sequence);
  // A world of one process without MPI.
  static Topology single();
  // From MPI_COMM_WORLD when MPI is active, else single() (then tp, pp and S must be 1).
  static Topology from_world(int tensor, int pipeline, int sequence = 1);
  ~Topology();
  Topology(Topology&& o) noexcept;
  Topology& operator=(Topology&&) = delete;
  Topology(const Topology&) = delete;

  int world_rank() const { return rank_; }
  int world_size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int tp() const { return tp_; }
  int dp() const { return dp_; }
  int pp() const { return pp_; }
  int tp_rank() const { return rank_ % tp_; }
  int dp_rank() const { return rank_ / tp_ % dp_; }
  int pp_rank() const { return rank_ / (tp_ * dp_); }
  // Ulysses: sequence-parallel size and rank, and the data-parallel coordinates without it (the
  // samples a rank reads: data_size() groups, data_rank()). Without Ulysses sp() == 1.
  int sp() const { return sp_; }
  int sp_rank() const { return dp_rank() % sp_; }
  int data_size() const { return dp_ / sp_; }
  int data_rank() const { return dp_rank() / sp_; }
  // World rank of the given coordinates.
  int rank_of(int dp_rank, int pp_rank, int tp_rank) const {
    return pp_rank * dp_ * tp_ + dp_rank * tp_ + tp_rank;
  }
  // Group communicators; MPI_COMM_NULL for a process without MPI.
  MPI_Comm world_comm() const { return world_; }
  MPI_Comm dp_comm() const { return dp_comm_; }
  MPI_Comm tp_comm() const { return tp_comm_; }
  MPI_Comm pp_comm() const { return pp_comm_; }
  MPI_Comm sp_comm() const { return sp_comm_; }  // Ulysses group (MPI_COMM_NULL without MPI)
  // The model-parallel group: the tp x pp ranks of this rank's dp index, ordered by world rank
  // (its rank 0 holds tp 0 / pp 0; the checkpoint writer assembles global tensors over it).
  MPI_Comm mp_comm() const { return mp_comm_; }
  std::string describe() const;  // "world 8 = pp 1 x dp 4 x tp 2; rank 5 (dp 2, pp 0, tp 1)"

 private:
  Topology() = default;
  int rank_ = 0, size_ = 1, local_rank_ = 0, tp_ = 1, dp_ = 1, pp_ = 1, sp_ = 1;
  MPI_Comm world_ = MPI_COMM_NULL, dp_comm_ = MPI_COMM_NULL, tp_comm_ = MPI_COMM_NULL,
           pp_comm_ = MPI_COMM_NULL, sp_comm_ = MPI_COMM_NULL, mp_comm_ = MPI_COMM_NULL;
};

}  // namespace ievo
