// Durable file output: data goes to a temporary file beside the target, is fsync'ed, and is
// renamed over the target, so a reader sees either the old file or the complete new one, never
// a torn write. Errors name the path and the failing call.
#pragma once
#include <cstddef>
#include <string>

namespace ievo {

// Streams bytes into `path` + ".tmp.<pid>.<n>"; commit() fsyncs, renames to `path` and fsyncs
// the directory. Destroyed without commit(): the temporary file is removed.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(const std::string& path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, size_t bytes);
  void commit();
  const std::string& path() const { return path_; }
  size_t bytes_written() const { return written_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  size_t written_ = 0;
};

void write_file_atomic(const std::string& path, const std::string& bytes);
std::string read_text_file(const std::string& path);  // throws naming the path
void fsync_path(const std::string& path);             // a file or a directory

// Replaces directory `dst` by directory `src` (same filesystem): rename(src, dst) when dst does
// not exist, otherwise swap the two atomically (renameat2 RENAME_EXCHANGE) and remove the old one.
// The parent directory is fsync'ed afterwards.
void replace_directory(const std::string& src, const std::string& dst);
// mkdtemp(prefix + "XXXXXX"); returns the created directory.
std::string make_temp_directory(const std::string& prefix);

}  // namespace ievo
