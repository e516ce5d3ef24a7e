#include "launch/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "launch/duration.h"
#include "launch/log.h"
#include "launch/tensorboard.h"
#include "runtime/error.h"

namespace ievo {
namespace {

std::string fmt_rate(double r) {
  char buf[32];
  if (r >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", r / 1e6);
  else if (r >= 1e3) std::snprintf(buf, sizeof buf, "%.1fK", r / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", r);
  return buf;
}

// JSON has no NaN/Inf: those become null.
nlohmann::json num(double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(); }

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

}  // namespace

MetricsLogger::MetricsLogger(const MetricsOptions& o) : o_(o), t0_(std::chrono::steady_clock::now()) {
  if (o_.rank != 0) return;
  const std::filesystem::path file = std::filesystem::path(o_.run_dir) / "metrics.jsonl";
  jsonl_.open(file, std::ios::app);
  IEVO_CHECK(jsonl_.good(), "cannot open ", file.string(), " for writing");
  if (o_.tensorboard) {
    tb_ = std::make_unique<TensorBoardWriter>(o_.run_dir);
    tb_->session_start(o_.first_step);
  }
}

MetricsLogger::~MetricsLogger() = default;

std::string MetricsLogger::tensorboard_path() const { return tb_ ? tb_->path() : ""; }

std::string MetricsLogger::tensorboard_tag(const std::string& key) {
  if (key.rfind("val_", 0) == 0) return "val/" + key.substr(4);
  return "train/" + key;
}

std::string MetricsLogger::progress_line(const StepMetrics& m, int64_t total_steps, double eta_s) {
  char buf[512];
  int n = std::snprintf(buf, sizeof buf, "step %lld/%lld | loss %.4f | grad_norm %.3f | lr %.3e | %s tok/s",
                        static_cast<long long>(m.step), static_cast<long long>(total_steps), m.loss,
                        m.grad_norm, m.lr, fmt_rate(m.tokens_per_s).c_str());
  std::string s(buf, static_cast<size_t>(n));
  if (m.mfu > 0) {
    std::snprintf(buf, sizeof buf, " | MFU %.1f%%", 100.0 * m.mfu);
    s += buf;
  }
  std::snprintf(buf, sizeof buf, " | mem %.2f GiB", static_cast<double>(m.peak_mem_bytes) / kGiB);
  s += buf;
  if (eta_s >= 0) s += " | ETA " + format_duration(eta_s);
  if (m.skipped_total > 0) {
    std::snprintf(buf, sizeof buf, " | skipped %lld%s", static_cast<long long>(m.skipped_total),
                  m.skipped ? " (this step)" : "");
    s += buf;
  }
  if (m.loss_scale > 0) {
    std::snprintf(buf, sizeof buf, " | scale %g", m.loss_scale);
    s += buf;
  }
  return s;
}

void MetricsLogger::log_step(const StepMetrics& m) {
  if (first_step_ < 0) {
    first_step_ = m.step;
    t0_ = std::chrono::steady_clock::now() -
          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
              std::chrono::duration<double>(m.step_time_s));
  }
  if (o_.rank == 0) {
    nlohmann::json j = {{"step", m.step},
                        {"loss", num(m.loss)},
                        {"grad_norm", num(m.grad_norm)},
                        {"lr", m.lr},
                        {"tokens_per_s", num(m.tokens_per_s)},
                        {"mfu", num(m.mfu)},
                        {"tokens", m.tokens},
                        {"step_time_s", m.step_time_s},
                        {"peak_mem_bytes", m.peak_mem_bytes},
                        {"skipped", m.skipped},
                        {"skipped_total", m.skipped_total}};
    if (m.loss_scale > 0) j["loss_scale"] = m.loss_scale;
    jsonl_ << j.dump() << "\n";
    jsonl_.flush();
    if (tb_) {
      std::vector<std::pair<std::string, float>> s;
      auto add = [&](const std::string& key, double v) {
        if (std::isfinite(v)) s.emplace_back(tensorboard_tag(key), static_cast<float>(v));
      };
      add("loss", m.loss);
      add("grad_norm", m.grad_norm);
      add("lr", m.lr);
      add("tokens_per_s", m.tokens_per_s);
      add("mfu", m.mfu);
      add("step_time_s", m.step_time_s);
      add("peak_mem_gib", static_cast<double>(m.peak_mem_bytes) / kGiB);
      add("skipped_total", static_cast<double>(m.skipped_total));
      if (m.loss_scale > 0) add("loss_scale", m.loss_scale);
      tb_->add_scalars(m.step, s);
    }
  }
  if (m.step % std::max<int64_t>(1, o_.log_every) == 0 || m.step == o_.total_steps) {
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const double done = static_cast<double>(m.step - first_step_ + 1);
    const double eta = elapsed / done * static_cast<double>(o_.total_steps - m.step);
    log_info("%s", progress_line(m, o_.total_steps, eta).c_str());
  }
}

void MetricsLogger::log_scalars(int64_t step,
                                const std::vector<std::pair<std::string, double>>& values) {
  if (o_.rank != 0 || values.empty()) return;
  nlohmann::json j = {{"step", step}};
  std::vector<std::pair<std::string, float>> s;
  for (const auto& [k, v] : values) {
    j[k] = num(v);
    if (std::isfinite(v)) s.emplace_back(tensorboard_tag(k), static_cast<float>(v));
  }
  jsonl_ << j.dump() << "\n";
  jsonl_.flush();
  if (tb_ && !s.empty()) tb_->add_scalars(step, s);
}

}  // namespace ievo
