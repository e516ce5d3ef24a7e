#include "parallel/failure.h"

#include <mpi.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "parallel/topology.h"
#include "runtime/error.h"

namespace ievo {

void abort_all_ranks(const std::string& what) {
  const int rank = world_rank(), size = world_size();
  if (size > 1) {
    std::fprintf(stderr, "ievo: rank %d of %d: error: %s\nievo: rank %d: aborting all ranks\n", rank,
                 size, what.c_str(), rank);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  std::fprintf(stderr, "ievo: error: %s\n", what.c_str());
}

Watchdog::Watchdog(double timeout_s, int rank) : timeout_s_(timeout_s), rank_(rank) {
  where_ = "start-up";
  if (timeout_s_ > 0) thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::kick(const std::string& where) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    where_ = where;
    ++kicks_;
  }
  cv_.notify_all();
}

void Watchdog::run() {
  std::unique_lock<std::mutex> lock(mu_);
  const auto timeout = std::chrono::duration<double>(timeout_s_);
  while (!stop_) {
    const int64_t seen = kicks_;
    if (cv_.wait_for(lock, timeout, [&] { return stop_ || kicks_ != seen; })) continue;
    // No kick for timeout_s: this rank (or one it waits for in a collective) is stuck. Exiting
    // makes mpirun end the job; MPI calls from this thread are not allowed (MPI_THREAD_FUNNELED).
    std::fprintf(stderr,
                 "ievo: rank %d: no progress for %.0f s (parallel.timeout_s) in %s: this rank or one "
                 "it waits for is stuck; exiting so that the job ends\n",
                 rank_, timeout_s_, where_.c_str());
    std::fflush(stderr);
    std::_Exit(1);
  }
}

void test_failure_hook(int rank, int64_t step) {
  const char* r = std::getenv("IEVO_TEST_FAIL_RANK");
  if (!r || std::atoi(r) != rank) return;
  const char* s = std::getenv("IEVO_TEST_FAIL_STEP");
  if (step != (s ? std::atoll(s) : 2)) return;
  const char* m = std::getenv("IEVO_TEST_FAIL_MODE");
  const std::string mode = m ? m : "throw";
  if (mode == "kill") {
    std::raise(SIGKILL);
  } else if (mode == "hang") {
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  IEVO_FAIL("IEVO_TEST_FAIL_RANK: rank ", rank, " fails at step ", step, " (test hook)");
}

}  // namespace ievo
