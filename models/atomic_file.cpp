#include "models/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "runtime/error.h"

namespace fs = std::filesystem;

namespace ievo {

namespace {
std::atomic<int> g_counter{0};
std::string errno_str() { return std::strerror(errno); }
std::string parent_of(const std::string& path) {
  fs::path p = fs::path(path).parent_path();
  return p.empty() ? "." : p.string();
}
}  // namespace

AtomicFileWriter::AtomicFileWriter(const std::string& path) : path_(path) {
  tmp_ = path + ".tmp." + std::to_string(getpid()) + "." + std::to_string(g_counter++);
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  IEVO_CHECK(fd_ >= 0, "cannot create ", tmp_, " (for ", path, "): ", errno_str());
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void AtomicFileWriter::write(const void* data, size_t bytes) {
  IEVO_CHECK(fd_ >= 0, "write to ", path_, " after commit");
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::write(fd_, p, std::min<size_t>(bytes, size_t{1} << 30));
    if (n < 0 && errno == EINTR) continue;
    IEVO_CHECK(n > 0, "write to ", tmp_, " failed: ", errno_str());
    p += n;
    bytes -= static_cast<size_t>(n);
    written_ += static_cast<size_t>(n);
  }
}

void AtomicFileWriter::commit() {
  IEVO_CHECK(fd_ >= 0, "commit of ", path_, " twice");
  IEVO_CHECK(::fsync(fd_) == 0, "fsync of ", tmp_, " failed: ", errno_str());
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) {
    ::unlink(tmp_.c_str());
    IEVO_FAIL("close of ", tmp_, " failed: ", errno_str());
  }
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    std::string e = errno_str();
    ::unlink(tmp_.c_str());
    IEVO_FAIL("rename ", tmp_, " -> ", path_, " failed: ", e);
  }
  fsync_path(parent_of(path_));
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  AtomicFileWriter w(path);
  w.write(bytes.data(), bytes.size());
  w.commit();
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  IEVO_CHECK(f.good(), "cannot open ", path, ": ", errno_str());
  std::ostringstream ss;
  ss << f.rdbuf();
  IEVO_CHECK(!f.bad(), "error reading ", path);
  return ss.str();
}

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  IEVO_CHECK(fd >= 0, "cannot open ", path, " to fsync: ", errno_str());
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some filesystems refuse fsync on directories (EINVAL); the data itself was synced.
  IEVO_CHECK(rc == 0 || err == EINVAL, "fsync of ", path, " failed: ", std::strerror(err));
}

std::string make_temp_directory(const std::string& prefix) {
  std::string tmpl = prefix + "XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  IEVO_CHECK(::mkdtemp(buf.data()) != nullptr, "cannot create a directory ", tmpl, ": ",
             errno_str());
  return buf.data();
}

void replace_directory(const std::string& src, const std::string& dst) {
  std::error_code ec;
  if (!fs::exists(dst, ec)) {
    IEVO_CHECK(::rename(src.c_str(), dst.c_str()) == 0, "rename ", src, " -> ", dst,
               " failed: ", errno_str());
  } else if (::renameat2(AT_FDCWD, src.c_str(), AT_FDCWD, dst.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(src, ec);  // src now holds the old contents
  } else {
    // Filesystem without RENAME_EXCHANGE: move the old one aside first (a short window where
    // dst does not exist).
    std::string old = make_temp_directory(dst + ".old-");
    IEVO_CHECK(::rename(dst.c_str(), old.c_str()) == 0, "rename ", dst, " -> ", old, " failed: ",
               errno_str());
    IEVO_CHECK(::rename(src.c_str(), dst.c_str()) == 0, "rename ", src, " -> ", dst, " failed: ",
               errno_str());
    fs::remove_all(old, ec);
  }
  fsync_path(parent_of(dst));
}

}  // namespace ievo
