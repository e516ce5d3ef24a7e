#include "models/batch.h"

namespace ievo {

int64_t Batch::num_targets() const {
  Tensor t = targets.is_cpu() ? targets : targets.to(Device::CPU);
  int64_t n = 0;
  const int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i) n += p[i] != -100;
  return n;
}

Batch Batch::to(Device d) const {
  Batch b = *this;
  b.inputs = inputs.to(d);
  b.targets = targets.to(d);
  b.positions = positions.to(d);
  b.cu_seqlens = cu_seqlens.to(d);
  return b;
}

Batch make_batch(const std::vector<int32_t>& rows, int64_t B, int64_t T) {
  IEVO_CHECK(static_cast<int64_t>(rows.size()) == B * (T + 1), "make_batch: ", rows.size(),
             " tokens for ", B, " rows of ", T + 1);
  Batch b;
  b.inputs = Tensor::empty({B * T}, DType::I32);
  b.targets = Tensor::empty({B * T}, DType::I32);
  b.positions = Tensor::empty({B * T}, DType::I32);
  b.cu_seqlens = Tensor::empty({B + 1}, DType::I32);
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t t = 0; t < T; ++t) {
      b.inputs.data<int32_t>()[r * T + t] = rows[r * (T + 1) + t];
      b.targets.data<int32_t>()[r * T + t] = rows[r * (T + 1) + t + 1];
      b.positions.data<int32_t>()[r * T + t] = static_cast<int32_t>(t);
    }
    b.cu_seqlens.data<int32_t>()[r] = static_cast<int32_t>(r * T);
  }
  b.cu_seqlens.data<int32_t>()[B] = static_cast<int32_t>(B * T);
  b.max_seqlen = static_cast<int>(T);
  return b;
}

}  // namespace ievo
