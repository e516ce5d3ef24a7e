#include "hf_fixture.h"

#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "models/safetensors.h"
#include "util.h"

namespace ievo::test {

std::vector<double> metric_series(const std::string& run_dir, const std::string& key) {
  std::ifstream mf(run_dir + "/metrics.jsonl");
  std::vector<double> out;
  std::string line;
  while (std::getline(mf, line)) {
    auto m = nlohmann::json::parse(line);
    if (m.contains(key)) out.push_back(m[key].get<double>());
  }
  return out;
}

std::string train_fixture_and_compare(const std::string& v, const std::string& extra_sets,
                                      const FixtureTolerance& tol) {
  const std::string fx = fixture_dir(v);
  const std::string run = temp_dir("e2e_" + v);
  std::string out;
  const std::string cmd = ievo_binary() + " train " + fx + "/train.yaml --set model.init_from_hf=" + fx +
                          "/hf --set data.paths=[" + fx + "/data] --set run.dir=" + run + " " + extra_sets;
  EXPECT_EQ(run_command(cmd, &out), 0) << cmd << "\n" << out;

  auto exp = nlohmann::json::parse(read_file(fx + "/expected.json"))["steps"];
  auto loss = metric_series(run, "loss"), norm = metric_series(run, "grad_norm"), lr = metric_series(run, "lr");
  EXPECT_EQ(loss.size(), exp.size()) << "metrics.jsonl of " << run;
  for (size_t i = 0; i < std::min(loss.size(), exp.size()); ++i) {
    EXPECT_NEAR(loss[i], exp[i]["loss"].get<double>(), tol.loss_abs) << v << " step " << i + 1;
    if (tol.grad_norm_rel >= 0) {
      EXPECT_NEAR(norm[i], exp[i]["grad_norm"].get<double>(), tol.grad_norm_rel * exp[i]["grad_norm"].get<double>())
          << v << " step " << i + 1;
    }
    EXPECT_NEAR(lr[i], exp[i]["lr"].get<double>(), 1e-12) << v << " step " << i + 1;
  }
  if (tol.weight_rel_l2 < 0) return run;

  // Final weights: export the last checkpoint to HF and compare every tensor.
  const std::string ckpt = run + "/checkpoints/step_" + std::to_string(exp.size());
  const std::string hf_out = run + "/hf_final";
  EXPECT_EQ(run_command(ievo_binary() + " convert to-hf " + ckpt + " " + hf_out, &out), 0) << out;
  HfWeights ours(hf_out);
  auto ref = SafetensorsFile::open(fx + "/final.safetensors");
  int compared = 0;
  for (const auto& name : ref.names()) {
    if (!ours.has(name)) {
      ADD_FAILURE() << "exported checkpoint lacks " << name;
      continue;
    }
    EXPECT_LT(rel_l2(ours.get(name), ref.get(name)), tol.weight_rel_l2) << v << ": " << name;
    ++compared;
  }
  EXPECT_GE(compared, 10);
  return run;
}

}  // namespace ievo::test
