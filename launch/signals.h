// Stop requests: SIGTERM, SIGINT and SIGUSR1 (Slurm's pre-emption warning with
// `#SBATCH --signal=USR1@90`, or `scancel --signal=USR1`) only set a flag; the trainer checks it
// at the end of every step, saves a checkpoint of that step and returns normally. Each handler is
// one-shot (SA_RESETHAND): a second signal of the same kind acts as if ievo had not handled it
// (a second Ctrl-C aborts at once, without saving).
//
// Exit status of `ievo train` after such a stop: 0 for SIGTERM and SIGUSR1 (a pre-empted job that
// saved cleanly: requeue it and it resumes exactly), 130 (128 + 2, the shell convention) for SIGINT.
#pragma once

namespace ievo {

void install_stop_handlers();  // idempotent
int stop_signal();             // the first signal received, 0 if none
const char* signal_name(int sig);  // "SIGTERM", ...
// The exit status for a run that stopped on stop_signal() (0 when none was received).
int stop_exit_code();

}  // namespace ievo
