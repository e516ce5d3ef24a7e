// ievo: the command-line entry point (train, convert, preprocess, generate, bench, plan).
#include "launch/cli.h"

int main(int argc, char** argv) { return ievo::cli_main(argc, argv); }
