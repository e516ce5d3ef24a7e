// The step-time part of `ievo plan` (parallel/perf_model.h) and of `ievo train --dry-run`: the
// hardware options on the command line, the model input from a config, and the calibration from
// `ievo bench --json`.
//   --peak-tflops X      dense matmul peak per GPU (default: H100 SXM, 989 bf16/fp16, 67 fp32)
//   --gemm-eff E         achieved/peak for GEMMs (0.6)       --attn-eff E   for attention (0.4)
//   --mem-bw-gbs X       device memory bandwidth (3350)      --mem-eff E    achieved/peak (0.7)
//   --intra-bw-gbs X     collective bandwidth inside a node per GPU (360)
//   --inter-bw-gbs X     across nodes per GPU (45)           --gpus-per-node N (8)
//   --comm-overlap F     fraction of the compute that hides dp collectives (1: ievo on CUDA, whose
//                        collectives run beside the backward; 0 for run.device: cpu)
//   --tp N --pp N --vpp V  layout to estimate besides --dp (defaults: parallel.tensor/pipeline, 1)
//   --bench-json FILE    calibrate the FLOP rate and the optimizer from `ievo bench --json` of the
//                        same model on one GPU, or of the same shape with fewer layers (a model too
//                        big for one GPU: --set model.num_layers=4)
//   --json FILE          also write the estimate as one JSON object (tools/multi_gpu_run.sh)
//   --kernels-json FILE  the GEMM, attention and memory-bound throughputs measured on this GPU by
//                        `bench/bench_gpu_kernels --benchmark_out=FILE --benchmark_out_format=json`
//                        (Google Benchmark JSON) instead of peak x efficiency: the GEMM rate is the
//                        FLOP-weighted mean of the QKV (attention projections), MLP-up (MLP) and
//                        LM-head shapes for this model's split of matmul FLOPs; attention the cuDNN
//                        forward/backward rates when cuDNN ran (ievo's default backend then), else
//                        ievo's flash kernels, at head dim 128 or else the TinyLlama shape (64);
//                        memory bandwidth the harmonic mean of RMSNorm fwd/bwd, SwiGLU and
//                        cross-entropy (equal bytes each). The kernels are timed in bf16.
#pragma once
#include <memory>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "launch/config.h"
#include "parallel/perf_model.h"

namespace CLI {
class App;
}

namespace ievo {

struct PerfOptions {
  double peak_tflops = 0;  // 0: by precision
  double gemm_eff = 0.6, attn_eff = 0.4, mem_bw_gbs = 3350, mem_eff = 0.7;
  double intra_bw_gbs = 360, inter_bw_gbs = 45, comm_overlap = -1;  // -1: by run.device
  int gpus_per_node = 8, tp = 0, pp = 0, vpp = 1;  // tp/pp 0: from the config
  std::string bench_json;
  std::string kernels_json;
  std::string json;  // --json FILE: the estimate (step, its parts, tokens/s, MFU) as one object
};

// Adds the options above to `cmd`; the returned options are filled when it is parsed.
std::shared_ptr<PerfOptions> add_perf_options(CLI::App& cmd);
// The model and batch of a config with data-parallel size `dp`.
PerfInput perf_input(const Config& cfg, int dp, const PerfOptions& o = {});
PerfHardware perf_hardware(const PerfInput& in, const PerfOptions& o = {});
// Sets hw's kernel_* rates from bench_gpu_kernels' Google Benchmark JSON (see --kernels-json);
// an error names what is missing.
void apply_kernel_bench(const nlohmann::json& bench, const PerfInput& in, PerfHardware& hw);
// The estimate, formatted (several lines).
std::string perf_report(const Config& cfg, int dp, const PerfOptions& o = {});

}  // namespace ievo
