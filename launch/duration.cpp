#include "launch/duration.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>

namespace ievo {

std::optional<double> parse_duration(const std::string& s) {
  size_t i = 0;
  double total = 0;
  bool any = false;
  while (i < s.size()) {
    size_t j = i;
    while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) || s[j] == '.')) ++j;
    if (j == i) return std::nullopt;  // a unit without a number, a sign, a space, ...
    double v = 0;
    auto [end, ec] = std::from_chars(s.data() + i, s.data() + j, v);
    if (ec != std::errc() || end != s.data() + j) return std::nullopt;
    double unit = 1;
    if (j < s.size()) {
      switch (s[j]) {
        case 'd': unit = 86400; break;
        case 'h': unit = 3600; break;
        case 'm': unit = 60; break;
        case 's': unit = 1; break;
        default: return std::nullopt;
      }
      ++j;
    } else if (any) {
      return std::nullopt;  // "1h30": the last part needs a unit too
    }
    total += v * unit;
    any = true;
    i = j;
  }
  if (!any || !std::isfinite(total)) return std::nullopt;
  return total;
}

std::string format_duration(double seconds) {
  const long long t = std::llround(std::max(0.0, seconds));
  char buf[48];
  std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", t / 3600, t / 60 % 60, t % 60);
  return buf;
}

TimeLimit::TimeLimit(const std::string& spec) : t0_(std::chrono::steady_clock::now()) {
  if (auto s = parse_duration(spec)) limit_s_ = *s;
}

double TimeLimit::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

void TimeLimit::record_step(double seconds) { max_step_s_ = std::max(max_step_s_, seconds); }

bool TimeLimit::should_stop() const {
  if (!enabled()) return false;
  const double save = last_save_s_ >= 0 ? last_save_s_ : max_step_s_;
  return elapsed_s() + 1.1 * (max_step_s_ + save) >= limit_s_;
}

}  // namespace ievo
