#include "launch/convert.h"

#include "launch/checkpoint.h"
#include "models/hf_adapter.h"
#include "models/hf_config.h"
#include "models/params.h"

namespace ievo {

void convert_to_hf(const std::string& ckpt_dir, const std::string& out_dir, DType dtype,
                   std::optional<Arch> arch) {
  ModelConfig c = read_checkpoint_model_config(ckpt_dir);
  ParamStore params(param_specs(c), DType::F32, Device::CPU);
  load_checkpoint(ckpt_dir, {{"params", &params}}, /*optimizer_optional=*/true);
  if (arch) c.arch = *arch;  // same parameters, another file layout
  save_hf(out_dir, c, params, dtype);
}

void convert_from_hf(const std::string& hf_dir, const std::string& ckpt_dir) {
  const ModelConfig c = read_hf_model_config(hf_dir);
  ParamStore params(param_specs(c), DType::F32, Device::CPU);
  load_hf_weights(hf_dir, c, params);
  CheckpointState state;  // step 0, nothing consumed
  save_checkpoint(ckpt_dir, c, state, {{"params", &params}}, /*update_latest=*/false);
}

}  // namespace ievo
