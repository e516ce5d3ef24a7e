// Switches from the environment that are on unless set to "0" (IEVO_JOINT_LINEAR,
// IEVO_GEMM_AUTOTUNE, IEVO_CUDNN_ATTN_DENSE, IEVO_ROPE_ROWS: the A/B switches of
// docs/performance.md). Callers read it once (a static), not on every call.
#pragma once
#include <cstdlib>
#include <cstring>

namespace ievo {

inline bool env_switch_on(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::strcmp(e, "0") == 0);
}

}  // namespace ievo
