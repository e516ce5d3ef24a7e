// What a run reports, per optimiser step:
//   RUN_DIR/metrics.jsonl   one JSON object per step (rank 0): step, loss, grad_norm, lr,
//                           tokens_per_s, mfu, tokens, step_time_s, peak_mem_bytes, skipped,
//                           skipped_total (+ loss_scale with fp16); non-finite numbers are null.
//                           Extra scalars (validation) are lines of their own: {"step", "val_loss"}.
//   RUN_DIR/events.out.tfevents.*  TensorBoard scalars when metrics.tensorboard is on (rank 0):
//                           tags train/loss, train/grad_norm, train/lr, train/tokens_per_s,
//                           train/mfu, train/step_time_s, train/peak_mem_gib, train/skipped_total
//                           (+ train/loss_scale), and "val/<name>" for an extra scalar "val_<name>"
//                           ("train/<key>" for other extras); only finite values are written.
//                           Each process (a fresh start or a resume) first writes a SessionLog
//                           START at its first step, so that TensorBoard drops the steps of an
//                           interrupted run after the checkpoint resumed from; metrics.jsonl loses
//                           those lines on the resume (launch/resume.h: truncate_metrics).
//   the progress line       every train.log_every steps and at the last one, through log_info
//                           (RUN_DIR/logs/rank_<r>.log; rank 0 also on stderr):
//     step 10/100 | loss 4.1234 | grad_norm 0.532 | lr 1.20e-03 | 12.3K tok/s | MFU 41.2% |
//     mem 1.23 GiB | ETA 0:01:23  [| skipped 1] [| scale 65536]
#pragma once
#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "launch/trainer.h"

namespace ievo {

class TensorBoardWriter;

struct MetricsOptions {
  std::string run_dir;
  int rank = 0;              // only rank 0 writes metrics.jsonl and TensorBoard files
  bool tensorboard = false;  // metrics.tensorboard
  int64_t total_steps = 0;   // train.steps, for the ETA
  int64_t log_every = 1;     // train.log_every
  int64_t first_step = 1;    // the first step this process trains (a resumed checkpoint's + 1):
                             // TensorBoard's SessionLog START, which hides the steps from there on
                             // that an earlier, interrupted run wrote (launch/tensorboard.h)
};

class MetricsLogger {
 public:
  explicit MetricsLogger(const MetricsOptions& o);
  ~MetricsLogger();

  // Writes one step (metrics.jsonl, TensorBoard) and prints the progress line when due.
  void log_step(const StepMetrics& m);
  // Scalars that are not per-step training metrics, e.g. {{"val_loss", 2.31}}.
  void log_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);

  std::string tensorboard_path() const;  // "" when off

  // The progress line of a step (no newline). eta_s < 0: not printed.
  static std::string progress_line(const StepMetrics& m, int64_t total_steps, double eta_s);
  // TensorBoard tag of a metrics.jsonl key: "loss" -> "train/loss", "val_loss" -> "val/loss".
  static std::string tensorboard_tag(const std::string& key);

 private:
  MetricsOptions o_;
  std::ofstream jsonl_;
  std::unique_ptr<TensorBoardWriter> tb_;
  std::chrono::steady_clock::time_point t0_;
  int64_t first_step_ = -1;  // first step logged by this process (resumed runs start later)
};

}  // namespace ievo
