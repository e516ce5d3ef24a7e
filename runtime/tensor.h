// Tensor: shape, strides (in elements), dtype, device, and shared storage. Views (view, slice)
// share storage with their base. Ops take tensors and dispatch on the device.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "runtime/allocator.h"
#include "runtime/dtype.h"
#include "runtime/error.h"

namespace ievo {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3, 4]"
int64_t shape_numel(const Shape& s);

// A block of memory on one device. Owned blocks return to their allocator; external blocks
// (e.g. a memory-mapped file) are not freed.
struct Storage {
  void* data = nullptr;
  size_t bytes = 0;
  Device device = Device::CPU;
  bool owned = true;
  std::shared_ptr<void> keepalive;  // for external memory: whatever keeps it valid
  ~Storage();
};

class Tensor {
 public:
  Tensor() = default;

  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::CPU);
  // Wrap memory owned elsewhere (contiguous). keepalive is held as long as any view lives.
  static Tensor from_blob(void* data, const Shape& shape, DType dtype, Device device = Device::CPU,
                          std::shared_ptr<void> keepalive = nullptr);
  // CPU tensors from values (tests, small constants).
  static Tensor from_vector(const std::vector<float>& v, const Shape& shape);
  static Tensor from_vector(const std::vector<double>& v, const Shape& shape);
  static Tensor from_vector(const std::vector<int32_t>& v, const Shape& shape);
  static Tensor from_vector(const std::vector<int64_t>& v, const Shape& shape);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t size(int i) const { return shape_.at(i < 0 ? i + dim() : i); }
  int dim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device::CPU; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;
  // Contiguous but for the first dimension's stride: rows of the contiguous trailing dimensions,
  // row_stride() elements apart (e.g. a column slice of a wider matrix, or a view of one).
  bool rows_contiguous() const;
  int64_t row_stride() const { return dim() == 0 ? 1 : strides_[0]; }
  bool is_cpu() const { return device() == Device::CPU; }

  void* raw() const { return static_cast<char*>(storage_->data) + offset_; }
  template <typename T>
  T* data() const { return static_cast<T*>(raw()); }

  // Same storage, new shape; one dimension may be -1. A non-contiguous tensor can be viewed when
  // the new shape only splits or merges dimensions that are laid out contiguously with one
  // another (as PyTorch's view): a column slice [N, H * hd] of a wider matrix views as
  // [N, H, hd] and back.
  Tensor view(const Shape& shape) const;
  // Same storage, elements [start, end) along dim.
  Tensor slice(int dim, int64_t start, int64_t end) const;
  // Row i of the first dimension, as a tensor of dim()-1 dimensions.
  Tensor select0(int64_t i) const;

  // New tensor on `device` (a copy even when already there).
  Tensor to(Device device) const;
  // New tensor of `dtype` (f32/f64/bf16/f16/i32/i64 conversions) on the same device.
  Tensor to(DType dtype) const;
  Tensor clone() const;
  // Element copy from src (same shape and dtype, or the same number of elements with both
  // contiguous; any devices; each contiguous or rows_contiguous()).
  void copy_from(const Tensor& src);
  void zero_();
  std::string describe() const;  // "f32[2, 3] cpu"

  // Host-side scalar access (CPU tensors; f32/f64/bf16/f16/i32/i64 read as double).
  double item(int64_t flat_index = 0) const;
  std::vector<double> to_double_vector() const;  // any device/dtype, contiguous copy

 private:
  friend Tensor adjacent_view(const std::vector<Tensor>& parts, int dim);
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes
  Shape shape_, strides_;
  DType dtype_ = DType::F32;
};

Shape contiguous_strides(const Shape& shape);

// The view that spans `parts` when they lie back to back along dimension `dim` of one storage
// (same dtype, shapes equal but along dim, equal strides, each part starting where the one before
// ends): e.g. weights [Wq; Wk; Wv] stored one after another, or column slices of one matrix.
// An undefined tensor when they do not.
Tensor adjacent_view(const std::vector<Tensor>& parts, int dim);

// Shape/dtype/device checks with messages that name the tensor.
void check_shape(const Tensor& t, const Shape& expected, const char* name);
void check_dtype(const Tensor& t, DType expected, const char* name);
void check_same_device(const Tensor& a, const Tensor& b, const char* op);

// Device copies, registered by the CUDA backend.
using CopyFn = void (*)(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes);
void set_device_copy(CopyFn fn);
void device_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes);
// Copies `rows` rows of `width` bytes, `src_pitch` / `dst_pitch` bytes apart.
using Copy2dFn = void (*)(void* dst, size_t dst_pitch, Device dst_dev, const void* src,
                          size_t src_pitch, Device src_dev, size_t width, size_t rows);
void set_device_copy_2d(Copy2dFn fn);
void device_copy_2d(void* dst, size_t dst_pitch, Device dst_dev, const void* src, size_t src_pitch,
                    Device src_dev, size_t width, size_t rows);
using ZeroFn = void (*)(void* dst, size_t bytes);
void set_device_zero(ZeroFn fn);

}  // namespace ievo
