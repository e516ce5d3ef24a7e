#include "launch/checkpoint_shards.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>

#include "launch/checkpoint_h5.h"
#include "launch/fault_injection.h"
#include "launch/log.h"
#include "launch/resume.h"
#include "models/atomic_file.h"
#include "models/hf_adapter.h"
#include "models/hf_config.h"

#ifndef IEVO_VERSION
#define IEVO_VERSION "unknown"
#endif

namespace fs = std::filesystem;

namespace ievo {

using namespace ckpt_h5;

namespace {

constexpr int kVersion = 3;
constexpr const char* kShardFormat = "ievo-checkpoint-shard";
constexpr const char* kChecksumAlgorithm = "fnv1a64-1MiB-blocks";

void write_dims_attr(hid_t obj, const char* name, const Shape& s, const std::string& where) {
  std::vector<uint64_t> v(s.begin(), s.end());
  const hsize_t n = v.size();
  H5Id space(n == 0 ? H5Screate(H5S_NULL) : H5Screate_simple(1, &n, nullptr), H5Sclose);
  H5Id a(H5Acreate2(obj, name, H5T_STD_U64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  H5_CHECK(a.ok() && (n == 0 || H5Awrite(a, H5T_NATIVE_UINT64, v.data()) >= 0), where,
           ": cannot write attribute ", name);
}

Shape read_dims_attr(hid_t obj, const char* name, const std::string& where) {
  H5_CHECK(H5Aexists(obj, name) > 0, where, ": no attribute '", name, "'");
  H5Id a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  H5Id space(H5Aget_space(a), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space);
  H5_CHECK(n >= 0 && n <= 8, where, ": bad attribute ", name);
  std::vector<uint64_t> v(static_cast<size_t>(n));
  if (n > 0) H5_CHECK(H5Aread(a, H5T_NATIVE_UINT64, v.data()) >= 0, where, ": cannot read attribute ", name);
  return Shape(v.begin(), v.end());
}

// split_dim is -1 for an unsplit tensor: stored as split_dim + 1 (unsigned).
void write_piece(hid_t g, const CheckpointPiece& p, const Tensor& t, const std::string& file,
                 const std::string& group) {
  const std::string where = "checkpoint " + file + ": dataset /" + group + "/" + p.name;
  IEVO_CHECK(t.is_cpu() && t.is_contiguous() && t.numel() == p.end - p.begin &&
                 (t.dtype() == DType::F32 || t.dtype() == DType::F64),
             where, ": the piece is not a host f32/f64 tensor of ", p.end - p.begin, " elements");
  const bool f64 = t.dtype() == DType::F64;
  const hsize_t n = static_cast<hsize_t>(t.numel());
  H5Id space(H5Screate_simple(1, &n, nullptr), H5Sclose);
  H5Id ds(H5Dcreate2(g, p.name.c_str(), f64 ? H5T_IEEE_F64LE : H5T_IEEE_F32LE, space, H5P_DEFAULT,
                     H5P_DEFAULT, H5P_DEFAULT),
          H5Dclose);
  H5_CHECK(space.ok() && ds.ok(), where, ": cannot create");
  if (n > 0)
    H5_CHECK(H5Dwrite(ds, f64 ? H5T_NATIVE_DOUBLE : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL,
                      H5P_DEFAULT, t.raw()) >= 0,
             where, ": write failed");
  write_dims_attr(ds, "global_shape", p.global_shape, where);
  write_dims_attr(ds, "local_shape", p.local_shape, where);
  write_u64_attr(ds, "split_dim", static_cast<uint64_t>(p.split_dim + 1), where);
  write_u64_attr(ds, "split_offset", static_cast<uint64_t>(p.split_offset), where);
  write_u64_attr(ds, "begin", static_cast<uint64_t>(p.begin), where);
  write_u64_attr(ds, "end", static_cast<uint64_t>(p.end), where);
  write_u64_attr(ds, "checksum", checkpoint_checksum(t.raw(), t.nbytes()), where);
  H5_CHECK(ds.close() >= 0, where, ": write failed");
}

void write_shard_file(const std::string& path, int rank, int world, uint64_t state_sum,
                      uint64_t config_sum, const std::vector<std::string>& groups,
                      const std::vector<CheckpointPiece>& pieces, int64_t step) {
  h5_init();
  H5Id fapl = file_access_plist();
  hid_t fid = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
  H5_CHECK(fid >= 0, "checkpoint ", path, ": cannot create");
  try {  // closed explicitly: a failing close (the last flush) must be reported
    write_string_attr(fid, "format", kShardFormat, path);
    write_u64_attr(fid, "format_version", kVersion, path);
    write_string_attr(fid, "checksum_algorithm", kChecksumAlgorithm, path);
    write_u64_attr(fid, "rank", static_cast<uint64_t>(rank), path);
    write_u64_attr(fid, "world_size", static_cast<uint64_t>(world), path);
    write_u64_attr(fid, "state_json_checksum", state_sum, path);
    write_u64_attr(fid, "config_json_checksum", config_sum, path);
    const size_t total = groups.size() * pieces.size();
    size_t done = 0;
    for (size_t k = 0; k < groups.size(); ++k) {
      H5Id g(H5Gcreate2(fid, groups[k].c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
      H5_CHECK(g.ok(), "checkpoint ", path, ": cannot create group /", groups[k]);
      write_u64_attr(g, "pieces", pieces.size(), "checkpoint " + path + ": group /" + groups[k]);
      for (const CheckpointPiece& p : pieces) {
        IEVO_CHECK(p.data.size() == groups.size(), "checkpoint ", path, ": piece ", p.name,
                   " has ", p.data.size(), " groups, expected ", groups.size());
        write_piece(g, p, p.data[k], path, groups[k]);
        if (++done == total / 2) {
          H5Fflush(fid, H5F_SCOPE_GLOBAL);  // a kill here leaves a half-written file
          fault_point("write", step, path);
        }
      }
    }
    if (total < 2) fault_point("write", step, path);
    H5_CHECK(H5Fflush(fid, H5F_SCOPE_GLOBAL) >= 0, "checkpoint ", path, ": flush failed");
  } catch (...) {
    H5Fclose(fid);
    H5Eclear2(H5E_DEFAULT);
    throw;
  }
  H5_CHECK(H5Fclose(fid) >= 0, "checkpoint ", path, ": close failed");
  fsync_path(path);
}

std::string normalized(const std::string& dir) {
  std::string d = fs::path(dir).lexically_normal().string();
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

// Runs fn on this rank (if `active`), then agrees over `world` whether it failed anywhere. On
// failure every rank throws: the failing ones their own error, the others one naming the step.
template <class F>
void collective_step(Communicator& world, bool active, const std::string& what, F&& fn,
                     const std::function<void()>& on_failure) {
  std::string error;
  if (active) {
    try {
      fn();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  const int64_t failed = world.all_reduce_sum(static_cast<int64_t>(!error.empty()));
  if (failed == 0) return;
  on_failure();
  if (!error.empty()) IEVO_FAIL(error, " (the previous checkpoint is untouched)");
  IEVO_FAIL(what, " failed on ", failed, " other rank(s) (their errors name the files); the "
            "previous checkpoint is untouched");
}

}  // namespace

std::string shard_file_name(int rank) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "model-rank%05d.h5", rank);
  return buf;
}

// Steps 1-2 (collective): rank 0 makes an empty step_N.tmp (a leftover of an interrupted save
// is removed); the ranks agree which of them write (state.json lists their files); rank 0 builds
// the side files and shares their checksums, which every shard file records (a stale or foreign
// shard file is so detected on load).
ShardedSave begin_sharded_save(const std::string& ckpt_dir, const ModelConfig& c,
                               const CheckpointState& state, const std::vector<std::string>& groups,
                               const std::vector<ParamSpec>& global_specs, bool writes,
                               Communicator& world, bool update_latest) {
  ShardedSave sv;
  const int rank = world.rank(), n = world.size();
  sv.final_dir = normalized(ckpt_dir);
  sv.tmp = sv.final_dir + ".tmp";
  sv.step = state.step;
  sv.groups = groups;
  sv.writes = writes;
  sv.update_latest = update_latest;
  sv.file = (fs::path(sv.tmp) / shard_file_name(rank)).string();
  IEVO_CHECK(rank != 0 || writes, "save_sharded_checkpoint: rank 0 must write a shard file");
  collective_step(world, rank == 0, "checkpoint " + sv.final_dir, [&] {
    std::error_code ec;
    fs::remove_all(sv.tmp, ec);
    fs::create_directories(sv.tmp, ec);
    IEVO_CHECK(!ec, "checkpoint ", sv.tmp, ": cannot create the directory: ", ec.message());
  }, [&] {
    std::error_code ec;
    if (rank == 0) fs::remove_all(sv.tmp, ec);
  });

  Tensor flags = Tensor::zeros({n}, DType::F64);
  flags.data<double>()[rank] = writes ? 1.0 : 0.0;
  world.all_reduce(flags);
  int64_t sums[2] = {0, 0};
  if (rank == 0) {
    sv.config_text = hf_model_config_json(c, "float32").dump(2) + "\n";
    nlohmann::json shards = nlohmann::json::array(), tensors = nlohmann::json::object();
    for (int r = 0; r < n; ++r)
      if (flags.data<double>()[r] > 0.5) shards.push_back(shard_file_name(r));
    for (const ParamSpec& s : global_specs)
      tensors[s.name] = {{"shape", s.global()}, {"numel", shape_numel(s.global())}};
    nlohmann::json st = {{"format_version", kVersion},
                         {"step", state.step},
                         {"consumed_samples", state.consumed_samples},
                         {"seed", state.seed},
                         {"config_yaml", state.config_yaml},
                         {"ievo_version", IEVO_VERSION},
                         {"groups", groups},
                         {"shards", shards},
                         {"tensors", tensors},
                         {"extra", state.extra.is_null() ? nlohmann::json::object() : state.extra}};
    sv.state_text = st.dump(2) + "\n";
    sums[0] = static_cast<int64_t>(checkpoint_checksum(sv.state_text.data(), sv.state_text.size()));
    sums[1] = static_cast<int64_t>(checkpoint_checksum(sv.config_text.data(), sv.config_text.size()));
  }
  for (int64_t& x : sums) x = world.all_reduce_sum(rank == 0 ? x : int64_t{0});
  sv.state_sum = static_cast<uint64_t>(sums[0]);
  sv.config_sum = static_cast<uint64_t>(sums[1]);
  sv.rank = rank;
  sv.world_size = n;
  return sv;
}

// Step 3 (this rank only, any thread): its file, fsynced.
void write_sharded_file(const ShardedSave& sv, const std::vector<CheckpointPiece>& pieces) {
  if (!sv.writes) return;
  write_shard_file(sv.file, sv.rank, sv.world_size, sv.state_sum, sv.config_sum, sv.groups, pieces,
                   sv.step);
}

// Steps 4-5 (collective): the ranks agree that every file was written (`error`: this rank's
// failure, "" if none); then rank 0 writes the side files, renames step_N.tmp and updates
// `latest` (the same protocol as one process).
void finish_sharded_save(const ShardedSave& sv, const std::string& error, Communicator& world) {
  const int rank = world.rank();
  const std::string what = "checkpoint " + sv.final_dir;
  collective_step(world, true, what, [&] {
    if (!error.empty()) throw Error(error);
  }, [&] {
    std::error_code ec;
    if (rank == 0) fs::remove_all(sv.tmp, ec);
  });
  collective_step(world, rank == 0, what, [&] {
    try {
      write_file_atomic((fs::path(sv.tmp) / "config.json").string(), sv.config_text);
      write_file_atomic((fs::path(sv.tmp) / "state.json").string(), sv.state_text);
      fsync_path(sv.tmp);
      replace_directory(sv.tmp, sv.final_dir);
    } catch (...) {
      std::error_code ec;
      fs::remove_all(sv.tmp, ec);
      throw;
    }
    fault_point("renamed", sv.step);
    if (sv.update_latest) {
      const fs::path parent = fs::path(sv.final_dir).parent_path();
      write_file_atomic(((parent.empty() ? fs::path(".") : parent) / "latest").string(),
                        fs::path(sv.final_dir).filename().string() + "\n");
    }
    fault_point("saved", sv.step);
  }, [] {});
}

void save_sharded_checkpoint(const std::string& ckpt_dir, const ModelConfig& c,
                             const CheckpointState& state, const std::vector<std::string>& groups,
                             const std::vector<ParamSpec>& global_specs,
                             const std::vector<CheckpointPiece>& pieces, bool writes,
                             Communicator& world, bool update_latest) {
  const ShardedSave sv =
      begin_sharded_save(ckpt_dir, c, state, groups, global_specs, writes, world, update_latest);
  std::string error;
  try {
    write_sharded_file(sv, pieces);
  } catch (const std::exception& e) {
    error = e.what();
  }
  finish_sharded_save(sv, error, world);
}

// ---- reading -------------------------------------------------------------------------------

ShardSet::ShardSet(const std::string& dir, const nlohmann::json& state, uint64_t state_checksum,
                   uint64_t config_checksum)
    : dir_(dir) {
  h5_init();
  const std::string sp = (fs::path(dir_) / "state.json").string();
  std::vector<std::string> groups;
  try {
    for (auto& [name, t] : state.at("tensors").items())
      shapes_[name] = t.at("shape").get<Shape>();
    groups = state.at("groups").get<std::vector<std::string>>();
    for (auto& f : state.at("shards")) paths_.push_back((fs::path(dir_) / f.get<std::string>()).string());
  } catch (const nlohmann::json::exception& e) {
    IEVO_FAIL("checkpoint ", sp, ": ", e.what());
  }
  IEVO_CHECK(!paths_.empty(), "checkpoint ", sp, ": no shard files listed");
  std::error_code ec;
  for (size_t fi = 0; fi < paths_.size(); ++fi) {
    const std::string& path = paths_[fi];
    IEVO_CHECK(fs::exists(path, ec), "checkpoint ", dir_, ": missing shard file ", path,
               " (state.json lists ", paths_.size(), ")");
    H5Id fapl = file_access_plist();
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl);
    H5_CHECK(f >= 0, "checkpoint ", path, ": cannot open as HDF5 (truncated or corrupt?)");
    files_.push_back(f);
    const std::string format = read_string_attr(f, "format", path);
    IEVO_CHECK(format == kShardFormat, "checkpoint ", path, ": format '", format, "', expected '",
               kShardFormat, "'");
    IEVO_CHECK(read_string_attr(f, "checksum_algorithm", path) == kChecksumAlgorithm, "checkpoint ",
               path, ": unknown checksum algorithm");
    const std::string w = "checkpoint " + path;
    IEVO_CHECK(read_u64_attr(f, "state_json_checksum", w) == state_checksum, "checkpoint ", sp,
               " does not match ", path, " (the state.json checksum it records differs: a corrupt "
               "state.json or a shard file of another save)");
    IEVO_CHECK(read_u64_attr(f, "config_json_checksum", w) == config_checksum, "checkpoint ", dir_,
               "/config.json does not match ", path, " (corrupt config.json or a foreign shard file)");
    for (const std::string& group : groups) {
      const htri_t has = H5Lexists(f, group.c_str(), H5P_DEFAULT);
      H5Eclear2(H5E_DEFAULT);
      IEVO_CHECK(has > 0, "checkpoint ", path, ": missing group /", group);
      const std::string gw = w + ": group /" + group;
      H5Id g(H5Gopen2(f, group.c_str(), H5P_DEFAULT), H5Gclose);
      H5_CHECK(g.ok(), gw, ": cannot open");
      const std::vector<std::string> names = link_names(g, gw);
      const uint64_t count = read_u64_attr(g, "pieces", gw);
      IEVO_CHECK(names.size() == count, gw, " holds ", names.size(), " pieces but records ", count,
                 " (a piece is missing)");
      for (const std::string& name : names) {
        const std::string where = w + ": dataset /" + group + "/" + name;
        IEVO_CHECK(shapes_.count(name), where, " is not a tensor state.json lists");
        H5Id ds(H5Dopen2(g, name.c_str(), H5P_DEFAULT), H5Dclose);
        H5_CHECK(ds.ok(), where, ": cannot open");
        H5Id type(H5Dget_type(ds), H5Tclose);
        const size_t es = H5Tget_size(type);
        IEVO_CHECK(H5Tget_class(type) == H5T_FLOAT && (es == 4 || es == 8), where, " is not f32 or f64");
        PieceRef p{fi, read_dims_attr(ds, "local_shape", where),
                   static_cast<int>(read_u64_attr(ds, "split_dim", where)) - 1,
                   static_cast<int64_t>(read_u64_attr(ds, "split_offset", where)),
                   static_cast<int64_t>(read_u64_attr(ds, "begin", where)),
                   static_cast<int64_t>(read_u64_attr(ds, "end", where)), es};
        const Shape& gs = shapes_[name];
        IEVO_CHECK(read_dims_attr(ds, "global_shape", where) == gs, where,
                   ": global shape differs from state.json's ", shape_str(gs));
        // The local slice must fit the global tensor, and the range the local tensor.
        bool fits = p.local_shape.size() == gs.size() && p.split_dim < static_cast<int>(gs.size()) &&
                    p.begin <= p.end && p.end <= shape_numel(p.local_shape);
        for (size_t d = 0; fits && d < gs.size(); ++d)
          fits = static_cast<int>(d) == p.split_dim
                     ? p.split_offset + p.local_shape[d] <= gs[d]
                     : p.local_shape[d] == gs[d];
        IEVO_CHECK(fits, where, ": local shape ", shape_str(p.local_shape), " / split_dim ",
                   p.split_dim, " / offset ", p.split_offset, " / range [", p.begin, ", ", p.end,
                   ") do not fit the global shape ", shape_str(gs));
        pieces_[{group, name}].push_back(p);
      }
    }
  }
}

ShardSet::~ShardSet() {
  for (int64_t f : files_) H5Fclose(static_cast<hid_t>(f));
}

std::vector<std::string> ShardSet::tensor_names() const {
  std::vector<std::string> out;
  for (auto& [name, s] : shapes_) out.push_back(name);
  return out;
}

Tensor ShardSet::read(const std::string& group, const std::string& name) const {
  auto sit = shapes_.find(name);
  IEVO_CHECK(sit != shapes_.end(), "checkpoint ", dir_, ": missing tensor /", group, "/", name);
  const Shape& gs = sit->second;
  const int64_t numel = shape_numel(gs);
  auto pit = pieces_.find({group, name});
  static const std::vector<PieceRef> none;
  const std::vector<PieceRef>& ps = pit == pieces_.end() ? none : pit->second;
  const size_t es = ps.empty() ? 4 : ps[0].elem_size;
  Tensor out = Tensor::empty(gs, es == 8 ? DType::F64 : DType::F32);
  char* dst = static_cast<char*>(out.raw());
  std::vector<uint8_t> covered(static_cast<size_t>(numel), 0);
  int64_t count = 0;
  std::vector<char> buf;
  for (const PieceRef& p : ps) {
    const std::string where = "checkpoint " + paths_[p.file] + ": dataset /" + group + "/" + name;
    IEVO_CHECK(p.elem_size == es, where, ": mixed f32/f64 pieces");
    H5Id ds(H5Dopen2(static_cast<hid_t>(files_[p.file]), (group + "/" + name).c_str(), H5P_DEFAULT),
            H5Dclose);
    H5_CHECK(ds.ok(), where, ": cannot open");
    H5Id space(H5Dget_space(ds), H5Sclose);
    const int64_t n = p.end - p.begin;
    IEVO_CHECK(H5Sget_simple_extent_npoints(space) == n, where, " holds ",
               H5Sget_simple_extent_npoints(space), " elements, its range [", p.begin, ", ", p.end,
               ") says ", n);
    buf.resize(static_cast<size_t>(n) * es);
    if (n > 0)
      H5_CHECK(H5Dread(ds, es == 8 ? H5T_NATIVE_DOUBLE : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL,
                       H5P_DEFAULT, buf.data()) >= 0,
               where, ": read failed (truncated or corrupt file?)");
    const uint64_t stored = read_u64_attr(ds, "checksum", where);
    const uint64_t actual = checkpoint_checksum(buf.data(), buf.size());
    IEVO_CHECK(stored == actual, where, " is corrupt: checksum ", actual, " but ", stored,
               " was stored");
    // Local flat index i = (a, j) with a the index over the dimensions before split_dim and j
    // < L = local[d] * inner; it lands at a * G + offset * inner + j, G = global[d] * inner. So
    // each run of one `a` is contiguous in the global tensor (a whole tensor: one run).
    int64_t L = std::max<int64_t>(1, shape_numel(p.local_shape)), G = L, shift = 0;
    if (p.split_dim >= 0) {
      int64_t inner = 1;
      for (size_t d = static_cast<size_t>(p.split_dim) + 1; d < gs.size(); ++d) inner *= gs[d];
      L = p.local_shape[static_cast<size_t>(p.split_dim)] * inner;
      G = gs[static_cast<size_t>(p.split_dim)] * inner;
      shift = p.split_offset * inner;
    }
    for (int64_t i = p.begin; i < p.end;) {
      const int64_t a = i / L, j = i % L, run = std::min(p.end - i, L - j);
      const int64_t g0 = a * G + shift + j;
      std::memcpy(dst + g0 * static_cast<int64_t>(es), buf.data() + (i - p.begin) * static_cast<int64_t>(es),
                  static_cast<size_t>(run) * es);
      for (int64_t k = g0; k < g0 + run; ++k) count += covered[static_cast<size_t>(k)] == 0, covered[static_cast<size_t>(k)] = 1;
      i += run;
    }
  }
  if (count != numel) {
    int64_t first = 0;
    while (first < numel && covered[static_cast<size_t>(first)]) ++first;
    std::string files;
    for (auto& p : paths_) files += (files.empty() ? "" : ", ") + fs::path(p).filename().string();
    IEVO_FAIL("checkpoint ", dir_, ": tensor /", group, "/", name, " ", shape_str(gs),
              " is incomplete: the shard files (", files, ") cover ", count, " of ", numel,
              " elements (first missing: flat element ", first,
              "); a shard file or piece is missing");
  }
  return out;
}

}  // namespace ievo

namespace ievo {

std::vector<bool> owned_slices(const std::vector<ParamSpec>& mine, int mp_rank,
                               const std::function<std::vector<ParamSpec>(int)>& specs_of) {
  std::vector<bool> owned(mine.size(), true);
  for (int r = 0; r < mp_rank; ++r)
    for (const ParamSpec& o : specs_of(r))
      for (size_t i = 0; i < mine.size(); ++i)
        if (o.name == mine[i].name && o.split_dim == mine[i].split_dim &&
            o.split_offset == mine[i].split_offset && o.shape == mine[i].shape)
          owned[i] = false;
  return owned;
}

ShardedCheckpointer::ShardedCheckpointer(std::string run_dir, int64_t keep_last, bool async,
                                         Communicator& world)
    : run_dir_(std::move(run_dir)), keep_last_(keep_last), async_(async), world_(world) {}

ShardedCheckpointer::~ShardedCheckpointer() {
  if (worker_.joinable()) worker_.join();
}

void ShardedCheckpointer::save(const ModelConfig& c, const CheckpointState& state,
                               ZeroOptimizer& zero, const std::vector<ParamSpec>& specs,
                               const std::vector<bool>& owned, bool writes,
                               const std::vector<ParamSpec>& global_specs) {
  wait();  // at most one save in flight
  started_ = std::chrono::steady_clock::now();
  pieces_.clear();
  elems_ = 0;
  if (writes)
    for (auto& sp : zero.state_pieces()) {
      const ParamSpec& s = specs[sp.param];
      if (!owned[sp.param]) continue;
      CheckpointPiece p{s.name, s.global(), s.shape, s.split_dim, s.split_offset, sp.begin, sp.end, {}};
      for (const Tensor* t : {&sp.master, &sp.exp_avg, &sp.exp_avg_sq}) {  // host copies
        const DType dt = t->dtype() == DType::F64 ? DType::F64 : DType::F32;
        Tensor h = t->is_cpu() ? t->clone() : t->to(Device::CPU);
        p.data.push_back(h.dtype() == dt ? h : h.to(dt));
      }
      elems_ += sp.end - sp.begin;
      pieces_.push_back(std::move(p));
    }
  pending_ = std::make_unique<ShardedSave>(
      begin_sharded_save(checkpoint_dir(run_dir_, state.step), c, state,
                         {"params", "exp_avg", "exp_avg_sq"}, global_specs, writes, world_));
  error_.clear();
  if (!async_) {
    try {
      write_sharded_file(*pending_, pieces_);
    } catch (const std::exception& e) {
      error_ = e.what();
    }
    finish();
    return;
  }
  done_ = false;
  worker_ = std::thread([this] {
    try {
      write_sharded_file(*pending_, pieces_);
    } catch (const std::exception& e) {
      error_ = e.what();
    }
    done_ = true;
  });
}

void ShardedCheckpointer::poll() {
  if (!pending_) return;  // the same on every rank: saves are collective
  if (world_.all_reduce_sum(static_cast<int64_t>(!done_)) > 0) return;
  finish();
}

void ShardedCheckpointer::wait() {
  if (!pending_) return;
  if (worker_.joinable()) worker_.join();
  finish();
}

void ShardedCheckpointer::finish() {
  if (worker_.joinable()) worker_.join();
  const std::unique_ptr<ShardedSave> sv = std::move(pending_);
  pieces_.clear();
  std::string error;
  error.swap(error_);
  try {
    finish_sharded_save(*sv, error, world_);
  } catch (const std::exception& e) {
    if (async_)
      IEVO_FAIL("checkpoint.async: the background checkpoint write failed: ", e.what());
    throw;
  }
  const int64_t total = world_.all_reduce_sum(elems_);
  const int64_t files = world_.all_reduce_sum(static_cast<int64_t>(sv->writes));
  if (world_.rank() != 0) return;
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  log_info("ievo: saved %s (%lld shard files of %d ranks, %.1f MiB of f32 state, %.2f s%s)",
           sv->final_dir.c_str(), static_cast<long long>(files), world_.size(),
           static_cast<double>(total) * 12.0 / (1 << 20), s, async_ ? ", in the background" : "");
  for (int64_t step : prune_checkpoints(run_dir_, sv->step, keep_last_))
    log_info("ievo: checkpoint.keep_last=%lld: removed step_%lld",
             static_cast<long long>(keep_last_), static_cast<long long>(step));
}

}  // namespace ievo
