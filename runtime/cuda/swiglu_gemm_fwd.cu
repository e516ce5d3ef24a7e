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
  switch (config) {
    case 1: return run<Config<1, B, false>>(x, w, gate, up, ld_up, h, ld_h, m, n, k, stream);
    case 2: return run<Config<2, B, false>>(x, w, gate, up, ld_up, h, ld_h, m, n, k, stream);
    case 3: return run<Config<3, B, false>>(x, w, gate, up, ld_up, h, ld_h, m, n, k, stream);
    case 4: return run<Config<4, B, false>>(x, w, gate, up, ld_up, h, ld_h, m, n, k, stream);
    default: return run<Config<0, B, false>>(x, w, gate, up, ld_up, h, ld_h, m, n, k, stream);
  }
}

// The same mainloop (config 0) with CUTLASS's plain epilogue, D = acc: the baseline that shows
// what the SwiGLU epilogue costs (bench_gpu_kernels).
bool plain_gemm(Rows x, Rows w, void* out, int64_t ld_out, int64_t m, int64_t n, int64_t k,
                cudaStream_t stream) {
  using Tile = Shape<_128, _256, _64>;
  using Cluster = Shape<_2, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, Auto, float, float, void,
      LayoutRow, 8, Element, LayoutRow, 8, CoopEpi,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutRow, 8, Element,
      cutlass::layout::ColumnMajor, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      Coop>::CollectiveOp;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>>;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {int(m), int(n), int(k), 1},
      {static_cast<const Element*>(x.p), stride_a<Gemm>(x.ld, m), static_cast<const Element*>(w.p),
       stride_b<Gemm, cutlass::layout::ColumnMajor>(w.ld, n, k)},
      {{1.0f, 0.0f}, nullptr, stride_row(ld_out, m), static_cast<Element*>(out), stride_row(ld_out, m)}};
  return launch<Gemm>(args, stream);
}

}  // namespace ievo::cuda::swiglu_gemm::detail
