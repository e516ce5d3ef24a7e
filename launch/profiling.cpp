#include "launch/profiling.h"

#include "runtime/nvtx.h"

namespace ievo {

LayerHooks* NvtxLayerHooks::wrap(LayerHooks* inner) {
#ifdef IEVO_CUDA
  inner_ = inner;
  return this;
#else
  return inner;
#endif
}

const std::string& NvtxLayerHooks::name(int layer, Pass pass) {
  const size_t i = static_cast<size_t>(layer) * 2 + (pass == Pass::Backward ? 1 : 0);
  if (i >= names_.size()) names_.resize(i + 1);
  if (names_[i].empty())
    names_[i] = (pass == Pass::Backward ? "backward layer " : "forward layer ") + std::to_string(layer);
  return names_[i];
}

void NvtxLayerHooks::before_layer(int layer, Pass pass) {
  nvtx::push(name(layer, pass).c_str());
  if (inner_) inner_->before_layer(layer, pass);
}

void NvtxLayerHooks::after_layer(int layer, Pass pass) {
  if (inner_) inner_->after_layer(layer, pass);  // ZeRO's reduce of this layer: inside the range
  nvtx::pop();
}

#ifdef IEVO_CUDA
namespace {

class NvtxCommunicator : public Communicator {
 public:
  explicit NvtxCommunicator(std::unique_ptr<Communicator> c) : c_(std::move(c)) {}
  int rank() const override { return c_->rank(); }
  int size() const override { return c_->size(); }
  const char* backend() const override { return c_->backend(); }
  void all_reduce(Tensor& t) override {
    IEVO_NVTX_RANGE("comm:all_reduce");
    c_->all_reduce(t);
  }
  void reduce_scatter(const Tensor& in, Tensor& out) override {
    IEVO_NVTX_RANGE("comm:reduce_scatter");
    c_->reduce_scatter(in, out);
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    IEVO_NVTX_RANGE("comm:all_gather");
    c_->all_gather(in, out);
  }
  std::unique_ptr<CommWork> all_reduce_async(Tensor& t) override {
    IEVO_NVTX_RANGE("comm:all_reduce_async");
    return c_->all_reduce_async(t);
  }
  std::unique_ptr<CommWork> reduce_scatter_async(const Tensor& in, Tensor& out) override {
    IEVO_NVTX_RANGE("comm:reduce_scatter_async");
    return c_->reduce_scatter_async(in, out);
  }
  std::unique_ptr<CommWork> all_gather_async(const Tensor& in, Tensor& out) override {
    IEVO_NVTX_RANGE("comm:all_gather_async");
    return c_->all_gather_async(in, out);
  }
  void broadcast(Tensor& t, int root) override {
    IEVO_NVTX_RANGE("comm:broadcast");
    c_->broadcast(t, root);
  }
  void send(const Tensor& t, int peer) override {
    IEVO_NVTX_RANGE("comm:send");
    c_->send(t, peer);
  }
  void recv(Tensor& t, int peer) override {
    IEVO_NVTX_RANGE("comm:recv");
    c_->recv(t, peer);
  }
  void exchange(const std::vector<P2POp>& ops) override {
    IEVO_NVTX_RANGE("comm:exchange");
    c_->exchange(ops);
  }
  void barrier() override {
    IEVO_NVTX_RANGE("comm:barrier");
    c_->barrier();
  }
  double all_reduce_sum(double x) override {
    IEVO_NVTX_RANGE("comm:all_reduce_sum");
    return c_->all_reduce_sum(x);
  }
  int64_t all_reduce_sum(int64_t x) override {
    IEVO_NVTX_RANGE("comm:all_reduce_sum");
    return c_->all_reduce_sum(x);
  }

 private:
  std::unique_ptr<Communicator> c_;
};

}  // namespace
#endif

std::unique_ptr<Communicator> with_nvtx(std::unique_ptr<Communicator> c) {
#ifdef IEVO_CUDA
  return std::make_unique<NvtxCommunicator>(std::move(c));
#else
  return c;
#endif
}

}  // namespace ievo
