// Errors: every failure is an ievo::Error with a message that names what was wrong.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace ievo {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace ievo

// IEVO_CHECK(cond, "message ", value, ...): throws ievo::Error naming the source location.
#define IEVO_CHECK(cond, ...)                                                             \
  do {                                                                                    \
    if (!(cond))                                                                          \
      throw ::ievo::Error(::ievo::detail::cat(__VA_ARGS__, " [", __FILE__, ":", __LINE__, \
                                              "]"));                                      \
  } while (0)
#define IEVO_FAIL(...) throw ::ievo::Error(::ievo::detail::cat(__VA_ARGS__))
