// The `ievo` command line: subcommands train, convert, bench, plan (and later preprocess, generate).
#pragma once

namespace ievo {

int cli_main(int argc, char** argv);

}  // namespace ievo
