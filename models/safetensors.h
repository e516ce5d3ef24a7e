// The safetensors format (HF): an 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}
// (padded with spaces), then the data; offsets are relative to the end of the header.
// SafetensorsFile maps a file and hands out zero-copy tensors; HfWeights does the same for an HF
// directory (one model.safetensors, or model.safetensors.index.json and its shards).
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace ievo {

// "F32", "F64", "BF16", "F16", "I32", "I64".
const char* safetensors_dtype_name(DType t);

class SafetensorsFile {
 public:
  // Maps and validates `path` (header length within the file, JSON well formed, known dtypes,
  // offsets inside the data and equal to numel * element size, no two tensors overlapping).
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // in data order
  bool has(const std::string& name) const { return entries_.count(name) > 0; }
  DType dtype(const std::string& name) const;
  Shape shape(const std::string& name) const;
  // CPU tensor viewing the mapped bytes (copy-on-write mapping: writes never reach the file);
  // it keeps the mapping alive. Copied instead when the bytes are not aligned for the dtype.
  Tensor get(const std::string& name) const;
  // The raw bytes of a tensor in the file.
  const void* data(const std::string& name) const;
  size_t nbytes(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Entry {
    std::string dtype_str;  // as in the file (unsupported ones are kept, and fail on access)
    int dtype = -1;         // DType, or -1 when not an ievo dtype
    Shape shape;
    size_t begin = 0, end = 0;
  };
  const Entry& entry(const std::string& name) const;

  std::string path_;
  std::shared_ptr<void> map_;  // the mapping; unmapped when the last user goes
  const char* base_ = nullptr;  // first data byte
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (any device; contiguous or not) in the given order, converting nothing.
// The header is padded with spaces to a multiple of 8 bytes (as HF writes it); the file is
// written to a temporary name, fsync'ed and renamed.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Same, with tensors produced one at a time while writing (so a conversion of a large model
// holds one converted tensor at a time). make() must return a tensor of exactly dtype/shape.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::function<Tensor()> make;
};
void write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                       const std::map<std::string, std::string>& metadata = {});

// An HF model directory's weights: DIR/model.safetensors, or DIR/model.safetensors.index.json
// ({"weight_map": {tensor: shard file}}) and the shards it names (each checked to hold the
// tensors mapped to it).
class HfWeights {
 public:
  explicit HfWeights(const std::string& hf_dir);

  const std::string& dir() const { return dir_; }
  bool sharded() const { return sharded_; }
  std::vector<std::string> names() const;
  bool has(const std::string& name) const { return where_.count(name) > 0; }
  DType dtype(const std::string& name) const { return file_of(name).dtype(name); }
  Shape shape(const std::string& name) const { return file_of(name).shape(name); }
  Tensor get(const std::string& name) const { return file_of(name).get(name); }
  const SafetensorsFile& file_of(const std::string& name) const;

 private:
  std::string dir_;
  bool sharded_ = false;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor -> index into files_
};

}  // namespace ievo
