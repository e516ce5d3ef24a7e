// A set of named tensors living in one flat, aligned buffer (llm.c style): parameters, their
// gradients, optimiser moments all use the same layout, so data-parallel and ZeRO code can treat
// them as one flat vector and slice it into shards.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "models/model_config.h"
#include "runtime/tensor.h"

namespace ievo {

class ParamStore {
 public:
  static constexpr int64_t kAlign = 64;  // elements; each tensor starts at a multiple of this

  ParamStore() = default;
  ParamStore(std::vector<ParamSpec> specs, DType dtype, Device device);

  size_t size() const { return specs_.size(); }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  const ParamSpec& spec(size_t i) const { return specs_[i]; }
  Tensor& operator[](size_t i) { return tensors_[i]; }
  const Tensor& operator[](size_t i) const { return tensors_[i]; }
  Tensor& get(const std::string& name);
  const Tensor& get(const std::string& name) const;
  bool has(const std::string& name) const { return index_.count(name) > 0; }
  size_t index_of(const std::string& name) const;
  int64_t offset(size_t i) const { return offsets_[i]; }  // in elements, into flat()
  Tensor& flat() { return flat_; }
  const Tensor& flat() const { return flat_; }
  int64_t numel() const;  // sum of the tensors' elements (no padding)
  DType dtype() const { return flat_.dtype(); }
  Device device() const { return flat_.device(); }
  void zero() { flat_.zero_(); }

  // Sharded use (parallel/zero.h): a store whose tensors are bound one by one to views of buffers
  // owned elsewhere (ZeRO-3 parameters gathered per layer, ZeRO-2 gradient buckets) and unbound
  // when those are freed. Its flat() is empty (0 elements, the store's dtype and device) and
  // offset() still describes the unsharded layout.
  static ParamStore unbound(std::vector<ParamSpec> specs, DType dtype, Device device);
  void bind(size_t i, const Tensor& t);  // t: spec i's shape, the store's dtype and device
  void unbind(size_t i);                 // back to an undefined tensor

 private:
  std::vector<ParamSpec> specs_;
  std::vector<Tensor> tensors_;
  std::vector<int64_t> offsets_;
  std::map<std::string, size_t> index_;
  Tensor flat_;
};

}  // namespace ievo
