// `ievo train CONFIG --dry-run`: everything a run checks before its first step, without training
// and without touching a GPU:
//   * the config (already loaded and validated by load_config: errors name the key);
//   * the device: run.device: cuda in a build without CUDA, or with no GPU visible, is noted (the
//     config is still validated; the real run would fail at start);
//   * model.init_from_hf: the safetensors index opens and every parameter is there with its shape;
//   * the data: every dataset of data.paths (and data.valid_paths) opens and validates (.idx/.bin),
//     and the first, middle and last samples a run of train.steps reads are decoded, which checks
//     their tokens against model.vocab_size (errors name the key and the file);
//   * the layout: world size from mpirun/srun (1 when started plainly) as pp x dp x tp, and each
//     rank's coordinates; the batch split over dp;
//   * `ievo plan`'s memory per rank and step-time estimate for this layout.
// Prints a report on stdout (rank 0 only) and returns normally; errors are ievo::Error.
#pragma once
#include <string>

#include "launch/config.h"

namespace ievo {

// The report; throws ievo::Error naming the key of the first problem.
std::string dry_run_report(const Config& cfg);
// Prints it on rank 0.
void dry_run(const Config& cfg);

}  // namespace ievo
