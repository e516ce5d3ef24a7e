// Test hooks for the checkpoint/resume tests (tests/test_resume.cpp), driven by environment
// variables so that the real `ievo train` binary can be crashed or made to fail at exact points.
// Unset (the normal case) they cost one getenv per call site and do nothing.
//
//   IEVO_TEST_KILL_AT_STEP=N      raise SIGKILL on ourselves at a point of step N, chosen by
//   IEVO_TEST_KILL_POINT=P        P = step    after step N's metrics are written (default)
//                                     write   half-way through writing step N's model.h5
//                                     renamed after step_N.tmp became step_N, before `latest`
//                                     saved   after step N's checkpoint is complete
//   IEVO_TEST_FAIL_SAVE=N         the save of step N fails half-way through writing model.h5, as
//                                 if the disk were full (an Error naming the file)
#pragma once
#include <cstdint>
#include <string>

namespace ievo {

// Called by the trainer and the checkpoint writer at point `point` of step `step`; `file` is
// the file being written (for the simulated failure's message).
void fault_point(const char* point, int64_t step, const std::string& file = "");

}  // namespace ievo
