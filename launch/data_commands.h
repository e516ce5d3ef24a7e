// The `ievo preprocess` and `ievo generate` subcommands (options and what they run), registered
// on the CLI11 app by cli_main. run() is called after parsing, inside cli_main's error handling.
#pragma once
#include <functional>

namespace CLI {
class App;
}

namespace ievo {

struct Subcommand {
  CLI::App* app = nullptr;     // parsed when *app is true
  std::function<void()> run;  // does the work; throws ievo::Error on failure
};

// ievo preprocess --input FILE... --output-prefix PREFIX --tokenizer MODEL.model [--json-key K]
//                 [--workers N] [--train-tokenizer V] [--on-error skip|stop] [--force] [--quiet]
Subcommand add_preprocess_command(CLI::App& app);

// ievo generate CHECKPOINT --prompt TEXT [--tokenizer MODEL.model] [--max-new-tokens N]
//               [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device cpu|cuda]
Subcommand add_generate_command(CLI::App& app);

}  // namespace ievo
