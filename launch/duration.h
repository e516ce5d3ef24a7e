// Durations as people write them in configs: "4h", "30m", "90s", "1h30m", "1d", or a plain number
// of seconds ("3600", "0.5"); and back as H:MM:SS for the progress line.
#pragma once
#include <chrono>
#include <optional>
#include <string>

namespace ievo {

// Seconds, or nullopt when `s` is not a duration (empty, negative, unknown unit, "4hh").
// Units: d, h, m (minutes), s; parts may be combined in any order ("1h30m", "2m10s").
std::optional<double> parse_duration(const std::string& s);
// 3725.4 -> "1:02:05" (rounded to the second; hours not wrapped).
std::string format_duration(double seconds);

// train.max_time: the clock starts when the TimeLimit is made (the start of `ievo train`). After
// each step the trainer asks whether one more step and a checkpoint save would still fit:
//   stop  <=>  elapsed + 1.1 * (longest step so far + save estimate) >= limit
// where the save estimate is the last measured save, or the longest step before any save.
class TimeLimit {
 public:
  explicit TimeLimit(const std::string& spec);  // "" or unparsable: no limit (config validates)
  bool enabled() const { return limit_s_ > 0; }
  double limit_s() const { return limit_s_; }
  double elapsed_s() const;
  void record_step(double seconds);
  void record_save(double seconds) { last_save_s_ = seconds; }
  bool should_stop() const;

 private:
  std::chrono::steady_clock::time_point t0_;
  double limit_s_ = 0, max_step_s_ = 0, last_save_s_ = -1;
};

}  // namespace ievo
