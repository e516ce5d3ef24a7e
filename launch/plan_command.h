// `ievo plan CONFIG [--set k=v ...] [--dp N] [--gpu-mem-gib G] [--weights-dtype D] [--kv-dtype D]`:
// prints the per-rank memory of the configured training (parallel/plan.h) and the inference
// footprint of the same model. Registered on the CLI by cli_main.
#pragma once
#include <functional>
#include <utility>

namespace CLI {
class App;
}

namespace ievo {

// The subcommand, and what to run when it was parsed (throws ievo::Error on bad input).
std::pair<CLI::App*, std::function<void()>> add_plan_command(CLI::App& app);

}  // namespace ievo
