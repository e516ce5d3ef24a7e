#include "launch/checkpoint.h"

#include <hdf5.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>

#include "launch/checkpoint_h5.h"
#include "launch/checkpoint_shards.h"
#include "launch/fault_injection.h"
#include "models/atomic_file.h"
#include "models/hf_adapter.h"
#include "models/hf_config.h"

#ifndef IEVO_VERSION
#define IEVO_VERSION "unknown"
#endif

namespace fs = std::filesystem;

namespace ievo {

namespace {

using namespace ckpt_h5;

constexpr int kFormatVersion = 2;  // 2: state.json / config.json checksums in model.h5
constexpr const char* kFormat = "ievo-checkpoint";
constexpr const char* kChecksumAlgorithm = "fnv1a64-1MiB-blocks";

// ---- writing -------------------------------------------------------------------------------

// Writes every group; half-way through the tensors the test hooks may fail or kill the save.
void write_groups(hid_t file, const std::string& path, const std::vector<CheckpointGroup>& groups,
                  int64_t step) {
  size_t total = 0, done = 0;
  for (auto& g : groups) total += g.tensors.size();
  for (auto& grp : groups) {
    const std::string& group = grp.name;
    IEVO_CHECK(!group.empty() && group.find('/') == std::string::npos && group.find('.') != 0,
               "checkpoint ", path, ": bad group name '", group, "'");
    H5Id g(H5Gcreate2(file, group.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    H5_CHECK(g.ok(), "checkpoint ", path, ": cannot create group /", group);
    for (auto& [name, src] : grp.tensors) {
      const std::string where = "checkpoint " + path + ": dataset /" + group + "/" + name;
      const DType fdt = src.dtype() == DType::F64 ? DType::F64 : DType::F32;
      Tensor t = src.is_cpu() ? src : src.to(Device::CPU);
      if (t.dtype() != fdt) t = t.to(fdt);
      if (!t.is_contiguous()) t = t.clone();
      std::vector<hsize_t> dims(t.shape().begin(), t.shape().end());
      H5Id space(dims.empty() ? H5Screate(H5S_SCALAR)
                              : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                 H5Sclose);
      H5Id ds(H5Dcreate2(g, name.c_str(), fdt == DType::F32 ? H5T_IEEE_F32LE : H5T_IEEE_F64LE,
                         space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
              H5Dclose);
      H5_CHECK(space.ok() && ds.ok(), where, ": cannot create");
      if (t.numel() > 0)
        H5_CHECK(H5Dwrite(ds, fdt == DType::F32 ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE, H5S_ALL,
                          H5S_ALL, H5P_DEFAULT, t.raw()) >= 0,
                 where, ": write failed");
      write_u64_attr(ds, "checksum", checkpoint_checksum(t.raw(), t.nbytes()), where);
      H5_CHECK(ds.close() >= 0, where, ": write failed");
      if (++done == total / 2) {
        H5Fflush(file, H5F_SCOPE_GLOBAL);  // so that a kill here leaves a half-written file
        fault_point("write", step, path);
      }
    }
  }
}

std::string normalized(const std::string& dir) {
  std::string d = fs::path(dir).lexically_normal().string();
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

// Runs fn; a std::filesystem error becomes an Error naming its path.
template <class F>
void fs_call(F&& fn) {
  try {
    fn();
  } catch (const fs::filesystem_error& e) {
    IEVO_FAIL(e.path1().string(), ": ", e.code().message(), " (", e.what(), ")");
  }
}

bool is_step_name(const std::string& n) {
  return n.size() > 5 && n.rfind("step_", 0) == 0 && n.size() < 24 &&
         std::all_of(n.begin() + 5, n.end(), [](char ch) { return std::isdigit(static_cast<unsigned char>(ch)); });
}

}  // namespace

uint64_t checkpoint_checksum(const void* data, size_t bytes) {
  constexpr uint64_t kBasis = 0xcbf29ce484222325ULL, kPrime = 0x100000001b3ULL;
  constexpr size_t kBlock = size_t{1} << 20;
  const auto* p = static_cast<const unsigned char*>(data);
  const int64_t nb = static_cast<int64_t>((bytes + kBlock - 1) / kBlock);
  std::vector<uint64_t> digest(static_cast<size_t>(nb));
#pragma omp parallel for schedule(static) if (nb > 4)
  for (int64_t b = 0; b < nb; ++b) {
    const size_t begin = static_cast<size_t>(b) * kBlock, end = std::min(bytes, begin + kBlock);
    uint64_t h = kBasis;
    for (size_t i = begin; i < end; ++i) h = (h ^ p[i]) * kPrime;
    digest[static_cast<size_t>(b)] = h;
  }
  uint64_t h = kBasis;
  for (uint64_t d : digest)
    for (int k = 0; k < 8; ++k) h = (h ^ ((d >> (8 * k)) & 0xff)) * kPrime;
  return h;
}

std::string checkpoint_dir(const std::string& run_dir, int64_t step) {
  return (fs::path(run_dir) / "checkpoints" / ("step_" + std::to_string(step))).string();
}

CheckpointGroup checkpoint_group(const std::string& name, const ParamStore& s) {
  CheckpointGroup g{name, {}};
  for (size_t i = 0; i < s.size(); ++i) g.tensors.emplace_back(s.spec(i).name, s[i]);
  return g;
}

void save_checkpoint(const std::string& ckpt_dir, const ModelConfig& c, const CheckpointState& state,
                     const std::vector<std::pair<std::string, const ParamStore*>>& groups,
                     bool update_latest) {
  std::vector<CheckpointGroup> gs;
  for (auto& [name, store] : groups) {
    IEVO_CHECK(store != nullptr, "save_checkpoint: group ", name, " has no store");
    gs.push_back(checkpoint_group(name, *store));
  }
  save_checkpoint_groups(ckpt_dir, c, state, gs, update_latest);
}

void save_checkpoint_groups(const std::string& ckpt_dir, const ModelConfig& c,
                            const CheckpointState& state, const std::vector<CheckpointGroup>& groups,
                            bool update_latest) {
  h5_init();
  const std::string final_dir = normalized(ckpt_dir);
  const std::string tmp = final_dir + ".tmp";
  std::error_code ec;
  fs::remove_all(tmp, ec);  // a leftover of an interrupted save
  try {
    fs_call([&] { fs::create_directories(tmp); });

    // The side files first: model.h5, written last, records their checksums.
    const std::string config_text = hf_model_config_json(c, "float32").dump(2) + "\n";
    nlohmann::json group_names = nlohmann::json::array();
    for (auto& g : groups) group_names.push_back(g.name);
    nlohmann::json st = {{"format_version", kFormatVersion},
                         {"step", state.step},
                         {"consumed_samples", state.consumed_samples},
                         {"seed", state.seed},
                         {"config_yaml", state.config_yaml},
                         {"ievo_version", IEVO_VERSION},
                         {"groups", group_names},
                         {"extra", state.extra.is_null() ? nlohmann::json::object() : state.extra}};
    const std::string state_text = st.dump(2) + "\n";
    write_file_atomic((fs::path(tmp) / "config.json").string(), config_text);
    write_file_atomic((fs::path(tmp) / "state.json").string(), state_text);

    const std::string h5 = (fs::path(tmp) / "model.h5").string();
    {
      H5Id fapl = file_access_plist();
      hid_t fid = H5Fcreate(h5.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
      H5_CHECK(fid >= 0, "checkpoint ", h5, ": cannot create");
      try {  // fid is closed explicitly: a failing close (the last flush) must be reported
        write_string_attr(fid, "format", kFormat, h5);
        write_u64_attr(fid, "format_version", kFormatVersion, h5);
        write_string_attr(fid, "checksum_algorithm", kChecksumAlgorithm, h5);
        write_u64_attr(fid, "state_json_checksum",
                       checkpoint_checksum(state_text.data(), state_text.size()), h5);
        write_u64_attr(fid, "config_json_checksum",
                       checkpoint_checksum(config_text.data(), config_text.size()), h5);
        write_groups(fid, h5, groups, state.step);
        H5_CHECK(H5Fflush(fid, H5F_SCOPE_GLOBAL) >= 0, "checkpoint ", h5, ": flush failed");
      } catch (...) {
        H5Fclose(fid);
        H5Eclear2(H5E_DEFAULT);
        throw;
      }
      H5_CHECK(H5Fclose(fid) >= 0, "checkpoint ", h5, ": close failed");
    }
    fsync_path(h5);
    fsync_path(tmp);
    replace_directory(tmp, final_dir);
  } catch (...) {
    fs::remove_all(tmp, ec);  // the previous checkpoint is untouched
    throw;
  }
  fault_point("renamed", state.step);
  if (update_latest) {
    const fs::path parent = fs::path(final_dir).parent_path();
    write_file_atomic(((parent.empty() ? fs::path(".") : parent) / "latest").string(),
                      fs::path(final_dir).filename().string() + "\n");
  }
  fault_point("saved", state.step);
}

// ---- reading -------------------------------------------------------------------------------

CheckpointReader::CheckpointReader(const std::string& ckpt_dir) : dir_(normalized(ckpt_dir)) {
  h5_init();
  const std::string state_path = (fs::path(dir_) / "state.json").string();
  const std::string config_path = (fs::path(dir_) / "config.json").string();
  h5_ = (fs::path(dir_) / "model.h5").string();
  std::error_code ec;
  IEVO_CHECK(fs::exists(state_path, ec), "checkpoint ", dir_, ": no state.json (",
             fs::is_directory(dir_, ec) ? "not a checkpoint, or an incomplete one"
                                        : "no such directory",
             ")");
  if (!fs::exists(h5_, ec)) {  // version 3: per-rank shard files that state.json lists
    open_sharded(state_path, config_path);
    return;
  }

  H5Id fapl = file_access_plist();
  file_ = H5Fopen(h5_.c_str(), H5F_ACC_RDONLY, fapl);
  H5_CHECK(file_ >= 0, "checkpoint ", h5_, ": cannot open as HDF5 (truncated or corrupt?)");
  const hid_t f = static_cast<hid_t>(file_);
  const std::string format = read_string_attr(f, "format", h5_);
  IEVO_CHECK(format == kFormat, "checkpoint ", h5_, ": format '", format, "', expected '", kFormat, "'");
  const std::string algo = read_string_attr(f, "checksum_algorithm", h5_);
  IEVO_CHECK(algo == kChecksumAlgorithm, "checkpoint ", h5_, ": unknown checksum algorithm '", algo, "'");
  version_ = static_cast<int>(read_u64_attr(f, "format_version", "checkpoint " + h5_));
  IEVO_CHECK(version_ >= 1 && version_ <= kFormatVersion, "checkpoint ", h5_, ": format_version ",
             version_, " is not one this ievo reads (1..", kFormatVersion, ")");

  const std::string state_text = read_text_file(state_path);
  if (version_ >= 2) {  // the side files must be the ones model.h5 was written with
    auto verify = [&](const std::string& path, const std::string& text, const char* attr) {
      const uint64_t stored = read_u64_attr(f, attr, "checkpoint " + h5_);
      const uint64_t actual = checkpoint_checksum(text.data(), text.size());
      IEVO_CHECK(stored == actual, "checkpoint ", path, " is corrupt: checksum ", actual, " but ",
                 h5_, " records ", stored);
    };
    verify(state_path, state_text, "state_json_checksum");
    IEVO_CHECK(fs::exists(config_path, ec), "checkpoint ", dir_, ": no config.json");
    verify(config_path, read_text_file(config_path), "config_json_checksum");
  }
  try {
    auto j = nlohmann::json::parse(state_text);
    const int version = j.at("format_version").get<int>();
    IEVO_CHECK(version <= kFormatVersion, "checkpoint ", state_path, ": format_version ", version,
               " is newer than this ievo reads (", kFormatVersion, ")");
    state_.step = j.at("step").get<int64_t>();
    state_.consumed_samples = j.at("consumed_samples").get<int64_t>();
    state_.seed = j.at("seed").get<uint64_t>();
    state_.config_yaml = j.at("config_yaml").get<std::string>();
    state_.extra = j.value("extra", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    IEVO_FAIL("checkpoint ", state_path, ": ", e.what());
  }
}

// Version 3 (launch/checkpoint_shards.h): state.json names the shard files; each records the
// checksums of state.json and config.json, checked when ShardSet opens them.
void CheckpointReader::open_sharded(const std::string& state_path, const std::string& config_path) {
  std::error_code ec;
  const std::string state_text = read_text_file(state_path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(state_text);
    version_ = j.at("format_version").get<int>();
  } catch (const nlohmann::json::exception& e) {
    IEVO_FAIL("checkpoint ", state_path, ": ", e.what(), " (no model.h5 either)");
  }
  IEVO_CHECK(version_ == 3, "checkpoint ", dir_, ": no model.h5 (state.json says format_version ",
             version_, ", which keeps its tensors there)");
  IEVO_CHECK(fs::exists(config_path, ec), "checkpoint ", dir_, ": no config.json");
  const std::string config_text = read_text_file(config_path);
  shards_ = std::make_shared<ShardSet>(dir_, j, checkpoint_checksum(state_text.data(), state_text.size()),
                                       checkpoint_checksum(config_text.data(), config_text.size()));
  h5_ = dir_ + "/" + shard_file_name(0);
  try {
    state_.step = j.at("step").get<int64_t>();
    state_.consumed_samples = j.at("consumed_samples").get<int64_t>();
    state_.seed = j.at("seed").get<uint64_t>();
    state_.config_yaml = j.at("config_yaml").get<std::string>();
    state_.extra = j.value("extra", nlohmann::json::object());
    groups_ = j.at("groups").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    IEVO_FAIL("checkpoint ", state_path, ": ", e.what());
  }
}

CheckpointReader::~CheckpointReader() {
  if (file_ >= 0) H5Fclose(static_cast<hid_t>(file_));
}

std::vector<std::string> CheckpointReader::groups() const {
  if (shards_) return groups_;
  return link_names(static_cast<hid_t>(file_), "checkpoint " + h5_);
}

bool CheckpointReader::has_group(const std::string& group) const {
  if (shards_) return std::find(groups_.begin(), groups_.end(), group) != groups_.end();
  const htri_t r = H5Lexists(static_cast<hid_t>(file_), group.c_str(), H5P_DEFAULT);
  H5Eclear2(H5E_DEFAULT);
  return r > 0;
}

std::vector<std::string> CheckpointReader::tensor_names(const std::string& group) const {
  const std::string where = "checkpoint " + h5_ + ": group /" + group;
  IEVO_CHECK(has_group(group), "checkpoint ", h5_, ": missing group /", group);
  if (shards_) return shards_->tensor_names();
  H5Id g(H5Gopen2(static_cast<hid_t>(file_), group.c_str(), H5P_DEFAULT), H5Gclose);
  H5_CHECK(g.ok(), where, ": cannot open");
  return link_names(g, where);
}

Tensor CheckpointReader::read(const std::string& group, const std::string& name) const {
  const std::string where = "checkpoint " + h5_ + ": dataset /" + group + "/" + name;
  IEVO_CHECK(has_group(group), "checkpoint ", h5_, ": missing group /", group);
  if (shards_) return shards_->read(group, name);
  H5Id g(H5Gopen2(static_cast<hid_t>(file_), group.c_str(), H5P_DEFAULT), H5Gclose);
  H5_CHECK(g.ok(), where, ": cannot open its group");
  const htri_t exists = H5Lexists(g, name.c_str(), H5P_DEFAULT);
  H5Eclear2(H5E_DEFAULT);
  IEVO_CHECK(exists > 0, "checkpoint ", h5_, ": missing dataset /", group, "/", name);
  H5Id ds(H5Dopen2(g, name.c_str(), H5P_DEFAULT), H5Dclose);
  H5_CHECK(ds.ok(), where, ": cannot open");
  H5Id type(H5Dget_type(ds), H5Tclose);
  H5Id space(H5Dget_space(ds), H5Sclose);
  H5_CHECK(type.ok() && space.ok(), where, ": cannot read its type");
  const size_t tsize = H5Tget_size(type);
  IEVO_CHECK(H5Tget_class(type) == H5T_FLOAT && (tsize == 4 || tsize == 8), where,
             " is not f32 or f64");
  const int rank = H5Sget_simple_extent_ndims(space);
  H5_CHECK(rank >= 0, where, ": cannot read its shape");
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  const DType fdt = tsize == 4 ? DType::F32 : DType::F64;
  Tensor t = Tensor::empty(Shape(dims.begin(), dims.end()), fdt);
  if (t.numel() > 0)
    H5_CHECK(H5Dread(ds, fdt == DType::F32 ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE, H5S_ALL,
                     H5S_ALL, H5P_DEFAULT, t.raw()) >= 0,
             where, ": read failed");
  IEVO_CHECK(H5Aexists(ds, "checksum") > 0, where, " has no checksum attribute");
  const uint64_t stored = read_u64_attr(ds, "checksum", where);
  const uint64_t actual = checkpoint_checksum(t.raw(), t.nbytes());
  IEVO_CHECK(stored == actual, where, " is corrupt: checksum ", actual, " but ", stored,
             " was stored");
  return t;
}

void CheckpointReader::read_into(const std::string& group, ParamStore& s) const {
  for (auto& n : tensor_names(group))
    IEVO_CHECK(s.has(n), "checkpoint ", h5_, ": dataset /", group, "/", n,
               " is not a parameter of the model (does the model config match?)");
  for (size_t i = 0; i < s.size(); ++i) {
    const std::string& name = s.spec(i).name;
    Tensor t = read(group, name);
    IEVO_CHECK(t.shape() == s.spec(i).shape, "checkpoint ", h5_, ": dataset /", group, "/", name,
               " has shape ", shape_str(t.shape()), ", expected ", shape_str(s.spec(i).shape));
    s[i].copy_from(t.dtype() == s.dtype() ? t : t.to(s.dtype()));
  }
}

std::vector<std::string> checkpoint_groups(const std::string& ckpt_dir) {
  return CheckpointReader(ckpt_dir).groups();
}

CheckpointState load_checkpoint(const std::string& ckpt_dir,
                                const std::vector<std::pair<std::string, ParamStore*>>& groups,
                                bool optimizer_optional) {
  CheckpointReader r(ckpt_dir);
  for (auto& [name, store] : groups) {
    IEVO_CHECK(store != nullptr, "load_checkpoint: group ", name, " has no store");
    if (!r.has_group(name)) {
      IEVO_CHECK(optimizer_optional && name != "params", "checkpoint ", ckpt_dir,
                 "/model.h5: missing group /", name);
      store->zero();
      continue;
    }
    r.read_into(name, *store);
  }
  return r.state();
}

ModelConfig read_checkpoint_model_config(const std::string& ckpt_dir) {
  return read_hf_model_config(ckpt_dir);
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir) {
  const fs::path dir = fs::path(run_dir) / "checkpoints";
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (is_step_name(n) && e.is_directory(ec)) out.emplace_back(std::stoll(n.substr(5)), e.path().string());
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.first > b.first; });
  return out;
}

std::string latest_checkpoint(const std::string& run_dir) {
  const fs::path dir = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "";
  auto complete = [&](const fs::path& p) {
    return fs::exists(p / "state.json", ec) &&
           (fs::exists(p / "model.h5", ec) || fs::exists(p / shard_file_name(0), ec));
  };
  if (fs::exists(dir / "latest", ec)) {
    std::string name = read_text_file((dir / "latest").string());
    while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
    if (is_step_name(name) && complete(dir / name)) return (dir / name).string();
  }
  for (auto& [step, path] : list_checkpoints(run_dir))
    if (complete(path)) return path;
  return "";
}

}  // namespace ievo
