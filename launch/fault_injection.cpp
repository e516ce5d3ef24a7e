#include "launch/fault_injection.h"

#include <csignal>
#include <cstdlib>
#include <cstring>

#include "runtime/error.h"

namespace ievo {

namespace {
int64_t env_step(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : -1;
}
}  // namespace

void fault_point(const char* point, int64_t step, const std::string& file) {
  if (std::strcmp(point, "write") == 0 && env_step("IEVO_TEST_FAIL_SAVE") == step)
    IEVO_FAIL("write to ", file, " failed: No space left on device (simulated: IEVO_TEST_FAIL_SAVE=",
              step, ")");
  if (env_step("IEVO_TEST_KILL_AT_STEP") != step) return;
  const char* p = std::getenv("IEVO_TEST_KILL_POINT");
  if (std::strcmp(p && *p ? p : "step", point) == 0) std::raise(SIGKILL);
}

}  // namespace ievo
