#include "parallel/topology.h"

#include <cstdlib>
#include <utility>

#include "runtime/error.h"

namespace ievo {
namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int env_int(const char* name, int fallback) {
  const char* v = env(name);
  if (!v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  IEVO_CHECK(end && *end == '\0' && x >= 0, "environment variable ", name, "='", v,
             "' is not a non-negative integer");
  return static_cast<int>(x);
}

bool g_owns_mpi = false;

void free_comm(MPI_Comm& c) {
  if (c != MPI_COMM_NULL && mpi_active()) MPI_Comm_free(&c);
  c = MPI_COMM_NULL;
}

}  // namespace

LaunchEnv launch_env() {
  LaunchEnv e;
  if (env("OMPI_COMM_WORLD_SIZE")) {  // Open MPI's mpirun
    e.launcher = "openmpi";
    e.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    e.size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    e.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
  } else if (env("SLURM_STEP_ID") && env("SLURM_PROCID") && env("SLURM_NTASKS")) {  // srun
    e.launcher = "slurm";
    e.rank = env_int("SLURM_PROCID", 0);
    e.size = env_int("SLURM_NTASKS", 1);
    e.local_rank = env_int("SLURM_LOCALID", 0);
  } else if (env("PMI_RANK") && env("PMI_SIZE")) {  // MPICH's hydra
    e.launcher = "pmi";
    e.rank = env_int("PMI_RANK", 0);
    e.size = env_int("PMI_SIZE", 1);
    e.local_rank = env_int("MPI_LOCALRANKID", 0);
  }
  IEVO_CHECK(e.rank < e.size, "launcher ", e.launcher, " says rank ", e.rank, " of ", e.size);
  return e;
}

MpiSession::MpiSession(int* argc, char*** argv, bool force) {
  if (mpi_active() || !(force || launch_env().launched())) return;
  int provided = 0;
  // FUNNELED: only the main thread calls MPI (OpenMP workers and the watchdog never do).
  MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  g_owns_mpi = true;
}

MpiSession::~MpiSession() {
  if (g_owns_mpi && mpi_active()) MPI_Finalize();
  g_owns_mpi = false;
}

bool mpi_active() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

int world_rank() {
  int r = 0;
  if (mpi_active()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int world_size() {
  int s = 1;
  if (mpi_active()) MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

Topology::Topology(MPI_Comm world, int tensor, int pipeline) {
  IEVO_CHECK(mpi_active(), "Topology: MPI is not initialised");
  IEVO_CHECK(tensor >= 1, "parallel.tensor must be >= 1, got ", tensor);
  IEVO_CHECK(pipeline >= 1, "parallel.pipeline must be >= 1, got ", pipeline);
  MPI_Comm_dup(world, &world_);
  MPI_Comm_rank(world_, &rank_);
  MPI_Comm_size(world_, &size_);
  if (size_ % (tensor * pipeline) != 0) {
    free_comm(world_);
    IEVO_FAIL("the world of ", size_, " ranks is not divisible by parallel.tensor x parallel.pipeline (",
              tensor, " x ", pipeline, "): data-parallel size = world / (tensor x pipeline)");
  }
  tp_ = tensor;
  pp_ = pipeline;
  dp_ = size_ / (tp_ * pp_);
  // Groups: ranks that share every coordinate but one. Keys keep the group's ranks in order.
  MPI_Comm_split(world_, pp_rank() * tp_ + tp_rank(), dp_rank(), &dp_comm_);
  MPI_Comm_split(world_, pp_rank() * dp_ + dp_rank(), tp_rank(), &tp_comm_);
  MPI_Comm_split(world_, dp_rank() * tp_ + tp_rank(), pp_rank(), &pp_comm_);
  MPI_Comm_split(world_, dp_rank(), rank_, &mp_comm_);
  // The local rank (GPU choice) is a property of the process, not of this communicator.
  const LaunchEnv e = launch_env();
  if (e.launched()) {
    local_rank_ = e.local_rank;
  } else {
    MPI_Comm node;
    MPI_Comm_split_type(world_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank_);
    MPI_Comm_free(&node);
  }
}

Topology::Topology(MPI_Comm world, int tensor, int pipeline, int sequence)
    : Topology(world, tensor, pipeline) {
  IEVO_CHECK(sequence >= 1, "parallel.sequence_size must be >= 1, got ", sequence);
  // (Thrown after the delegated constructor completed: the destructor frees its communicators.)
  IEVO_CHECK(dp_ % sequence == 0, "parallel.sequence_size = ", sequence,
             " does not divide the data-parallel size ", dp_, " (world ", size_, " / (tensor ",
             tensor, " x pipeline ", pipeline,
             ")): Ulysses splits each data-parallel group's tokens over sequence_size ranks");
  sp_ = sequence;
  // Ranks sharing pp, tp and data_rank: consecutive dp ranks.
  MPI_Comm_split(world_, (pp_rank() * data_size() + data_rank()) * tp_ + tp_rank(), sp_rank(),
                 &sp_comm_);
}

Topology Topology::single() { return Topology(); }

Topology Topology::from_world(int tensor, int pipeline, int sequence) {
  IEVO_CHECK(tensor >= 1 && pipeline >= 1 && sequence >= 1,
             "parallel.tensor, parallel.pipeline and parallel.sequence_size must be >= 1");
  if (!mpi_active()) {
    IEVO_CHECK(tensor * pipeline * sequence == 1, "parallel.tensor (", tensor, ") x parallel.pipeline (",
               pipeline, ") x parallel.sequence_size (", sequence, ") needs that many ranks: run under "
               "mpirun -np N (or srun)");
    return single();
  }
  return Topology(MPI_COMM_WORLD, tensor, pipeline, sequence);
}

Topology::~Topology() {
  free_comm(dp_comm_);
  free_comm(tp_comm_);
  free_comm(pp_comm_);
  free_comm(sp_comm_);
  free_comm(mp_comm_);
  free_comm(world_);
}

Topology::Topology(Topology&& o) noexcept
    : rank_(o.rank_), size_(o.size_), local_rank_(o.local_rank_), tp_(o.tp_), dp_(o.dp_),
      pp_(o.pp_), sp_(o.sp_), world_(std::exchange(o.world_, MPI_COMM_NULL)),
      dp_comm_(std::exchange(o.dp_comm_, MPI_COMM_NULL)),
      tp_comm_(std::exchange(o.tp_comm_, MPI_COMM_NULL)),
      pp_comm_(std::exchange(o.pp_comm_, MPI_COMM_NULL)),
      sp_comm_(std::exchange(o.sp_comm_, MPI_COMM_NULL)),
      mp_comm_(std::exchange(o.mp_comm_, MPI_COMM_NULL)) {}

std::string Topology::describe() const {
  return detail::cat("world ", size_, " = pp ", pp_, " x dp ", dp_, " x tp ", tp_, "; rank ", rank_,
                     " (dp ", dp_rank(), ", pp ", pp_rank(), ", tp ", tp_rank(), ")",
                     sp_ > 1 ? detail::cat("; Ulysses: dp = data ", data_size(), " x sequence ", sp_,
                                           ", sequence rank ", sp_rank())
                             : std::string());
}

}  // namespace ievo
