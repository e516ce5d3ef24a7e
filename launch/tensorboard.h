// TensorBoard event files, written without TensorFlow or protobuf.
//
// File: RUN_DIR/events.out.tfevents.<unix seconds>.<hostname> (the name TensorBoard globs for), a
// sequence of TFRecords:
//   uint64 length (little endian) | uint32 masked_crc32c(the 8 length bytes) | data[length] |
//   uint32 masked_crc32c(data)
// with masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 of the CRC-32C (Castagnoli,
// reflected polynomial 0x82f63b78) of the bytes. Each record's data is a serialised
// tensorflow.Event protobuf, of which we write these fields (proto3 wire format: a key
// varint (field << 3 | wire type), then the value):
//   Event   { double wall_time = 1;  (wire type 1, 8 bytes little endian)
//             int64  step = 2;       (wire type 0, varint)
//             string file_version = 3; (wire type 2, varint length + bytes)
//             Summary summary = 5; } (wire type 2, length-delimited message)
//   Summary { repeated Value value = 1; }          (wire type 2)
//   Value   { string tag = 1;                      (wire type 2)
//             float simple_value = 2; }            (wire type 5, 4 bytes little endian)
//   Event.session_log = 7 (wire type 2): SessionLog { SessionStatus status = 1; } (varint,
//             START = 1)
// The first record is an Event with file_version "brain.Event:2"; then an Event with
// session_log {status: START} at the first step this process trains; then one Event per step with
// all its scalars in one Summary.
//
// Resumed runs: a resume starts a new event file (or appends to the last one when it starts in
// the same second), while the old file still holds the steps after the checkpoint that the crash
// threw away. TensorBoard's answer is the START event: its event accumulator
// (tensorboard/backend/event_processing, _CheckForRestartAndMaybePurge, for files of version >= 2)
// purges every previously read event whose step is >= the START event's step; its Rust data
// server drops a series' points at steps >= a step that comes again (reservoir preemption). Files
// are read in name order, which is creation order (the names begin with the time in seconds). So
// a run resumed at checkpoint step S writes START at step S + 1, and readers see steps 1..S of
// the first run and S+1.. of the resumed one, each once.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace ievo {

// CRC-32C of n bytes, continuing from `crc` (0 to start). crc32c("123456789") == 0xe3069283.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
// TFRecord's masking of a CRC-32C.
uint32_t masked_crc32c(const void* data, size_t n);

// The Event message bytes (see above); `file_version` empty = not written, `scalars` empty = no
// summary.
std::string encode_event(double wall_time, int64_t step, const std::string& file_version,
                         const std::vector<std::pair<std::string, float>>& scalars);
// An Event carrying session_log {status: START} at `step` (see above).
std::string encode_session_start(double wall_time, int64_t step);
// One TFRecord around `data`.
std::string tfrecord(const std::string& data);

class TensorBoardWriter {
 public:
  // Creates DIR/events.out.tfevents.<time>.<host> and writes the file_version record.
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // The SessionLog START event at `step`, the first step this process writes (see above).
  void session_start(int64_t step);
  // One Event at `step` holding these scalars (wall time: now); flushed at once.
  void add_scalars(int64_t step, const std::vector<std::pair<std::string, float>>& scalars);
  const std::string& path() const { return path_; }

 private:
  void write(const std::string& record);
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace ievo
