// dgate and dup from dh = dy W in one CUTLASS kernel, dh never stored (see swiglu_gemm_kernels.cuh).
#include "runtime/cuda/swiglu_gemm_kernels.cuh"

namespace ievo::cuda::swiglu_gemm::detail {
namespace {

template <class K>
bool run(Rows dy, Rows w, Rows gate, Rows up, void* dgate, int64_t ld_dgate, void* dup,
         int64_t ld_dup, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  using Gemm = typename K::Gemm;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {int(m), int(n), int(k), 1},
      {static_cast<const Element*>(dy.p), stride_a<Gemm>(dy.ld, m), static_cast<const Element*>(w.p),
       stride_b<Gemm, cutlass::layout::RowMajor>(w.ld, n, k)},
      {{/*acc*/ {}, /*C = up*/ {},
        /*g*/ {static_cast<const Element*>(gate.p), Element(0), stride_row(gate.ld, m)},
        /*dup*/ {}, /*store dup*/ {static_cast<Element*>(dup), stride_row(ld_dup, m)}, /*dgate*/ {}},
       static_cast<const Element*>(up.p), stride_row(up.ld, m), static_cast<Element*>(dgate),
       stride_row(ld_dgate, m)}};
  return launch<Gemm>(args, stream);
}

}  // namespace

bool backward_config(int config, Rows dy, Rows w, Rows gate, Rows up, void* dgate, int64_t ld_dgate,
                     void* dup, int64_t ld_dup, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  using B = cutlass::layout::RowMajor;
  switch (config) {
    case 1: return run<Config<1, B, true>>(dy, w, gate, up, dgate, ld_dgate, dup, ld_dup, m, n, k, stream);
    case 2: return run<Config<2, B, true>>(dy, w, gate, up, dgate, ld_dgate, dup, ld_dup, m, n, k, stream);
    case 3: return run<Config<3, B, true>>(dy, w, gate, up, dgate, ld_dgate, dup, ld_dup, m, n, k, stream);
    case 4: return run<Config<4, B, true>>(dy, w, gate, up, dgate, ld_dgate, dup, ld_dup, m, n, k, stream);
    default: return run<Config<0, B, true>>(dy, w, gate, up, dgate, ld_dgate, dup, ld_dup, m, n, k, stream);
  }
}

}  // namespace ievo::cuda::swiglu_gemm::detail
