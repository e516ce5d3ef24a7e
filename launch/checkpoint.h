// Training checkpoints (HDF5), one directory per saved step. The format is specified precisely in
// docs/checkpoint-format.md; in short:
//
//   RUN_DIR/checkpoints/step_<N>/
//     config.json  the HF model config (hf_model_config_json), so the directory is self-describing
//     state.json   {"format_version", "step", "consumed_samples", "seed", "config_yaml",
//                   "ievo_version", "groups", "extra": <trainer's scheduler / RNG / data state>}
//     model.h5     root attributes: format = "ievo-checkpoint", format_version = 2,
//                  checksum_algorithm = "fnv1a64-1MiB-blocks", state_json_checksum and
//                  config_json_checksum (u64, of those files' exact bytes);
//                  groups /params, /exp_avg, /exp_avg_sq (whichever were saved), one dataset per
//                  tensor named by its global HF-Llama name ("/params/model.layers.0.self_attn.
//                  q_proj.weight"), global shape, f32 (f64 for f64 stores), contiguous; each
//                  dataset has a uint64 attribute "checksum" of its little-endian bytes, checked on
//                  load (a mismatch is reported as a corrupt file)
//   RUN_DIR/checkpoints/latest   the directory name of the newest complete checkpoint
//
// A checkpoint is written into step_<N>.tmp (config.json, state.json, then model.h5 last), every
// file fsync'ed, then renamed to step_<N> (replacing an older one of the same step) and only then
// is `latest` rewritten (temp + rename), so a crash leaves either the previous checkpoint or the
// new one, never a half-written one. A save that fails removes step_<N>.tmp and throws.
// Version 3 (several ranks; launch/checkpoint_shards.h): no model.h5; every rank writes the
// pieces of the state it owns into step_<N>/model-rank<R>.h5 and state.json lists those files.
// Readers see global tensors (full shape, HF names) whatever layout wrote them: CheckpointReader
// assembles them from the pieces (every piece's checksum checked, coverage complete), and every
// reader takes the slices it needs. Versions 1 (no side-file checksums) and 2 are still read.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/model_config.h"
#include "models/params.h"

namespace ievo {

struct CheckpointState {
  int64_t step = 0;
  int64_t consumed_samples = 0;
  uint64_t seed = 0;
  std::string config_yaml;  // the resolved training config
  nlohmann::json extra;     // anything else the trainer wants back (scheduler, RNG, data state)
};

// Named tensors saved as one HDF5 group; any dtype (f64 stays f64, everything else becomes f32),
// any device, views allowed.
struct CheckpointGroup {
  std::string name;
  std::vector<std::pair<std::string, Tensor>> tensors;
};
// Views of a store's tensors.
CheckpointGroup checkpoint_group(const std::string& name, const ParamStore& s);

// Saves into ckpt_dir (".../checkpoints/step_N") as version 2 (one model.h5); one process writes. Groups are named stores, e.g.
// {{"params", &params}, {"exp_avg", &m}, {"exp_avg_sq", &v}}; any dtype/device. With
// update_latest, the parent directory's `latest` names ckpt_dir afterwards.
void save_checkpoint(const std::string& ckpt_dir, const ModelConfig& c, const CheckpointState& state,
                     const std::vector<std::pair<std::string, const ParamStore*>>& groups,
                     bool update_latest = true);
// The same from tensor lists (host snapshots of the async writer, gathered shards).
void save_checkpoint_groups(const std::string& ckpt_dir, const ModelConfig& c,
                            const CheckpointState& state, const std::vector<CheckpointGroup>& groups,
                            bool update_latest = true);

// Loads the requested groups into the stores (their specs must match the file's datasets one to
// one: a missing or extra tensor, a shape mismatch or a checksum mismatch is an error naming
// the file and dataset). A requested group absent from the file is an error, except groups
// other than "params" when optimizer_optional: those stores are zeroed instead.
CheckpointState load_checkpoint(const std::string& ckpt_dir,
                                const std::vector<std::pair<std::string, ParamStore*>>& groups,
                                bool optimizer_optional);

// One checkpoint opened for reading. Opening checks that the directory is complete, the format and
// version, and state.json / config.json against the checksums model.h5 records; every tensor read
// is checked against its own checksum. Errors name the file (and dataset). For resharding: any
// layout reads the global tensors and keeps the slice it owns.
class ShardSet;  // launch/checkpoint_shards.h

class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& ckpt_dir);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  const std::string& dir() const { return dir_; }
  const CheckpointState& state() const { return state_; }
  int format_version() const { return version_; }
  std::vector<std::string> groups() const;
  std::vector<std::string> tensor_names(const std::string& group) const;
  bool has_group(const std::string& group) const;
  // The whole tensor, f32 or f64 as stored, on the CPU, checksum-verified.
  Tensor read(const std::string& group, const std::string& name) const;
  // Every tensor of `group` into `s` (names and shapes must match one to one), converted to the
  // store's dtype and device.
  void read_into(const std::string& group, ParamStore& s) const;

 private:
  void open_sharded(const std::string& state_path, const std::string& config_path);

  std::string dir_, h5_;
  int64_t file_ = -1;  // hid_t (versions 1-2: model.h5)
  std::shared_ptr<ShardSet> shards_;  // version 3: the per-rank shard files
  std::vector<std::string> groups_;   // version 3: state.json's groups
  int version_ = 0;
  CheckpointState state_;
};

// CKPT_DIR/config.json as a ModelConfig.
ModelConfig read_checkpoint_model_config(const std::string& ckpt_dir);
// The groups stored in CKPT_DIR/model.h5 ("params", "exp_avg", ...).
std::vector<std::string> checkpoint_groups(const std::string& ckpt_dir);
// RUN_DIR/checkpoints/step_<step>.
std::string checkpoint_dir(const std::string& run_dir, int64_t step);
// The newest complete checkpoint directory of RUN_DIR (full path): the one `latest` names, or,
// if that is missing or incomplete, the highest step_<N> holding state.json; "" if none.
std::string latest_checkpoint(const std::string& run_dir);
// The step_<N> directories of RUN_DIR/checkpoints as (N, full path), highest N first; names
// that are not exactly "step_" + digits (step_7.tmp, ...) are skipped.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir);

// The checksum stored with each dataset: FNV-1a 64 of every 1 MiB block of the bytes (in
// parallel), then FNV-1a 64 over the blocks' digests as little-endian bytes.
uint64_t checkpoint_checksum(const void* data, size_t bytes);

}  // namespace ievo
