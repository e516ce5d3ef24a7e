// HDF5 plumbing shared by the checkpoint reader and writers (launch/checkpoint.cpp,
// launch/checkpoint_shards.cpp): RAII ids, errors carrying HDF5's own message, scalar attributes.
#pragma once
#include <hdf5.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/error.h"

namespace ievo::ckpt_h5 {

// ---- HDF5 plumbing: RAII ids, errors with HDF5's own message ----------------------------------

class H5Id {
 public:
  H5Id(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~H5Id() {
    if (id_ >= 0) close_(id_);
  }
  H5Id(H5Id&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  H5Id& operator=(H5Id&&) = delete;
  operator hid_t() const { return id_; }
  bool ok() const { return id_ >= 0; }
  // Closes now, returning the close's status (closing a dataset flushes its buffered data, which
  // is where a full disk shows up).
  herr_t close() {
    herr_t r = id_ >= 0 ? close_(id_) : 0;
    id_ = H5I_INVALID_HID;
    return r;
  }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

inline herr_t collect_error(unsigned n, const H5E_error2_t* e, void* out) {
  auto* s = static_cast<std::string*>(out);
  if (n < 3 && e->desc && *e->desc) *s += (s->empty() ? "" : "; ") + std::string(e->desc);
  return 0;
}

// The innermost messages of HDF5's error stack (then cleared); automatic printing is off.
inline std::string h5_error() {
  std::string s;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, collect_error, &s);
  H5Eclear2(H5E_DEFAULT);
  return s.empty() ? "HDF5 error" : s;
}

inline void h5_init() {
  static bool done = [] {
    // No library shutdown at exit: after a failed write (disk full) HDF5 1.10 can crash closing
    // the broken file in its atexit handler. Every file is closed explicitly anyway.
    H5dont_atexit();
    H5open();
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)done;
}

#define H5_CHECK(cond, ...)                                   \
  do {                                                        \
    if (!(cond)) IEVO_FAIL(__VA_ARGS__, ": ", h5_error());    \
  } while (0)

inline H5Id file_access_plist() {
  H5Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  // v1.8+ object headers and superblock carry checksums of the file's metadata.
  H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST);
  H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG);
#if H5_VERSION_GE(1, 10, 7)
  H5Pset_file_locking(fapl, false, true);  // shared filesystems often refuse flock
#endif
  return fapl;
}

inline void write_string_attr(hid_t obj, const char* name, const std::string& value, const std::string& file) {
  H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, std::max<size_t>(1, value.size()));
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id a(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  H5_CHECK(a.ok() && H5Awrite(a, type, value.c_str()) >= 0, "checkpoint ", file,
           ": cannot write attribute ", name);
}

inline std::string read_string_attr(hid_t obj, const char* name, const std::string& file) {
  H5_CHECK(H5Aexists(obj, name) > 0, "checkpoint ", file, ": no attribute '", name,
           "' (not an ievo checkpoint?)");
  H5Id a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  H5Id type(H5Aget_type(a), H5Tclose);
  H5_CHECK(H5Tget_class(type) == H5T_STRING && !H5Tis_variable_str(type), "checkpoint ", file,
           ": attribute '", name, "' is not a fixed-length string");
  std::string s(H5Tget_size(type), '\0');
  H5_CHECK(H5Aread(a, type, s.data()) >= 0, "checkpoint ", file, ": cannot read attribute ", name);
  s.resize(std::strlen(s.c_str()));
  return s;
}

inline void write_u64_attr(hid_t obj, const char* name, uint64_t v, const std::string& where) {
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id a(H5Acreate2(obj, name, H5T_STD_U64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  H5_CHECK(a.ok() && H5Awrite(a, H5T_NATIVE_UINT64, &v) >= 0, where, ": cannot write attribute ", name);
}

inline uint64_t read_u64_attr(hid_t obj, const char* name, const std::string& where) {
  H5_CHECK(H5Aexists(obj, name) > 0, where, ": no attribute '", name, "'");
  uint64_t v = 0;
  H5Id a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  H5_CHECK(a.ok() && H5Aread(a, H5T_NATIVE_UINT64, &v) >= 0, where, ": cannot read attribute ", name);
  return v;
}

inline std::vector<std::string> link_names(hid_t g, const std::string& where) {
  H5G_info_t info;
  H5_CHECK(H5Gget_info(g, &info) >= 0, where, ": cannot list");
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    ssize_t n = H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    H5_CHECK(n >= 0, where, ": cannot list");
    std::string s(static_cast<size_t>(n) + 1, '\0');
    H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, s.data(), s.size(), H5P_DEFAULT);
    s.resize(static_cast<size_t>(n));
    names.push_back(s);
  }
  return names;
}

}  // namespace ievo::ckpt_h5
