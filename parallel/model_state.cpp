#include "parallel/model_state.h"

#include <set>
#include <string>

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

void gather_global(Communicator& mp, const std::vector<const ParamStore*>& local,
                   const std::function<std::vector<ParamSpec>(int)>& specs_of,
                   const std::vector<ParamStore*>& global, int root) {
  const int me = mp.rank();
  for (const ParamStore* s : local)
    IEVO_CHECK(s && s->device() == Device::CPU, "gather_global: local stores must be host stores");
  if (me != root) {
    for (const ParamStore* s : local) mp.send(s->flat(), root);
    return;
  }
  IEVO_CHECK(global.size() == local.size(), "gather_global: ", local.size(), " local stores, ",
             global.size(), " global");
  std::set<std::string> placed;  // names taken from a lower rank already
  for (int r = 0; r < mp.size(); ++r) {
    const std::vector<ParamSpec> specs = specs_of(r);
    std::vector<ParamStore> received;
    for (size_t k = 0; k < local.size(); ++k) {
      if (r == me) continue;
      received.emplace_back(specs, local[k]->dtype(), Device::CPU);
      mp.recv(received.back().flat(), r);
    }
    for (size_t i = 0; i < specs.size(); ++i) {
      if (!placed.insert(specs[i].name).second && specs[i].split_dim < 0) continue;
      for (size_t k = 0; k < local.size(); ++k) {
        const ParamStore& src = r == me ? *local[k] : received[k];
        place_slice(specs[i], src[i], global[k]->get(specs[i].name));
      }
    }
  }
}

}  // namespace ievo
