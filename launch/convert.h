// `ievo convert`: ievo checkpoint <-> HF directory.
#pragma once
#include <optional>
#include <string>

#include "models/model_config.h"
#include "runtime/dtype.h"

namespace ievo {

// Reads CKPT_DIR's model config and params group and writes an HF directory (config.json +
// safetensors) with weights as `dtype`, in `arch`'s layout (default: the checkpoint's).
void convert_to_hf(const std::string& ckpt_dir, const std::string& out_dir, DType dtype,
                   std::optional<Arch> arch);

// Reads an HF directory (config.json + safetensors, Llama or InternLM2) and writes a checkpoint
// with step 0 and only the params group (f32). The parent's `latest` is not touched;
// latest_checkpoint() still finds a step_<N> directory by scanning.
void convert_from_hf(const std::string& hf_dir, const std::string& ckpt_dir);

}  // namespace ievo
