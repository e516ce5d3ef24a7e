// up = x W^T and h = silu(gate) * up in one CUTLASS kernel (see swiglu_gemm_kernels.cuh).
#include "runtime/cuda/swiglu_gemm_kernels.cuh"

namespace ievo::cuda::swiglu_gemm::detail {
namespace {

template <class K>
bool run(Rows x, Rows w, Rows gate, void* up, int64_t ld_up, void* h, int64_t ld_h, int64_t m,
         int64_t n, int64_t k, cudaStream_t stream) {
  using Gemm = typename K::Gemm;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {int(m), int(n), int(k), 1},
      {static_cast<const Element*>(x.p), stride_a<Gemm>(x.ld, m), static_cast<const Element*>(w.p),
       stride_b<Gemm, cutlass::layout::ColumnMajor>(w.ld, n, k)},
      {{/*C*/ {}, {/*acc*/ {}, /*store up*/ {static_cast<Element*>(up), stride_row(ld_up, m)}}, /*silu*mul*/ {}},
       static_cast<const Element*>(gate.p), stride_row(gate.ld, m), static_cast<Element*>(h),
       stride_row(ld_h, m)}};
  return launch<Gemm>(args, stream);
}

}  // namespace

bool forward_config(int config, Rows x, Rows w, Rows gate, void* up, int64_t ld_up, void* h,
                    int64_t ld_h, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  using B = cutlass::layout::ColumnMajor;
  if (config == 1) return run<Pingpong<B, false>>(x, w, gate, up, ld_up, h, ld_h, m, n, k, stream);
  return run<Cooperative<B, false>>(x, w, gate, up, ld_up, h, ld_h, m, n, k, stream);
}

}  // namespace ievo::cuda::swiglu_gemm::detail
