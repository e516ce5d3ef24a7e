// Failure handling for multi-rank runs: no rank may hang when another one fails.
//
//   a rank throws      -> the CLI catches it, prints "rank R: error: ..." and calls
//                         abort_all_ranks(): MPI_Abort ends every rank of the job (non-zero);
//   a rank is killed   -> mpirun notices the lost process and kills the others (it names the
//                         rank: "process rank R ... exited on signal 9");
//   a rank hangs       -> the Watchdog of each rank (parallel.timeout_s) sees no progress for
//                         that long, prints which rank waited where, and exits the process with
//                         status 1; mpirun then ends the others. MPI has no per-collective
//                         timeout, so progress is measured between the trainer's kicks (every
//                         step, before and after checkpoints).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace ievo {

// Prints "ievo: rank R: error: <what>" and ends the whole job when MPI runs with more than one
// rank (MPI_Abort); otherwise only prints. Returns when there is nothing to abort.
void abort_all_ranks(const std::string& what);

class Watchdog {
 public:
  // timeout_s <= 0: disabled (no thread).
  Watchdog(double timeout_s, int rank);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  // Progress: restarts the clock; `where` names what comes next ("step 12", "checkpoint").
  void kick(const std::string& where);

 private:
  void run();
  double timeout_s_;
  int rank_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::string where_;
  int64_t kicks_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

// Test hook: with IEVO_TEST_FAIL_RANK=R (and IEVO_TEST_FAIL_STEP=S, default 2), rank R fails at
// the start of step S as IEVO_TEST_FAIL_MODE says: "throw" (default, an ievo::Error), "kill"
// (SIGKILL to itself) or "hang" (sleeps forever: the watchdog's case). No-op without the variable.
void test_failure_hook(int rank, int64_t step);

}  // namespace ievo
