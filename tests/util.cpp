#include "util.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

namespace fs = std::filesystem;

namespace ievo::test {

std::string source_dir() {
  const char* e = std::getenv("IEVO_SOURCE_DIR");
  return e ? e : IEVO_SOURCE_DIR;
}

std::string ievo_binary() {
  const char* e = std::getenv("IEVO_BINARY");
  return e ? e : source_dir() + "/build/ievo";
}

std::string mpirun_ievo(int np) {
  return "OMP_NUM_THREADS=1 timeout -k 5 120 mpirun --allow-run-as-root --oversubscribe -np " + std::to_string(np) +
         " " + ievo_binary();
}

std::string fixture_dir(const std::string& name) { return source_dir() + "/tests/fixtures/" + name; }

namespace {
struct TempDirs {
  std::vector<std::string> dirs;
  ~TempDirs() {
    if (std::getenv("IEVO_KEEP_TEMP")) return;
    for (auto& d : dirs) {
      std::error_code ec;
      fs::remove_all(d, ec);
    }
  }
};
TempDirs g_temps;
}  // namespace

std::string temp_dir(const std::string& tag) {
  std::string tmpl = (fs::temp_directory_path() / ("ievo_" + tag + "_XXXXXX")).string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* p = mkdtemp(buf.data());
  if (!p) throw std::runtime_error("mkdtemp failed for " + tmpl);
  g_temps.dirs.push_back(p);
  return p;
}

int run_command(const std::string& cmd, std::string* output) {
  std::string full = cmd + " 2>&1";
  FILE* f = popen(full.c_str(), "r");
  if (!f) return -1;
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) out.append(buf.data(), n);
  int status = pclose(f);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

double rel_l2(const Tensor& a, const Tensor& b) {
  auto va = a.to_double_vector(), vb = b.to_double_vector();
  if (va.size() != vb.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < va.size(); ++i) {
    num += (va[i] - vb[i]) * (va[i] - vb[i]);
    den += vb[i] * vb[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  auto va = a.to_double_vector(), vb = b.to_double_vector();
  if (va.size() != vb.size()) return INFINITY;
  double m = 0;
  for (size_t i = 0; i < va.size(); ++i) m = std::max(m, std::fabs(va[i] - vb[i]));
  return m;
}

Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, double lo, double hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  Tensor t = Tensor::empty(shape, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) {
    double x = u(rng);
    if (dtype == DType::F64) t.data<double>()[i] = x;
    else t.data<float>()[i] = static_cast<float>(x);
  }
  return t;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool gpu_available() {
#ifdef IEVO_CUDA
  return cuda::available();
#else
  return false;
#endif
}

}  // namespace ievo::test
