#include "launch/dry_run.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <vector>

#include "data/packed_dataset.h"
#include "launch/duration.h"
#include "launch/perf_plan.h"
#include "models/safetensors.h"
#include "parallel/batch_split.h"
#include "parallel/plan.h"
#include "parallel/topology.h"
#include "runtime/error.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/cuda.h"
#endif

namespace ievo {
namespace {

std::string device_note(const Config& cfg) {
  if (cfg.run.device != "cuda") return "cpu";
#ifdef IEVO_CUDA
  const int n = cuda::device_count();
  if (n > 0) return detail::cat("cuda (", n, " GPU", n > 1 ? "s" : "", " visible)");
  return "cuda: NOTE no GPU is visible here; the config and data were validated, but training "
         "would fail at start";
#else
  return "cuda: NOTE this ievo was built without CUDA; the config and data were validated, but "
         "training needs a CUDA build (tools/setup.sh with nvcc present)";
#endif
}

// Every parameter present in the HF directory with the shape ievo expects (no tensor is read).
void check_hf(const Config& cfg, std::ostringstream& os) {
  const std::string& dir = cfg.model.init_from_hf;
  try {
    HfWeights w(dir);
    // InternLM2 packs q/k/v (and names differ); the loader checks those when it reads them.
    if (cfg.model.model.arch == Arch::Llama)
      for (const ParamSpec& s : param_specs(cfg.model.model)) {
        IEVO_CHECK(w.has(s.name), "missing tensor ", s.name);
        IEVO_CHECK(w.shape(s.name) == s.shape, "tensor ", s.name, " has shape ",
                   shape_str(w.shape(s.name)), ", the model expects ", shape_str(s.shape));
      }
    os << "weights: " << dir << " (" << w.names().size() << " tensors"
       << (w.sharded() ? ", sharded" : "") << ")\n";
  } catch (const Error& e) {
    IEVO_FAIL("model.init_from_hf: ", e.what());
  }
}

// Opens the datasets and decodes a few samples spread over what the run will read.
void check_data(const Config& cfg, const char* key, const std::vector<std::string>& paths,
                bool shuffle, bool synthetic, int64_t samples_read, std::ostringstream& os) {
  const DataConfig& d = cfg.data;
  std::unique_ptr<SampleSource> src;
  try {
    src = make_sample_source(paths, key == std::string("data.paths") ? d.weights : std::vector<double>{},
                             d.seq_len, shuffle, synthetic, d.packing, cfg.run.seed,
                             cfg.model.model.vocab_size);
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.find(key) != std::string::npos) throw;
    IEVO_FAIL(key, ": ", msg);
  }
  std::vector<int64_t> probe = {0, samples_read / 2, std::max<int64_t>(0, samples_read - 1)};
  std::vector<int32_t> row(static_cast<size_t>(d.seq_len + 1));
  int32_t max_token = 0;
  for (int64_t i : probe) {
    try {
      src->get(i, row.data());  // checks every token against model.vocab_size
    } catch (const Error& e) {
      IEVO_FAIL(key, ": sample ", i, ": ", e.what(), " (model.vocab_size = ",
                cfg.model.model.vocab_size, ")");
    }
    for (int32_t t : row) max_token = std::max(max_token, t);
  }
  os << key << ": " << src->describe() << "\n  " << probe.size() << " samples decoded (#0, #"
     << probe[1] << ", #" << probe[2] << "), largest token " << max_token << " < vocab "
     << cfg.model.model.vocab_size << "\n";
}

}  // namespace

std::string dry_run_report(const Config& cfg) {
  std::ostringstream os;
  const ModelConfig& m = cfg.model.model;
  const TrainConfig& t = cfg.train;
  os << "ievo train --dry-run: " << (cfg.source.empty() ? "(config)" : cfg.source) << "\n";
  os << "config: valid; run.dir " << cfg.run.dir;
  std::error_code ec;
  if (std::filesystem::exists(std::filesystem::path(cfg.run.dir) / "checkpoints", ec))
    os << " (has checkpoints; checkpoint.resume: " << cfg.checkpoint.resume << ")";
  os << "\n";
  os << "device: " << device_note(cfg) << "; precision " << t.precision << "\n";
  os << "model: " << arch_name(m.arch) << ", " << static_cast<double>(m.num_params()) / 1e6
     << "M parameters (d " << m.hidden_size << ", L " << m.num_layers << ", heads " << m.num_heads
     << "/" << m.num_kv_heads << ", F " << m.ffn_hidden_size << ", V " << m.vocab_size << "); "
     << m.flops_per_token(cfg.data.seq_len) / 1e9 << " GFLOP per token\n";
  if (!cfg.model.init_from_hf.empty()) check_hf(cfg, os);

  // Layout: under mpirun/srun the real world; started plainly, one process.
  const Topology topo = Topology::from_world(static_cast<int>(cfg.parallel.tensor),
                                             static_cast<int>(cfg.parallel.pipeline),
                                             static_cast<int>(cfg.parallel.sequence_size));
  os << "layout: world " << topo.world_size() << " = pp " << topo.pp() << " x dp " << topo.dp()
     << " x tp " << topo.tp() << "\n";
  const int shown = std::min(topo.world_size(), 16);
  for (int r = 0; r < shown; ++r)
    os << "  rank " << r << ": dp " << r / topo.tp() % topo.dp() << ", pp "
       << r / (topo.tp() * topo.dp()) << ", tp " << r % topo.tp() << "\n";
  if (shown < topo.world_size()) os << "  ... (" << topo.world_size() - shown << " more)\n";
  const BatchSplit split = split_batch(t.global_batch_size, t.micro_batch_size, topo.dp(), 0);
  os << "batch: " << t.global_batch_size << " sequences x " << cfg.data.seq_len
     << " tokens = micro " << t.micro_batch_size << " x accumulation " << split.accum << " x dp "
     << topo.dp() << "; " << t.steps << " steps, "
     << static_cast<double>(t.steps * t.global_batch_size * cfg.data.seq_len) / 1e6
     << "M tokens\n";
  if (!t.max_time.empty())
    os << "time limit: train.max_time " << t.max_time << " = "
       << format_duration(*parse_duration(t.max_time)) << "\n";

  // Data: what the run reads (a resumed run reads a suffix of it; probing from 0 is a superset).
  const int64_t samples = t.steps * t.global_batch_size;
  if (cfg.data.synthetic)
    os << "data.paths: synthetic random tokens (nothing to open)\n";
  else
    check_data(cfg, "data.paths", cfg.data.paths, cfg.data.shuffle, false, samples, os);
  if (!cfg.data.valid_paths.empty())
    check_data(cfg, "data.valid_paths", cfg.data.valid_paths, false, false,
               t.eval_batches * t.micro_batch_size, os);

  // Memory per rank (parallel/plan.h).
  PlanInput in;
  in.model = m;
  in.dp = topo.dp();
  in.zero = ZeroConfig{static_cast<int>(cfg.parallel.zero), cfg.parallel.bucket_mb};
  in.zero.param_remainders = cfg.optim.param_remainders;
  in.compute = t.precision == "bf16" ? DType::BF16 : t.precision == "fp16" ? DType::F16 : DType::F32;
  in.micro_batch_size = t.micro_batch_size;
  in.seq_len = cfg.data.seq_len;
  in.recompute = recompute_mode(cfg.model.checkpointing);
  in.head_chunk_tokens = cfg.model.head_chunk_tokens;
  os << format_plan(in, make_plan(in));
  os << perf_report(cfg, topo.dp());  // parallel/perf_model.h, default hardware
  os << "dry run: OK (nothing trained, nothing written)\n";
  return os.str();
}

void dry_run(const Config& cfg) {
  const std::string report = dry_run_report(cfg);
  if (world_rank() == 0) std::fputs(report.c_str(), stdout);
}

}  // namespace ievo
