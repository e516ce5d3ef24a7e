// A set of named tensors living in one flat, aligned buffer (llm.c style): parameters, their
// gradients, optimiser moments all use the same layout, so data-parallel and ZeRO code can treat
// them as one flat vector and slice it into shards.
#pragma once
#include <cstdint>
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
  // Every access but accumulator() first zeroes a tensor left unwritten by zero_lazily().
  Tensor& operator[](size_t i) { return materialize(i); }
  const Tensor& operator[](size_t i) const { return materialize(i); }
  Tensor& get(const std::string& name);
  const Tensor& get(const std::string& name) const;
  bool has(const std::string& name) const { return index_.count(name) > 0; }
  size_t index_of(const std::string& name) const;
  int64_t offset(size_t i) const { return offsets_[i]; }  // in elements, into flat()
  Tensor& flat() {
    materialize_all();
    return flat_;
  }
  const Tensor& flat() const {
    materialize_all();
    return flat_;
  }
  int64_t numel() const;  // sum of the tensors' elements (no padding)
  DType dtype() const { return flat_.dtype(); }
  Device device() const { return flat_.device(); }
  void zero() {
    unwritten_.clear();
    flat_.zero_();
  }

  // Lazily zeroed gradients (as PyTorch's zero_grad(set_to_none=True), without freeing): marks
  // every tensor as zero without writing it. The backward's first write of a weight gradient then
  // overwrites it (accumulator() gives beta = 0) instead of adding to a buffer zeroed by a
  // separate pass; any other access (operator[], get, flat) zeroes a still-unwritten tensor first,
  // so readers and accumulating writers never see stale values. Padding between tensors is never
  // written and stays as it was (zero). Bound tensors (unbound stores) must stay bound meanwhile.
  // The marks belong to this object: a copy shares the tensors but not the marks, so pass a
  // lazily zeroed store by reference (as ZeroOptimizer::grads() is).
  void zero_lazily() { unwritten_.assign(specs_.size(), 1); }

  // The tensor to accumulate into, and the beta to accumulate with: 0 when it is still unwritten
  // (the caller must then write every element, e.g. a GEMM with that beta; it counts as written
  // from now on), else 1.
  struct Accumulator {
    Tensor& tensor;
    float beta;
  };
  Accumulator accumulator(size_t i);

  // Zeroes tensor i if still unwritten; every still-unwritten tensor (before reading the buffer
  // as a whole).
  Tensor& materialize(size_t i) const;
  void materialize_all() const;

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
  // zero_lazily()'s marks (empty: none); mutable: a const access zeroes too.
  mutable std::vector<uint8_t> unwritten_;
};

}  // namespace ievo
