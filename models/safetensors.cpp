#include "models/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "models/atomic_file.h"

namespace fs = std::filesystem;

namespace ievo {

namespace {

struct StDType {
  const char* name;
  size_t size;
  int dtype;  // DType or -1
};
// Every dtype of the format; those ievo has no DType for can be listed but not read.
const StDType kStDTypes[] = {
    {"F32", 4, static_cast<int>(DType::F32)},   {"F64", 8, static_cast<int>(DType::F64)},
    {"BF16", 2, static_cast<int>(DType::BF16)}, {"F16", 2, static_cast<int>(DType::F16)},
    {"I32", 4, static_cast<int>(DType::I32)},   {"I64", 8, static_cast<int>(DType::I64)},
    {"BOOL", 1, -1}, {"U8", 1, -1}, {"I8", 1, -1}, {"F8_E5M2", 1, -1}, {"F8_E4M3", 1, -1},
    {"I16", 2, -1},  {"U16", 2, -1}, {"U32", 4, -1}, {"U64", 8, -1},
};

const StDType* find_dtype(const std::string& s) {
  for (auto& d : kStDTypes)
    if (s == d.name) return &d;
  return nullptr;
}

struct Mapping {
  void* addr = nullptr;
  size_t len = 0;
  ~Mapping() {
    if (addr) ::munmap(addr, len);
  }
};

void put_u64_le(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
uint64_t get_u64_le(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

}  // namespace

const char* safetensors_dtype_name(DType t) {
  for (auto& d : kStDTypes)
    if (d.dtype == static_cast<int>(t)) return d.name;
  IEVO_FAIL("dtype ", dtype_name(t), " has no safetensors name");
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  IEVO_CHECK(fd >= 0, "safetensors ", path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size < 8) {
    ::close(fd);
    IEVO_FAIL("safetensors ", path, ": file is ", st.st_size,
              " bytes, too short for the 8-byte header length");
  }
  const size_t size = static_cast<size_t>(st.st_size);
  // Private, writable mapping: tensors handed out may be written to without touching the file.
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  IEVO_CHECK(addr != MAP_FAILED, "safetensors ", path, ": mmap failed: ", std::strerror(err));
  auto map = std::make_shared<Mapping>();
  map->addr = addr;
  map->len = size;
  f.map_ = map;
  const char* bytes = static_cast<const char*>(addr);

  const uint64_t n = get_u64_le(bytes);
  IEVO_CHECK(n <= size - 8, "safetensors ", path, ": header length ", n,
             " exceeds the file size (", size, " bytes)");
  f.base_ = bytes + 8 + n;
  const size_t data_size = size - 8 - n;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + n);
  } catch (const nlohmann::json::exception& e) {
    IEVO_FAIL("safetensors ", path, ": header is not valid JSON: ", e.what());
  }
  IEVO_CHECK(header.is_object(), "safetensors ", path, ": header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      IEVO_CHECK(v.is_object(), "safetensors ", path, ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m)
        f.metadata_[m.key()] = m.value().is_string() ? m.value().get<std::string>() : m.value().dump();
      continue;
    }
    const std::string where = "safetensors " + path + ": tensor '" + name + "'";
    IEVO_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") &&
                   v.contains("data_offsets"),
               where, ": entry needs dtype, shape and data_offsets");
    Entry e;
    IEVO_CHECK(v["dtype"].is_string(), where, ": dtype is not a string");
    e.dtype_str = v["dtype"].get<std::string>();
    const StDType* dt = find_dtype(e.dtype_str);
    IEVO_CHECK(dt, where, ": unknown dtype '", e.dtype_str, "'");
    e.dtype = dt->dtype;
    IEVO_CHECK(v["shape"].is_array(), where, ": shape is not an array");
    // numel * element size, checked against the data size as it grows (no overflow).
    size_t expect = dt->size;
    bool too_big = false;
    for (auto& d : v["shape"]) {
      IEVO_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                 where, ": shape ", v["shape"].dump(), " has a non-integer or negative entry");
      const uint64_t dim = d.get<uint64_t>();
      IEVO_CHECK(dim <= static_cast<uint64_t>(INT64_MAX), where, ": shape ", v["shape"].dump(),
                 " has an entry beyond 2^63 - 1");
      e.shape.push_back(static_cast<int64_t>(dim));
      if (dim != 0 && expect > data_size / dim) too_big = true;
      expect = too_big ? 0 : expect * dim;
    }
    // An empty tensor needs no bytes, whatever its other dimensions (no product is formed: it
    // could overflow).
    if (std::find(e.shape.begin(), e.shape.end(), int64_t{0}) != e.shape.end()) {
      expect = 0;
      too_big = false;
    }
    const auto& off = v["data_offsets"];
    IEVO_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() &&
                   off[1].is_number_unsigned(),
               where, ": data_offsets ", off.dump(), " is not two non-negative integers");
    const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    IEVO_CHECK(b <= en && en <= data_size, where, ": data_offsets [", b, ", ", en,
               "] out of range of the data (", data_size, " bytes)");
    IEVO_CHECK(!too_big && en - b == expect, where, ": data_offsets [", b, ", ", en, "] span ",
               en - b, " bytes, but ", e.dtype_str, shape_str(e.shape), " needs ",
               too_big ? std::string("more than the file holds") : std::to_string(expect));
    e.begin = b;
    e.end = en;
    f.entries_.emplace(name, std::move(e));
  }

  // No two tensors may share bytes.
  std::vector<std::pair<size_t, const std::string*>> order;
  for (auto& [name, e] : f.entries_)
    if (e.end > e.begin) order.push_back({e.begin, &name});
  std::sort(order.begin(), order.end());
  for (size_t i = 1; i < order.size(); ++i) {
    const Entry& prev = f.entries_.at(*order[i - 1].second);
    IEVO_CHECK(order[i].first >= prev.end, "safetensors ", path, ": tensors '",
               *order[i - 1].second, "' and '", *order[i].second, "' overlap");
  }
  return f;
}

const SafetensorsFile::Entry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  IEVO_CHECK(it != entries_.end(), "safetensors ", path_, ": no tensor '", name, "'");
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::pair<size_t, std::string>> v;
  for (auto& [name, e] : entries_) v.push_back({e.begin, name});
  std::sort(v.begin(), v.end());
  std::vector<std::string> out;
  for (auto& p : v) out.push_back(p.second);
  return out;
}

DType SafetensorsFile::dtype(const std::string& name) const {
  const Entry& e = entry(name);
  IEVO_CHECK(e.dtype >= 0, "safetensors ", path_, ": tensor '", name, "' has dtype ", e.dtype_str,
             ", which ievo does not read (F32, F64, BF16, F16, I32, I64)");
  return static_cast<DType>(e.dtype);
}

Shape SafetensorsFile::shape(const std::string& name) const { return entry(name).shape; }
const void* SafetensorsFile::data(const std::string& name) const { return base_ + entry(name).begin; }
size_t SafetensorsFile::nbytes(const std::string& name) const {
  const Entry& e = entry(name);
  return e.end - e.begin;
}

Tensor SafetensorsFile::get(const std::string& name) const {
  const Entry& e = entry(name);
  const DType dt = dtype(name);
  char* p = const_cast<char*>(base_ + e.begin);
  Tensor t = Tensor::from_blob(p, e.shape, dt, Device::CPU, map_);
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(dt) != 0) {
    Tensor c = Tensor::empty(e.shape, dt);
    std::memcpy(c.raw(), p, e.end - e.begin);
    return c;
  }
  return t;
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (auto& e : entries) {
    IEVO_CHECK(e.name != "__metadata__" && !header.contains(e.name), "safetensors ", path,
               ": duplicate or reserved tensor name '", e.name, "'");
    const uint64_t n = static_cast<uint64_t>(shape_numel(e.shape)) * dtype_size(e.dtype);
    header[e.name] = {{"dtype", safetensors_dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as HF writes it
  char len[8];
  put_u64_le(len, h.size());

  AtomicFileWriter w(path);
  w.write(len, 8);
  w.write(h.data(), h.size());
  for (auto& e : entries) {
    Tensor t = e.make();
    IEVO_CHECK(t.dtype() == e.dtype && t.shape() == e.shape, "safetensors ", path, ": tensor '",
               e.name, "' is ", t.describe(), ", declared ", dtype_name(e.dtype),
               shape_str(e.shape));
    if (!t.is_cpu()) t = t.to(Device::CPU);
    if (!t.is_contiguous()) t = t.clone();
    w.write(t.raw(), t.nbytes());
  }
  IEVO_CHECK(w.bytes_written() == 8 + h.size() + offset, "safetensors ", path,
             ": wrote ", w.bytes_written(), " bytes, expected ", 8 + h.size() + offset);
  w.commit();
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsEntry> entries;
  for (auto& [name, t] : tensors) {
    IEVO_CHECK(t.defined(), "safetensors ", path, ": tensor '", name, "' is undefined");
    const Tensor* tp = &t;
    entries.push_back({name, t.dtype(), t.shape(), [tp] { return *tp; }});
  }
  write_safetensors(path, entries, metadata);
}

HfWeights::HfWeights(const std::string& hf_dir) : dir_(hf_dir) {
  const std::string single = (fs::path(hf_dir) / "model.safetensors").string();
  const std::string index = (fs::path(hf_dir) / "model.safetensors.index.json").string();
  if (fs::exists(single)) {
    files_.push_back(SafetensorsFile::open(single));
    for (auto& n : files_[0].names()) where_[n] = 0;
    return;
  }
  if (!fs::exists(index)) {
    IEVO_CHECK(fs::is_directory(hf_dir), "HF checkpoint ", hf_dir, ": not a directory");
    IEVO_FAIL("HF checkpoint ", hf_dir, ": no model.safetensors or model.safetensors.index.json",
              fs::exists(fs::path(hf_dir) / "pytorch_model.bin") ||
                      fs::exists(fs::path(hf_dir) / "pytorch_model.bin.index.json")
                  ? " (pytorch_model.bin is not read: re-save the model with safe_serialization=True)"
                  : "");
  }
  sharded_ = true;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(index));
  } catch (const nlohmann::json::exception& e) {
    IEVO_FAIL("HF index ", index, ": not valid JSON: ", e.what());
  }
  IEVO_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
             "HF index ", index, ": no \"weight_map\" object");
  std::map<std::string, size_t> shard_index;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    IEVO_CHECK(it.value().is_string(), "HF index ", index, ": weight_map entry '", it.key(),
               "' is not a file name");
    const std::string shard = it.value().get<std::string>();
    IEVO_CHECK(shard.find('/') == std::string::npos && shard != ".." && !shard.empty(),
               "HF index ", index, ": shard name '", shard, "' of tensor '", it.key(),
               "' is not a plain file name");
    auto [pos, fresh] = shard_index.emplace(shard, files_.size());
    if (fresh) files_.push_back(SafetensorsFile::open((fs::path(hf_dir) / shard).string()));
    IEVO_CHECK(files_[pos->second].has(it.key()), "HF index ", index, " maps tensor '", it.key(),
               "' to ", shard, ", which does not contain it");
    where_[it.key()] = pos->second;
  }
}

std::vector<std::string> HfWeights::names() const {
  std::vector<std::string> v;
  for (auto& p : where_) v.push_back(p.first);
  return v;
}

const SafetensorsFile& HfWeights::file_of(const std::string& name) const {
  auto it = where_.find(name);
  IEVO_CHECK(it != where_.end(), "HF checkpoint ", dir_, ": missing tensor '", name, "'");
  return files_[it->second];
}

}  // namespace ievo
