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

size_t ParamStore::index_of(const std::string& name) const {
  auto it = index_.find(name);
  IEVO_CHECK(it != index_.end(), "no parameter named '", name, "'");
  return it->second;
}
Tensor& ParamStore::get(const std::string& name) { return tensors_[index_of(name)]; }
const Tensor& ParamStore::get(const std::string& name) const { return tensors_[index_of(name)]; }

int64_t ParamStore::numel() const {
  int64_t n = 0;
  for (auto& s : specs_) n += shape_numel(s.shape);
  return n;
}

}  // namespace ievo
