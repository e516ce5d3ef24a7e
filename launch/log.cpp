#include "launch/log.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <vector>

#include "runtime/error.h"

namespace ievo {
namespace {

struct RankLog {
  std::mutex mu;
  std::FILE* file = nullptr;
  bool console = true;  // rank 0 (or no log open)
};

RankLog& state() {
  static RankLog s;
  return s;
}

}  // namespace

std::string rank_log_path(const std::string& run_dir, int rank) {
  return (std::filesystem::path(run_dir) / "logs" / ("rank_" + std::to_string(rank) + ".log"))
      .string();
}

void open_rank_log(const std::string& run_dir, int rank) {
  const std::string path = rank_log_path(run_dir, rank);
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::FILE* f = std::fopen(path.c_str(), "a");
  IEVO_CHECK(f, "cannot open the rank log ", path);
  RankLog& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.file) std::fclose(s.file);
  s.file = f;
  s.console = rank == 0;
}

void close_rank_log() {
  RankLog& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.file) std::fclose(s.file);
  s.file = nullptr;
  s.console = true;
}

namespace {

std::string format_line(const char* fmt, std::va_list ap) {
  std::va_list ap2;
  va_copy(ap2, ap);
  const int n = std::vsnprintf(nullptr, 0, fmt, ap);
  std::vector<char> buf(static_cast<size_t>(std::max(n, 0)) + 1);
  std::vsnprintf(buf.data(), buf.size(), fmt, ap2);
  va_end(ap2);
  std::string line(buf.data(), static_cast<size_t>(std::max(n, 0)));
  if (line.empty() || line.back() != '\n') line += '\n';
  return line;
}

void write_line(const std::string& line, bool console_allowed) {
  RankLog& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (console_allowed && s.console) std::fputs(line.c_str(), stderr);
  if (s.file) {
    char stamp[32];
    std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ ", &tm);
    std::fputs(stamp, s.file);
    std::fputs(line.c_str(), s.file);
    std::fflush(s.file);
  }
}

}  // namespace

void log_info(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  const std::string line = format_line(fmt, ap);
  va_end(ap);
  write_line(line, true);
}

void log_file_only(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  const std::string line = format_line(fmt, ap);
  va_end(ap);
  write_line(line, false);
}

}  // namespace ievo
