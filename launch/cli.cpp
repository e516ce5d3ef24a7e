#include "launch/cli.h"

#include <cstdio>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "launch/bench.h"
#include "launch/config.h"
#include "launch/dry_run.h"
#include "launch/log.h"
#include "launch/convert.h"
#include "launch/data_commands.h"
#include "launch/plan_command.h"
#include "launch/signals.h"
#include "launch/trainer.h"
#include "parallel/failure.h"
#include "parallel/topology.h"

namespace ievo {

int cli_main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);  // MPI only when launched by mpirun / srun (parallel/topology.h)
  CLI::App app{"ievo: LLM pretraining (Llama, InternLM2) on CPU and CUDA"};
  app.set_version_flag("--version", std::string("ievo ") + IEVO_VERSION);
  app.require_subcommand(1);

  // ievo train CONFIG [--set key=value ...]
  auto* train = app.add_subcommand("train", "Train a model from a YAML config");
  std::string config_path;
  std::vector<std::string> overrides;
  train->add_option("config", config_path, "YAML config file")->required()->check(CLI::ExistingFile);
  train->add_option("--set", overrides, "Override a config key: --set train.steps=100")
      ->allow_extra_args(false);
  bool dry = false;
  train->add_flag("--dry-run", dry,
                  "Validate the config and the data, print the layout and the memory plan; no training");

  // ievo convert to-hf / from-hf
  auto* convert = app.add_subcommand("convert", "Convert between ievo checkpoints and HF directories");
  convert->require_subcommand(1);
  auto* to_hf = convert->add_subcommand("to-hf", "ievo checkpoint -> HF directory (config.json + safetensors)");
  std::string ckpt_dir, out_dir, hf_dir, dtype = "fp32", arch;
  to_hf->add_option("checkpoint", ckpt_dir, "checkpoint directory (RUN_DIR/checkpoints/step_N)")->required();
  to_hf->add_option("out", out_dir, "output HF directory")->required();
  to_hf->add_option("--dtype", dtype, "fp32 | bf16")->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  to_hf->add_option("--arch", arch, "llama | internlm2 (default: the checkpoint's)")
      ->check(CLI::IsMember({"llama", "internlm2"}));
  auto* from_hf = convert->add_subcommand("from-hf", "HF directory -> ievo checkpoint (step 0)");
  from_hf->add_option("hf_dir", hf_dir, "HF directory")->required()->check(CLI::ExistingDirectory);
  from_hf->add_option("checkpoint", ckpt_dir, "output checkpoint directory")->required();

  Subcommand preprocess = add_preprocess_command(app);  // launch/data_commands.h
  Subcommand generate = add_generate_command(app);

  auto [plan, run_plan] = add_plan_command(app);  // launch/plan_command.h
  auto [bench, run_bench_command] = add_bench_command(app);  // launch/bench.h

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    if (*train) {
      Config cfg = load_config(config_path, overrides);
      if (dry) {  // launch/dry_run.h
        dry_run(cfg);
        return 0;
      }
      run_train(cfg);
      return stop_exit_code();  // 130 after a SIGINT stop (launch/signals.h), else 0
    } else if (*to_hf) {
      std::optional<Arch> a;
      if (!arch.empty()) a = arch_from_name(arch);
      convert_to_hf(ckpt_dir, out_dir, dtype_from_name(dtype), a);
      std::fprintf(stderr, "ievo: wrote %s\n", out_dir.c_str());
    } else if (*preprocess.app) {
      preprocess.run();
    } else if (*generate.app) {
      generate.run();
    } else if (*plan) {
      run_plan();
    } else if (*bench) {
      run_bench_command();
    } else if (*from_hf) {
      convert_from_hf(hf_dir, ckpt_dir);
      std::fprintf(stderr, "ievo: wrote %s\n", ckpt_dir.c_str());
    }
  } catch (const std::exception& e) {
    log_file_only("ievo: error: %s", e.what());  // RUN_DIR/logs/rank_<r>.log (launch/log.h)
    abort_all_ranks(e.what());  // with several MPI ranks: names this rank and ends the job
    return 1;
  }
  return 0;
}

}  // namespace ievo
