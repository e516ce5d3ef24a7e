#include "runtime/tensor.h"

#include <cmath>
#include <cstring>
#include <sstream>

namespace ievo {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  for (auto d : s)
    if (d == 0) return 0;  // before any product: [huge, huge, 0] is empty, not an overflow
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

Storage::~Storage() {
  if (owned && data) allocator(device).deallocate(data, bytes);
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (auto d : shape) IEVO_CHECK(d >= 0, "negative dimension in shape ", shape_str(shape));
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  t.storage_->device = device;
  t.storage_->data = allocator(device).allocate(t.storage_->bytes);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::from_blob(void* data, const Shape& shape, DType dtype, Device device,
                         std::shared_ptr<void> keepalive) {
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->data = data;
  t.storage_->bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  t.storage_->device = device;
  t.storage_->owned = false;
  t.storage_->keepalive = std::move(keepalive);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

template <typename T>
static Tensor from_vec(const std::vector<T>& v, const Shape& shape, DType dt) {
  IEVO_CHECK(static_cast<int64_t>(v.size()) == shape_numel(shape), "from_vector: ", v.size(),
             " values for shape ", shape_str(shape));
  Tensor t = Tensor::empty(shape, dt);
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(T));
  return t;
}
Tensor Tensor::from_vector(const std::vector<float>& v, const Shape& s) { return from_vec(v, s, DType::F32); }
Tensor Tensor::from_vector(const std::vector<double>& v, const Shape& s) { return from_vec(v, s, DType::F64); }
Tensor Tensor::from_vector(const std::vector<int32_t>& v, const Shape& s) { return from_vec(v, s, DType::I32); }
Tensor Tensor::from_vector(const std::vector<int64_t>& v, const Shape& s) { return from_vec(v, s, DType::I64); }

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

bool Tensor::rows_contiguous() const {
  const Shape inner(shape_.begin() + (dim() > 0 ? 1 : 0), shape_.end());
  const Shape c = contiguous_strides(inner);
  for (size_t i = 0; i < inner.size(); ++i)
    if (inner[i] != 1 && strides_[i + 1] != c[i]) return false;
  return true;
}

namespace {

// Strides for viewing (shape, strides) as `to` without a copy, or an empty result when a merged
// group of dimensions is not laid out contiguously (PyTorch's computeStride).
bool view_strides(const Shape& from, const Shape& strides, const Shape& to, Shape& out) {
  out.assign(to.size(), 0);
  if (from.empty() || shape_numel(from) == 0) {
    out = contiguous_strides(to);
    return true;
  }
  int64_t view_d = static_cast<int64_t>(to.size()) - 1;
  int64_t chunk = strides.back(), tensor_numel = 1, view_numel = 1;
  for (int64_t d = static_cast<int64_t>(from.size()) - 1; d >= 0; --d) {
    tensor_numel *= from[d];
    if (d == 0 || (from[d - 1] != 1 && strides[d - 1] != tensor_numel * chunk)) {
      while (view_d >= 0 && (view_numel < tensor_numel || to[view_d] == 1)) {
        out[view_d] = view_numel * chunk;
        view_numel *= to[view_d];
        --view_d;
      }
      if (view_numel != tensor_numel) return false;
      if (d > 0) {
        chunk = strides[d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  return view_d == -1;
}

}  // namespace

Tensor Tensor::view(const Shape& shape) const {
  Shape s = shape;
  int64_t known = 1;
  int infer = -1;
  for (int i = 0; i < static_cast<int>(s.size()); ++i) {
    if (s[i] == -1) {
      IEVO_CHECK(infer < 0, "view: more than one -1 in ", shape_str(shape));
      infer = i;
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) s[infer] = known == 0 ? 0 : numel() / known;
  IEVO_CHECK(shape_numel(s) == numel(), "view: cannot view ", describe(), " as ", shape_str(shape));
  Tensor t = *this;
  t.shape_ = s;
  if (is_contiguous()) {
    t.strides_ = contiguous_strides(s);
  } else {
    IEVO_CHECK(view_strides(shape_, strides_, s, t.strides_), "view: ", describe(), " with strides ",
               shape_str(strides_), " cannot be viewed as ", shape_str(shape),
               " without a copy");
  }
  return t;
}

Tensor adjacent_view(const std::vector<Tensor>& parts, int dim) {
  if (parts.empty() || !parts[0].defined()) return Tensor();
  const Tensor& a = parts[0];
  if (dim < 0) dim += a.dim();
  if (dim < 0 || dim >= a.dim()) return Tensor();
  Tensor t = a;
  for (size_t i = 1; i < parts.size(); ++i) {
    const Tensor& p = parts[i];
    if (!p.defined() || p.storage_ != a.storage_ || p.dtype_ != a.dtype_ || p.dim() != a.dim() ||
        p.strides_ != a.strides_)
      return Tensor();
    for (int d = 0; d < a.dim(); ++d)
      if (d != dim && p.shape_[d] != a.shape_[d]) return Tensor();
    const size_t next = t.offset_ + static_cast<size_t>(t.shape_[dim] * t.strides_[dim]) * dtype_size(t.dtype_);
    if (p.offset_ != next) return Tensor();
    t.shape_[dim] += p.shape_[dim];
  }
  return t;
}

Tensor Tensor::slice(int d, int64_t start, int64_t end) const {
  if (d < 0) d += dim();
  IEVO_CHECK(d >= 0 && d < dim(), "slice: dim ", d, " out of range for ", describe());
  IEVO_CHECK(0 <= start && start <= end && end <= shape_[d], "slice: [", start, ", ", end,
             ") out of range for dim ", d, " of ", describe());
  Tensor t = *this;
  t.offset_ += static_cast<size_t>(start * strides_[d]) * dtype_size(dtype_);
  t.shape_[d] = end - start;
  return t;
}

Tensor Tensor::select0(int64_t i) const {
  Tensor t = slice(0, i, i + 1);
  t.shape_.erase(t.shape_.begin());
  t.strides_.erase(t.strides_.begin());
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  IEVO_CHECK(src.shape_ == shape_ || src.numel() == numel(), "copy_from: shape ",
             shape_str(src.shape_), " into ", shape_str(shape_));
  IEVO_CHECK(src.dtype_ == dtype_, "copy_from: dtype ", dtype_name(src.dtype_), " into ",
             dtype_name(dtype_));
  if (is_contiguous() && src.is_contiguous()) {
    device_copy(raw(), device(), src.raw(), src.device(), nbytes());
    return;
  }
  IEVO_CHECK(src.shape_ == shape_ && dim() > 0 && rows_contiguous() && src.rows_contiguous(),
             "copy_from: ", src.describe(), " (strides ", shape_str(src.strides_), ") into ",
             describe(), " (strides ", shape_str(strides_), ") needs both contiguous, or rows of "
             "contiguous elements of the same shape");
  if (numel() == 0) return;
  const size_t es = dtype_size(dtype_), width = static_cast<size_t>(numel() / shape_[0]) * es;
  device_copy_2d(raw(), static_cast<size_t>(row_stride()) * es, device(), src.raw(),
                 static_cast<size_t>(src.row_stride()) * es, src.device(), width,
                 static_cast<size_t>(shape_[0]));
}

Tensor Tensor::to(Device d) const {
  Tensor t = empty(shape_, dtype_, d);
  Tensor src = is_contiguous() ? *this : clone();
  t.copy_from(src);
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device());
  if (is_contiguous() || (dim() > 0 && rows_contiguous())) {
    t.copy_from(*this);
    return t;
  }
  IEVO_CHECK(is_cpu(), "clone of a device tensor ", describe(), " with strides ", shape_str(strides_),
             " is not supported (only rows of contiguous elements)");
  // Generic strided gather on the host.
  const size_t es = dtype_size(dtype_);
  const int64_t n = numel();
  std::vector<int64_t> idx(shape_.size(), 0);
  char* out = static_cast<char*>(t.raw());
  const char* in = static_cast<const char*>(raw());
  for (int64_t k = 0; k < n; ++k) {
    int64_t off = 0;
    for (size_t j = 0; j < idx.size(); ++j) off += idx[j] * strides_[j];
    std::memcpy(out + k * es, in + off * es, es);
    for (int j = static_cast<int>(idx.size()) - 1; j >= 0; --j) {
      if (++idx[j] < shape_[j]) break;
      idx[j] = 0;
    }
  }
  return t;
}

namespace {
ZeroFn g_zero = nullptr;
CopyFn g_copy = nullptr;
Copy2dFn g_copy_2d = nullptr;

template <typename S, typename D>
void convert(const S* s, D* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<D>(s[i]);
}

double read_as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::I32: return static_cast<const int32_t*>(p)[i];
    case DType::I64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::I16: return static_cast<const int16_t*>(p)[i];
  }
  return 0;
}
}  // namespace

void set_device_copy(CopyFn fn) { g_copy = fn; }
void set_device_copy_2d(Copy2dFn fn) { g_copy_2d = fn; }

void device_copy_2d(void* dst, size_t dst_pitch, Device dd, const void* src, size_t src_pitch,
                    Device sd, size_t width, size_t rows) {
  if (width == 0 || rows == 0) return;
  if (dd == Device::CPU && sd == Device::CPU) {
    for (size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width);
    return;
  }
  IEVO_CHECK(g_copy_2d != nullptr, "device copy requested but this build has no CUDA backend");
  g_copy_2d(dst, dst_pitch, dd, src, src_pitch, sd, width, rows);
}
void set_device_zero(ZeroFn fn) { g_zero = fn; }

void device_copy(void* dst, Device dd, const void* src, Device sd, size_t bytes) {
  if (bytes == 0) return;
  if (dd == Device::CPU && sd == Device::CPU) {
    std::memcpy(dst, src, bytes);
    return;
  }
  IEVO_CHECK(g_copy != nullptr, "device copy requested but this build has no CUDA backend");
  g_copy(dst, dd, src, sd, bytes);
}

void Tensor::zero_() {
  if (numel() == 0) return;
  IEVO_CHECK(is_contiguous(), "zero_ needs a contiguous tensor");
  if (is_cpu()) {
    std::memset(raw(), 0, nbytes());
  } else {
    IEVO_CHECK(g_zero != nullptr, "no CUDA backend");
    g_zero(raw(), nbytes());
  }
}

Tensor Tensor::to(DType dt) const {
  if (!is_cpu()) {
    // Device conversions go through the host unless the backend provides a cast op.
    return to(Device::CPU).to(dt).to(device());
  }
  Tensor src = is_contiguous() ? *this : clone();
  Tensor out = empty(shape_, dt, Device::CPU);
  const int64_t n = numel();
  if (dt == dtype_) {
    out.copy_from(src);
    return out;
  }
  const void* s = src.raw();
  if (dt == DType::BF16 || dt == DType::F16) {
    auto* d = out.data<uint16_t>();
    for (int64_t i = 0; i < n; ++i) {
      float f = static_cast<float>(read_as_double(s, dtype_, i));
      d[i] = dt == DType::BF16 ? f32_to_bf16(f) : f32_to_f16(f);
    }
    return out;
  }
  if (dtype_ == DType::F32 && dt == DType::F64) {
    convert(src.data<float>(), out.data<double>(), n);
    return out;
  }
  for (int64_t i = 0; i < n; ++i) {
    double v = read_as_double(s, dtype_, i);
    switch (dt) {
      case DType::F32: out.data<float>()[i] = static_cast<float>(v); break;
      case DType::F64: out.data<double>()[i] = v; break;
      case DType::I32: out.data<int32_t>()[i] = static_cast<int32_t>(v); break;
      case DType::I64: out.data<int64_t>()[i] = static_cast<int64_t>(v); break;
      case DType::I16: out.data<int16_t>()[i] = static_cast<int16_t>(v); break;
      default: break;
    }
  }
  return out;
}

double Tensor::item(int64_t i) const {
  IEVO_CHECK(is_cpu(), "item() on a device tensor");
  IEVO_CHECK(i >= 0 && i < numel(), "item(", i, ") out of range for ", describe());
  if (!is_contiguous()) return clone().item(i);
  return read_as_double(raw(), dtype_, i);
}

std::vector<double> Tensor::to_double_vector() const {
  Tensor h = is_cpu() ? (is_contiguous() ? *this : clone()) : to(Device::CPU);
  std::vector<double> v(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) v[i] = read_as_double(h.raw(), dtype_, i);
  return v;
}

std::string Tensor::describe() const {
  return detail::cat(dtype_name(dtype_), shape_str(shape_), " ", device_name(device()));
}

void check_shape(const Tensor& t, const Shape& expected, const char* name) {
  IEVO_CHECK(t.shape() == expected, "tensor '", name, "' has shape ", shape_str(t.shape()),
             ", expected ", shape_str(expected));
}
void check_dtype(const Tensor& t, DType expected, const char* name) {
  IEVO_CHECK(t.dtype() == expected, "tensor '", name, "' has dtype ", dtype_name(t.dtype()),
             ", expected ", dtype_name(expected));
}
void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  IEVO_CHECK(a.device() == b.device(), op, ": tensors on different devices (",
             device_name(a.device()), " and ", device_name(b.device()), ")");
}

}  // namespace ievo
