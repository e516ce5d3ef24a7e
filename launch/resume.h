// Where a training run starts (checkpoint.resume) and the run directory's housekeeping around
// checkpoints (checkpoint.keep_last, checkpoint.overwrite, metrics.jsonl after a resume).
//
//   auto (default)  continue from the newest checkpoint of RUN_DIR/checkpoints that loads: first
//                   the one `latest` names, then the older step_<N> directories, newest first.
//                   Each candidate is loaded completely (every checksum verified); one that is
//                   corrupt or incomplete is reported on stderr and skipped in favour of the
//                   previous one. step_<N> directories newer than the one `latest` names are not
//                   candidates (they belong to a timeline abandoned by an earlier resume from an
//                   older checkpoint, or their save did not finish updating `latest`). No
//                   checkpoint at all: a fresh start. Checkpoints that all fail: an error.
//   none            start fresh. Refused when RUN_DIR already has checkpoints, unless
//                   checkpoint.overwrite: true, which deletes them (and metrics.jsonl) first.
//   PATH            that checkpoint directory (RUN_DIR/checkpoints/step_N of this or another
//                   run); any problem is an error naming the file.
//
// After the choice, RUN_DIR/metrics.jsonl keeps only the lines of steps up to the resumed one
// (and loses a line torn by a crash), so that the resumed run appends exactly one line per step;
// leftover step_<N>.tmp directories of interrupted saves are removed. Only rank 0 touches files;
// every rank loads.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "launch/checkpoint.h"
#include "launch/config.h"

namespace ievo {

// Loads a checkpoint directory into the trainer's state (every tensor it needs); throws on any
// problem (the checksums are checked by CheckpointReader / load_checkpoint).
using CheckpointLoader = std::function<CheckpointState(const std::string& ckpt_dir)>;

// Applies checkpoint.resume; returns the state of the checkpoint loaded, or nullopt for a fresh
// start. Logs what it chose and warns about config keys that differ from the checkpoint's.
std::optional<CheckpointState> resume_training(const Config& cfg, int rank,
                                               const CheckpointLoader& load);

// Keeps the lines of RUN_DIR/metrics.jsonl whose "step" is <= step (drops unparsable lines);
// rewritten atomically. No file: nothing to do.
void truncate_metrics(const std::string& run_dir, int64_t step);

// checkpoint.keep_last after step `newest` was saved completely: of the step_<N> directories
// with N <= newest, all but the keep_last highest are deleted (renamed out of the way first, so
// a crash mid-delete never leaves a half-deleted step_<N>). keep_last <= 0: keep all. Directories
// with N > newest are left alone. Returns the steps deleted.
std::vector<int64_t> prune_checkpoints(const std::string& run_dir, int64_t newest, int64_t keep_last);

// The top-level config keys ("data.seq_len", ...) whose values differ between two resolved
// configs (config_to_yaml text), ignoring keys that may change on a resume (checkpoint.*,
// train.steps, train.log_every, train.max_time, run.dir, metrics.*, debug.*, parallel.*: the
// layout may change).
std::vector<std::string> changed_config_keys(const std::string& old_yaml, const std::string& new_yaml);

}  // namespace ievo
