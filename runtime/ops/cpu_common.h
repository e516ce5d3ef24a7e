// Helpers shared by the CPU reference kernels in runtime/ops/*.cpp (not a public interface):
// argument checks whose messages name the op and the tensor, and dispatch on the element type.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "runtime/ops/targets.h"
#include "runtime/tensor.h"

namespace ievo::ops::cpu {

// Host element types for the 16-bit floats (storage only; arithmetic goes through float).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline double to_double(float v) { return v; }
inline double to_double(double v) { return v; }
inline double to_double(bf16_t v) { return bf16_to_f32(v.bits); }
inline double to_double(f16_t v) { return f16_to_f32(v.bits); }

template <typename T>
T from_double(double v);
template <>
inline float from_double<float>(double v) { return static_cast<float>(v); }
template <>
inline double from_double<double>(double v) { return v; }
template <>
inline bf16_t from_double<bf16_t>(double v) { return {f32_to_bf16(static_cast<float>(v))}; }
template <>
inline f16_t from_double<f16_t>(double v) { return {f32_to_f16(static_cast<float>(v))}; }

// A defined, contiguous CPU tensor.
inline void expect_cpu(const Tensor& t, const char* name, const char* op) {
  IEVO_CHECK(t.defined(), op, ": tensor '", name, "' is undefined");
  IEVO_CHECK(t.is_cpu(), op, ": tensor '", name, "' is on ", device_name(t.device()),
             " while the other arguments are on the cpu");
  IEVO_CHECK(t.is_contiguous(), op, ": tensor '", name, "' (", t.describe(),
             ") must be contiguous");
}

// A defined, contiguous CPU tensor of f32 or f64.
inline void expect_float(const Tensor& t, const char* name, const char* op) {
  expect_cpu(t, name, op);
  IEVO_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::F64, op, ": tensor '", name,
             "' has dtype ", dtype_name(t.dtype()), ", the CPU kernels take f32 or f64");
}

// As expect_float, but the rows (first dimension) may be strided: Tensor::rows_contiguous().
inline void expect_float_rows(const Tensor& t, const char* name, const char* op) {
  IEVO_CHECK(t.defined(), op, ": tensor '", name, "' is undefined");
  IEVO_CHECK(t.is_cpu(), op, ": tensor '", name, "' is on ", device_name(t.device()),
             " while the other arguments are on the cpu");
  IEVO_CHECK(t.rows_contiguous(), op, ": tensor '", name, "' (", t.describe(), ", strides ",
             shape_str(t.strides()), ") must be contiguous but for its row stride");
  IEVO_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::F64, op, ": tensor '", name,
             "' has dtype ", dtype_name(t.dtype()), ", the CPU kernels take f32 or f64");
}

// Calls f(T{}) with T = float or double according to dt.
template <typename F>
decltype(auto) dispatch_float(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::F32: return std::forward<F>(f)(float{});
    case DType::F64: return std::forward<F>(f)(double{});
    default: IEVO_FAIL(op, ": unsupported dtype ", dtype_name(dt), " on the cpu (f32 or f64)");
  }
}

// Calls f(T{}) for any floating storage type (f32, f64, bf16, f16).
template <typename F>
decltype(auto) dispatch_storage(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::F32: return std::forward<F>(f)(float{});
    case DType::F64: return std::forward<F>(f)(double{});
    case DType::BF16: return std::forward<F>(f)(bf16_t{});
    case DType::F16: return std::forward<F>(f)(f16_t{});
    default: IEVO_FAIL(op, ": unsupported dtype ", dtype_name(dt), " (f32, f64, bf16 or f16)");
  }
}

// Element loops shorter than this run on one thread.
constexpr int64_t kParallelMin = 1 << 14;

// The CPU embedding's rows (embedding.cpp), for the whole table (begin 0) and for a
// vocabulary-parallel rank's rows [begin, begin + rows) (vocab_parallel.cpp); shapes checked by
// the callers. forward: out row n = table row ids[n] - begin, zeros where that is outside the
// table. backward: dtable row ids[n] - begin += dout row n (column blocks a thread, tokens in
// order: deterministic), tokens outside the table skipped.
void embedding_rows_forward(const Tensor& table, const Tensor& ids, int64_t begin, Tensor& out);
void embedding_rows_backward(const Tensor& dout, const Tensor& ids, int64_t begin, Tensor& dtable, const char* op);

// The loss sum of the rows (row[i]: row i's loss, 0 where ignored), added in row order so that it
// is deterministic, and the count of rows whose target is not kIgnoreIndex (when count is given).
inline double loss_total(const std::vector<double>& row, const int32_t* targets, int64_t* count) {
  double total = 0;
  int64_t valid = 0;
  for (size_t i = 0; i < row.size(); ++i) {
    total += row[i];
    valid += targets[i] != kIgnoreIndex;
  }
  if (count) *count = valid;
  return total;
}

}  // namespace ievo::ops::cpu
