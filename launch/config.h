// The training configuration: YAML file + `--set key.sub=value` overrides, validated against a
// schema of known keys. An unknown key, a wrong type or a missing required key is an error that
// names the key, and the file and line where known. The resolved config can be written back as
// YAML (into the run directory and every checkpoint).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/model_config.h"

namespace ievo {

struct RunConfig {
  std::string dir = "runs/default";
  uint64_t seed = 1234;
  std::string device = "cpu";  // cpu | cuda
  bool deterministic = false;
};

struct ModelSection {
  std::string init_from_hf;  // HF directory; when set the architecture comes from its config.json
  ModelConfig model;         // arch, sizes, rope_theta, norm_eps, tie_embeddings, init_std
  std::string checkpointing = "none";  // none | full | selective
};

struct DataConfig {
  std::vector<std::string> paths;  // Megatron prefixes (PREFIX.bin / PREFIX.idx)
  std::vector<double> weights;     // blending weights, one per path (default: equal)
  int64_t seq_len = 0;
  bool shuffle = true;
  bool synthetic = false;          // random tokens instead of files (benchmarks)
};

struct TrainConfig {
  int64_t steps = 0;
  int64_t global_batch_size = 0;  // sequences per optimiser step
  int64_t micro_batch_size = 0;   // sequences per forward/backward
  std::string precision = "fp32";  // fp32 | bf16
  int64_t log_every = 1;
};

struct OptimConfig {
  double lr = 3e-4, min_lr = 0.0, weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double grad_clip = 1.0;  // 0: no clipping
};

struct ScheduleConfig {
  std::string kind = "cosine";  // constant | cosine | linear | wsd
  int64_t warmup_steps = 0;
  double decay_fraction = 0.1;  // wsd: fraction of steps in the final linear decay
};

struct CheckpointConfig {
  int64_t every = 0;  // 0: only at the end
};

struct Config {
  std::string source;  // file it was read from
  RunConfig run;
  ModelSection model;
  DataConfig data;
  TrainConfig train;
  OptimConfig optim;
  ScheduleConfig schedule;
  CheckpointConfig checkpoint;
};

// Reads `path`, applies overrides ("key.sub=value", value parsed as YAML), validates.
// When model.init_from_hf is set, model.* sizes come from HF_DIR/config.json (given sizes that
// disagree are an error naming the key).
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same, from a YAML string (tests); `name` is used in messages.
Config load_config_string(const std::string& yaml, const std::string& name,
                          const std::vector<std::string>& overrides = {});
// Resolved config as YAML (every key, defaults filled in).
std::string config_to_yaml(const Config& c);

// The schema of known keys, in table order (for docs/config.md, `--help` and tests).
struct ConfigKeyInfo {
  std::string key;            // dotted path, e.g. "train.steps"
  std::string type;           // int, float, bool, string, list of strings, list of floats, or "a | b"
  std::string default_value;  // as YAML, from a default-constructed Config
  std::string required;       // "" (optional), "yes", "unless data.synthetic", ...
  std::string description;
};
std::vector<ConfigKeyInfo> config_schema();

}  // namespace ievo
