// Runs `ievo train` on one of the HF fixtures (tests/fixtures/<variant>) with extra --set overrides
// and checks metrics.jsonl and the final weights against HF's float64 run.
#pragma once
#include <string>
#include <vector>

namespace ievo::test {

struct FixtureTolerance {
  double loss_abs = 1e-4;       // |loss - HF loss| per step
  double grad_norm_rel = 1e-4;  // |norm - HF norm| / HF norm per step (< 0: not checked)
  double weight_rel_l2 = 1e-3;  // every final tensor (< 0: not checked)
};

// Returns the run directory (for further checks); failures are reported with gtest EXPECTs.
std::string train_fixture_and_compare(const std::string& variant, const std::string& extra_sets,
                                      const FixtureTolerance& tol);
// The per-step losses recorded in RUN_DIR/metrics.jsonl.
std::vector<double> metric_series(const std::string& run_dir, const std::string& key);

}  // namespace ievo::test
