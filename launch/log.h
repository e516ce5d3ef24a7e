// The run's text log, one file per rank: RUN_DIR/logs/rank_<r>.log. Every line gets a UTC
// timestamp in the file; rank 0 also prints each line (without the timestamp) to stderr, the
// other ranks only to their file, so `mpirun -np 64` keeps one readable console. Before
// open_rank_log() (and after close_rank_log()) lines go to stderr only. Thread-safe.
#pragma once
#include <string>

namespace ievo {

// RUN_DIR/logs/rank_<rank>.log
std::string rank_log_path(const std::string& run_dir, int rank);
// Opens (appends to) the rank's log, creating RUN_DIR/logs; replaces a log opened before.
void open_rank_log(const std::string& run_dir, int rank);
void close_rank_log();

// printf-style line; a trailing newline is added when missing.
void log_info(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// The same into the rank's log file only (e.g. the fatal error the CLI prints itself); nothing
// when no log is open.
void log_file_only(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace ievo
