#include "models/params.h"

namespace ievo {

ParamStore::ParamStore(std::vector<ParamSpec> specs, DType dtype, Device device)
    : specs_(std::move(specs)) {
  int64_t total = 0;
  for (size_t i = 0; i < specs_.size(); ++i) {
    offsets_.push_back(total);
    total += (shape_numel(specs_[i].shape) + kAlign - 1) / kAlign * kAlign;
    IEVO_CHECK(index_.emplace(specs_[i].name, i).second, "duplicate parameter name ", specs_[i].name);
  }
  flat_ = Tensor::zeros({total}, dtype, device);
  for (size_t i = 0; i < specs_.size(); ++i) {
    int64_t n = shape_numel(specs_[i].shape);
    tensors_.push_back(flat_.slice(0, offsets_[i], offsets_[i] + n).view(specs_[i].shape));
  }
}

ParamStore ParamStore::unbound(std::vector<ParamSpec> specs, DType dtype, Device device) {
  ParamStore s;
  s.specs_ = std::move(specs);
  int64_t total = 0;
  for (size_t i = 0; i < s.specs_.size(); ++i) {
    s.offsets_.push_back(total);
    total += (shape_numel(s.specs_[i].shape) + kAlign - 1) / kAlign * kAlign;
    IEVO_CHECK(s.index_.emplace(s.specs_[i].name, i).second, "duplicate parameter name ",
               s.specs_[i].name);
  }
  s.flat_ = Tensor::from_blob(nullptr, {0}, dtype, device);
  s.tensors_.resize(s.specs_.size());
  return s;
}

void ParamStore::bind(size_t i, const Tensor& t) {
  IEVO_CHECK(i < specs_.size(), "ParamStore::bind: index ", i, " out of range");
  IEVO_CHECK(t.shape() == specs_[i].shape && t.dtype() == dtype() && t.device() == device(),
             "ParamStore::bind: ", specs_[i].name, " needs ", dtype_name(dtype()),
             shape_str(specs_[i].shape), " on ", device_name(device()), ", got ", t.describe());
  IEVO_CHECK(i >= unwritten_.size() || !unwritten_[i], "ParamStore::bind: ", specs_[i].name,
             " is lazily zeroed (zero_lazily) and must stay bound until written");
  tensors_[i] = t;
}

void ParamStore::unbind(size_t i) {
  IEVO_CHECK(i < specs_.size(), "ParamStore::unbind: index ", i, " out of range");
  materialize(i);
  tensors_[i] = Tensor();
}

size_t ParamStore::index_of(const std::string& name) const {
  auto it = index_.find(name);
  IEVO_CHECK(it != index_.end(), "no parameter named '", name, "'");
  return it->second;
}
Tensor& ParamStore::get(const std::string& name) { return materialize(index_of(name)); }
const Tensor& ParamStore::get(const std::string& name) const { return materialize(index_of(name)); }

Tensor& ParamStore::materialize(size_t i) const {
  Tensor& t = const_cast<Tensor&>(tensors_[i]);
  if (i < unwritten_.size() && unwritten_[i]) {
    unwritten_[i] = 0;
    if (t.defined()) t.zero_();
  }
  return t;
}

void ParamStore::materialize_all() const {
  for (size_t i = 0; i < unwritten_.size(); ++i) materialize(i);
  unwritten_.clear();
}

ParamStore::Accumulator ParamStore::accumulator(size_t i) {
  IEVO_CHECK(i < specs_.size(), "ParamStore::accumulator: index ", i, " out of range");
  const bool fresh = i < unwritten_.size() && unwritten_[i];
  if (fresh) unwritten_[i] = 0;
  return {tensors_[i], fresh ? 0.0f : 1.0f};
}

int64_t ParamStore::numel() const {
  int64_t n = 0;
  for (auto& s : specs_) n += shape_numel(s.shape);
  return n;
}

}  // namespace ievo
