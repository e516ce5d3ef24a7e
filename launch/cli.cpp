#include "launch/cli.h"

#include <cstdio>

namespace ievo {

int cli_main(int, char**) {
  std::fprintf(stderr, "ievo: not built yet\n");
  return 1;
}

}  // namespace ievo
