// NVTX ranges around the model's layers and the collectives, for Nsight Systems
// (`nsys profile build/ievo train CONFIG`). In builds without CUDA both wrappers hand back what they
// were given: no extra calls at all.
//   forward layer <l> / backward layer <l>   each hook layer's pass (embedding = layer 0, the LM
//                                            head = L+1; models/llama.h)
//   comm:all_reduce, comm:reduce_scatter, ... every collective of the wrapped communicator
// (plus forward_backward / optimizer ranges in the trainer, runtime/nvtx.h).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "models/llama.h"
#include "parallel/communicator.h"

namespace ievo {

class NvtxLayerHooks : public LayerHooks {
 public:
  // Returns the hooks the model should call: `inner` itself without CUDA, else this object
  // forwarding to `inner` (may be nullptr) inside the ranges.
  LayerHooks* wrap(LayerHooks* inner);
  void before_layer(int layer, Pass pass) override;
  void after_layer(int layer, Pass pass) override;

 private:
  const std::string& name(int layer, Pass pass);
  LayerHooks* inner_ = nullptr;
  std::vector<std::string> names_;  // 2 per layer, made on first use
};

// `c` itself without CUDA; else a Communicator that wraps every operation of `c` in a range.
std::unique_ptr<Communicator> with_nvtx(std::unique_ptr<Communicator> c);

}  // namespace ievo
