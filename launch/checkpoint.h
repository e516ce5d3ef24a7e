// Training checkpoints (HDF5), one directory per saved step:
//
//   RUN_DIR/checkpoints/step_<N>/
//     model.h5     root attributes: format = "ievo-checkpoint", format_version = 1,
//                  checksum_algorithm = "fnv1a64-1MiB-blocks"
//                  groups /params, /exp_avg, /exp_avg_sq (whichever were saved), one dataset per
//                  tensor named by its global HF-Llama name ("/params/model.layers.0.self_attn.
//                  q_proj.weight"), global shape, f32 (f64 for f64 stores), contiguous; each
//                  dataset has a uint64 attribute "checksum" of its little-endian bytes, checked on
//                  load (a mismatch is reported as a corrupt file)
//     config.json  the HF model config (hf_model_config_json), so the directory is self-describing
//     state.json   {"format_version", "step", "consumed_samples", "seed", "config_yaml",
//                   "ievo_version", "groups", "extra": <trainer's scheduler / RNG / data state>}
//   RUN_DIR/checkpoints/latest   the directory name of the newest complete checkpoint
//
// A checkpoint is written into step_<N>.tmp, every file fsync'ed, then renamed to step_<N>
// (replacing an older one of the same step) and only then is `latest` rewritten (temp + rename),
// so a crash leaves either the previous checkpoint or the new one, never a half-written one.
// Sharded saves (ZeRO / tensor parallel, later) keep this layout: the datasets stay global and
// ranks write row ranges of them (hyperslabs), or per-rank files joined by virtual datasets in
// model.h5; readers are unaffected. Tensors are converted to the store's dtype and device on load.
#pragma once
#include <cstdint>
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

// Saves into ckpt_dir (".../checkpoints/step_N"); one process writes (rank 0 with full stores). Groups are named stores, e.g.
// {{"params", &params}, {"exp_avg", &m}, {"exp_avg_sq", &v}}; any dtype/device. With
// update_latest, the parent directory's `latest` names ckpt_dir afterwards.
void save_checkpoint(const std::string& ckpt_dir, const ModelConfig& c, const CheckpointState& state,
                     const std::vector<std::pair<std::string, const ParamStore*>>& groups,
                     bool update_latest = true);

// Loads the requested groups into the stores (their specs must match the file's datasets one to
// one: a missing or extra tensor, a shape mismatch or a checksum mismatch is an error naming
// the file and dataset). A requested group absent from the file is an error, except groups
// other than "params" when optimizer_optional: those stores are zeroed instead.
CheckpointState load_checkpoint(const std::string& ckpt_dir,
                                const std::vector<std::pair<std::string, ParamStore*>>& groups,
                                bool optimizer_optional);

// CKPT_DIR/config.json as a ModelConfig.
ModelConfig read_checkpoint_model_config(const std::string& ckpt_dir);
// The groups stored in CKPT_DIR/model.h5 ("params", "exp_avg", ...).
std::vector<std::string> checkpoint_groups(const std::string& ckpt_dir);
// RUN_DIR/checkpoints/step_<step>.
std::string checkpoint_dir(const std::string& run_dir, int64_t step);
// The newest complete checkpoint directory of RUN_DIR (full path): the one `latest` names, or,
// if that is missing or incomplete, the highest step_<N> holding state.json; "" if none.
std::string latest_checkpoint(const std::string& run_dir);

// The checksum stored with each dataset: FNV-1a 64 of every 1 MiB block of the bytes (in
// parallel), then FNV-1a 64 over the blocks' digests as little-endian bytes.
uint64_t checkpoint_checksum(const void* data, size_t bytes);

}  // namespace ievo
