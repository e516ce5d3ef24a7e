#include "parallel/model_state.h"


#include "models/shard.h"

namespace ievo {

ParamStore local_slices(const ParamStore& global, const std::vector<ParamSpec>& local) {
  ParamStore out(local, global.dtype(), Device::CPU);
  for (size_t i = 0; i < local.size(); ++i) {
    IEVO_CHECK(global.has(local[i].name), "the global parameters have no ", local[i].name);
    out[i].copy_from(slice_for(local[i], global.get(local[i].name)));
  }
  return out;
}

}  // namespace ievo
