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
  int64_t head_chunk_tokens = 0;       // LM head tokens at once; 0: Llama's default
};

struct DataConfig {
  std::vector<std::string> paths;  // Megatron prefixes (PREFIX.bin / PREFIX.idx)
  std::vector<double> weights;     // blending weights, one per path (default: equal)
  int64_t seq_len = 0;
  bool shuffle = true;
  bool synthetic = false;          // random tokens instead of files (benchmarks)
  bool packing = false;            // documents packed with cu_seqlens (data/packed_dataset.h)
  std::vector<std::string> valid_paths;  // validation set prefixes (launch/validation.h)
};

struct TrainConfig {
  int64_t steps = 0;
  int64_t global_batch_size = 0;  // sequences per optimiser step
  int64_t micro_batch_size = 0;   // sequences per forward/backward
  std::string precision = "fp32";  // fp32 | bf16 | fp16 (dynamic loss scaling, fp16.*)
  int64_t log_every = 1;
  int64_t max_skips_in_a_row = 5;  // non-finite steps in a row before aborting
  std::string max_time;            // "4h", "30m", "90s", seconds; "": no limit
  int64_t eval_every = 0;          // validate every N steps; 0: after the last step only
  int64_t eval_batches = 8;        // validation micro-batches per evaluation
};

struct OptimConfig {
  double lr = 3e-4, min_lr = 0.0, weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double grad_clip = 1.0;  // 0: no clipping
  // bf16: the f32 master weights kept as 16-bit remainders of the bf16 weights (ZeroConfig)
  bool param_remainders = true;
};

struct ScheduleConfig {
  std::string kind = "cosine";  // constant | cosine | linear | wsd
  int64_t warmup_steps = 0;
  double decay_fraction = 0.1;  // wsd: fraction of steps in the final linear decay
};

struct CheckpointConfig {
  int64_t every = 0;  // 0: only at the end
  std::string resume = "auto";  // auto | none | PATH of a checkpoint directory (launch/resume.h)
  int64_t keep_last = 0;        // keep the K newest checkpoints; 0: keep all
  bool async = false;           // write in a background thread from a host copy
  bool overwrite = false;       // resume: none may replace a run directory's checkpoints
  bool at_end = true;           // save after the last step (off for benchmarks)
};

struct MetricsConfig {
  bool tensorboard = false;  // TensorBoard event file beside metrics.jsonl (rank 0)
};

// Dynamic loss scaling for train.precision: fp16 (optim/loss_scaler.h).
struct Fp16Config {
  double initial_scale = 65536, min_scale = 1, max_scale = 16777216;
  double growth_factor = 2, backoff_factor = 0.5;
  int64_t growth_interval = 1000, hysteresis = 2;
};

// Test hooks (launch/numerics.h).
struct DebugConfig {
  int64_t nan_at_step = 0;  // poison a gradient with NaN at this step; 0: off
  int64_t nan_steps = 1;    // ... and at the steps after it, this many in all
  std::string nan_param;    // the parameter whose gradient is poisoned; "": the first one
};

// Parallel layout (parallel/topology.h, parallel/zero.h). dp = world size / (tensor x pipeline).
struct ParallelConfig {
  int64_t tensor = 1, pipeline = 1;  // tensor-parallel size, pipeline stages
  std::string sequence = "none";     // none | megatron | ulysses (parallel/tensor_parallel.h)
  int64_t sequence_size = 1;         // Ulysses ranks per sequence group
  std::string schedule = "1f1b";     // gpipe | 1f1b | interleaved (parallel/pipeline_schedule.h)
  int64_t virtual_stages = 1;        // interleaved: model chunks per pipeline rank
  std::vector<int64_t> pipeline_layers;  // blocks per virtual stage; empty: balanced
  int64_t zero = 0;                  // ZeRO stage 0..3
  double bucket_mb = 25;             // gradient / gather bucket size
  double timeout_s = 1800;           // multi-rank: abort when a rank makes no progress this long
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
  ParallelConfig parallel;
  MetricsConfig metrics;
  Fp16Config fp16;
  DebugConfig debug;
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
