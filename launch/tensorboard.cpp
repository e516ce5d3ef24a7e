#include "launch/tensorboard.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "runtime/error.h"

namespace ievo {
namespace {

// Byte-at-a-time table of the reflected CRC-32C polynomial.
const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

template <class T>
void put_le(std::string& out, T v) {  // fixed-width little endian (x86 and ARM are LE)
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}

void put_key(std::string& out, int field, int wire_type) {
  put_varint(out, static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire_type));
}

void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto& t = crc_table();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

std::string encode_event(double wall_time, int64_t step, const std::string& file_version,
                         const std::vector<std::pair<std::string, float>>& scalars) {
  std::string ev;
  put_key(ev, 1, 1);
  put_le(ev, wall_time);
  put_key(ev, 2, 0);
  put_varint(ev, static_cast<uint64_t>(step));  // int64: negative values as 10-byte varints
  if (!file_version.empty()) put_bytes(ev, 3, file_version);
  if (!scalars.empty()) {
    std::string summary;
    for (const auto& [tag, value] : scalars) {
      std::string v;
      put_bytes(v, 1, tag);
      put_key(v, 2, 5);
      put_le(v, value);
      put_bytes(summary, 1, v);
    }
    put_bytes(ev, 5, summary);
  }
  return ev;
}

std::string encode_session_start(double wall_time, int64_t step) {
  std::string ev = encode_event(wall_time, step, "", {});
  std::string session_log;
  put_key(session_log, 1, 0);  // status
  put_varint(session_log, 1);  // START
  put_bytes(ev, 7, session_log);
  return ev;
}

std::string tfrecord(const std::string& data) {
  std::string r;
  const uint64_t len = data.size();
  put_le(r, len);
  put_le(r, masked_crc32c(r.data(), 8));
  r += data;
  put_le(r, masked_crc32c(data.data(), data.size()));
  return r;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  host[sizeof host - 1] = 0;
  const auto secs = static_cast<long long>(now_seconds());
  path_ = (std::filesystem::path(dir) /
           ("events.out.tfevents." + std::to_string(secs) + "." + host))
              .string();
  f_ = std::fopen(path_.c_str(), "ab");
  IEVO_CHECK(f_, "cannot create the TensorBoard event file ", path_);
  write(tfrecord(encode_event(now_seconds(), 0, "brain.Event:2", {})));
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::session_start(int64_t step) {
  write(tfrecord(encode_session_start(now_seconds(), step)));
}

void TensorBoardWriter::add_scalars(int64_t step,
                                    const std::vector<std::pair<std::string, float>>& scalars) {
  write(tfrecord(encode_event(now_seconds(), step, "", scalars)));
}

void TensorBoardWriter::write(const std::string& record) {
  IEVO_CHECK(std::fwrite(record.data(), 1, record.size(), f_) == record.size() &&
                 std::fflush(f_) == 0,
             "cannot write the TensorBoard event file ", path_);
}

}  // namespace ievo
