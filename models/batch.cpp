#include "models/batch.h"

#include <algorithm>

#include "runtime/ops/targets.h"

namespace ievo {

int64_t Batch::num_targets() const {
  Tensor t = targets.is_cpu() ? targets : targets_host.defined() ? targets_host : targets.to(Device::CPU);
  int64_t n = 0;
  const int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i) n += p[i] != ops::kIgnoreIndex;
  return n;
}

Batch Batch::to(Device d) const {
  Batch b = *this;
  b.inputs = inputs.to(d);
  b.targets = targets.to(d);
  b.positions = positions.to(d);
  b.cu_seqlens = cu_seqlens.to(d);
  if (d != Device::CPU) {
    b.cu_seqlens_host = cu_seqlens.is_cpu() ? cu_seqlens
                        : cu_seqlens_host.defined() ? cu_seqlens_host : cu_seqlens.to(Device::CPU);
    b.inputs_host = inputs.is_cpu() ? inputs : inputs_host;  // never read back for this
    b.targets_host = targets.is_cpu() ? targets : targets_host;
  } else {
    b.cu_seqlens_host = b.inputs_host = b.targets_host = Tensor();
  }
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

Batch make_packed_batch(const std::vector<int32_t>& rows,
                        const std::vector<std::vector<int32_t>>& doc_starts, int64_t B, int64_t T) {
  IEVO_CHECK(static_cast<int64_t>(doc_starts.size()) == B, "make_packed_batch: document starts for ",
             doc_starts.size(), " rows, expected ", B);
  Batch b = make_batch(rows, B, T);
  int32_t* tgt = b.targets.data<int32_t>();
  int32_t* pos = b.positions.data<int32_t>();
  std::vector<int32_t> cu{0};
  int64_t longest = 0;
  for (int64_t r = 0; r < B; ++r) {
    int32_t prev = 0;
    for (int32_t s : doc_starts[r]) {
      IEVO_CHECK(s > prev && s <= T, "make_packed_batch: row ", r, ": document start ", s,
                 " not in (", prev, ", ", T, "] (starts must ascend)");
      prev = s;
      tgt[r * T + s - 1] = ops::kIgnoreIndex;  // token s - 1 ends a document
      if (s < T) cu.push_back(static_cast<int32_t>(r * T + s));  // s = T: target-only token
    }
    cu.push_back(static_cast<int32_t>((r + 1) * T));
  }
  for (size_t i = 0; i + 1 < cu.size(); ++i) {
    longest = std::max<int64_t>(longest, cu[i + 1] - cu[i]);
    for (int32_t t = cu[i]; t < cu[i + 1]; ++t) pos[t] = t - cu[i];
  }
  b.cu_seqlens = Tensor::from_vector(cu, {static_cast<int64_t>(cu.size())});
  b.max_seqlen = static_cast<int>(longest);
  return b;
}

}  // namespace ievo
