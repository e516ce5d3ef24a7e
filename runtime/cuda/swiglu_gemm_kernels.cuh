// The CUTLASS kernel types behind swiglu_gemm.h, shared by its two units (swiglu_gemm_fwd.cu,
// swiglu_gemm_bwd.cu: each template takes about a minute to compile, so they build in parallel).
//
//   forward   D = h = silu(C) * round(acc)      C = gate (source),  aux store: up = round(acc)
//   backward  D = dgate(round(acc), g, C)       C = up (source),    aux load: g = gate,
//                                               aux store: dup = round(acc) * silu(g)
// round() is the accumulator rounded to bf16, so the results equal a bf16 GEMM output followed by
// the SwiGLU kernels (swiglu_math.cuh in both).
#pragma once
#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "runtime/cuda/swiglu_gemm.h"
#include "runtime/cuda/swiglu_math.cuh"

namespace ievo::cuda::swiglu_gemm::detail {

using namespace cute;
using Element = cutlass::bfloat16_t;
using cutlass::Array;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// h = silu(g) * round(acc): inputs (g, acc).
template <class T>
struct SiluMul;
template <int N>
struct SiluMul<Array<float, N>> {
  CUTLASS_DEVICE Array<float, N> operator()(Array<float, N> const& g, Array<float, N> const& acc) const {
    Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = swiglu_fwd_one(g[i], round_to_bf16(acc[i]));
    return out;
  }
};

// dup = round(acc) * silu(g): inputs (acc, g).
template <class T>
struct SwigluDup;
template <int N>
struct SwigluDup<Array<float, N>> {
  CUTLASS_DEVICE Array<float, N> operator()(Array<float, N> const& acc, Array<float, N> const& g) const {
    Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      float dg, du;
      swiglu_bwd_one(round_to_bf16(acc[i]), g[i], 0.0f, dg, du);
      out[i] = du;
    }
    return out;
  }
};

// dgate = round(acc) * u * silu'(g): inputs (acc, g, u).
template <class T>
struct SwigluDgate;
template <int N>
struct SwigluDgate<Array<float, N>> {
  CUTLASS_DEVICE Array<float, N> operator()(Array<float, N> const& acc, Array<float, N> const& g,
                                            Array<float, N> const& u) const {
    Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      float dg, du;
      swiglu_bwd_one(round_to_bf16(acc[i]), g[i], u[i], dg, du);
      out[i] = dg;
    }
    return out;
  }
};

using LayoutRow = cutlass::layout::RowMajor;
using StrideRow = cutlass::detail::TagToStrideC_t<LayoutRow>;  // (ld, _1, batch)

// One kernel: tile and cluster shapes, schedules, epilogue subtile (EpilogueTileAuto or a
// Shape), B's layout (forward: W [N, K] is K-major = ColumnMajor; backward: W [K, N] is N-major =
// RowMajor), and which epilogue.
template <class TileShape, class ClusterShape, class KernelSchedule, class EpiSchedule, class EpiTile,
          class LayoutB, bool kBackward>
struct Kernel {
  using EpiDesc = cutlass::epilogue::collective::detail::EpilogueDescriptor<
      TileShape, EpiTile, Element, Element, EpiSchedule>;
  using StoreDesc = cutlass::epilogue::collective::detail::AuxStoreDescriptor<EpiDesc, LayoutRow, Element>;
  using LoadDesc = cutlass::epilogue::collective::detail::AuxLoadDescriptor<EpiDesc, LayoutRow, Element>;
  using AuxStore = cutlass::epilogue::fusion::Sm90AuxStore<
      StoreDesc::Stages, typename EpiDesc::EpilogueTile, Element, kRound, typename StoreDesc::Stride,
      typename StoreDesc::SmemLayoutAtom, typename StoreDesc::CopyOpR2S>;
  using AuxLoad = cutlass::epilogue::fusion::Sm90AuxLoad<
      LoadDesc::Stages, typename EpiDesc::EpilogueTile, Element, typename LoadDesc::Stride,
      typename LoadDesc::SmemLayoutAtom, typename LoadDesc::CopyOpS2R>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using Src = cutlass::epilogue::fusion::Sm90SrcFetch<Element>;
  template <template <class> class Fn>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Fn, Element, float, kRound>;

  // forward: D = SiluMul(C, store_up(acc))
  using Forward = cutlass::epilogue::fusion::Sm90EVT<
      Compute<SiluMul>, Src, cutlass::epilogue::fusion::Sm90EVT<AuxStore, Acc>>;
  // backward, in topological order: 0 acc, 1 C = up, 2 g, 3 dup(0, 2), 4 store(3), 5 dgate(0, 2, 1)
  using Backward = cutlass::epilogue::fusion::Sm90TopologicalVisitor<
      float,
      cute::tuple<cute::seq<>, cute::seq<>, cute::seq<>, cute::seq<0, 2>, cute::seq<3>, cute::seq<0, 2, 1>>,
      Acc, Src, AuxLoad, Compute<SwigluDup>, AuxStore, Compute<SwigluDgate>>;
  using Fusion = std::conditional_t<kBackward, Backward, Forward>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      EpiTile, float, float, Element, LayoutRow, 8, Element,
      LayoutRow, 8, EpiSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutRow, 8, Element, LayoutB, 8,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

// The tile configurations (swiglu_gemm.h's config()):
//   0 cooperative 128x256, cluster 2x1, epilogue subtiles 128x32 (CUTLASS's choice)
//   1 ping-pong   128x128, cluster 2x1, epilogue subtiles 64x32
//   2 cooperative 128x256, cluster 1x2, epilogue subtiles 128x32
//   3 ping-pong   128x128, cluster 1x1, epilogue subtiles 64x64
//   4 cooperative 256x128, cluster 2x1, epilogue subtiles 128x32
using Auto = cutlass::epilogue::collective::EpilogueTileAuto;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;
template <int kConfig, class LayoutB, bool kBackward>
struct Config;
template <class B, bool kBwd>
struct Config<0, B, kBwd> : Kernel<Shape<_128, _256, _64>, Shape<_2, _1, _1>, Coop, CoopEpi, Auto, B, kBwd> {};
template <class B, bool kBwd>
struct Config<1, B, kBwd> : Kernel<Shape<_128, _128, _64>, Shape<_2, _1, _1>, Ping, PingEpi, Auto, B, kBwd> {};
template <class B, bool kBwd>
struct Config<2, B, kBwd> : Kernel<Shape<_128, _256, _64>, Shape<_1, _2, _1>, Coop, CoopEpi, Auto, B, kBwd> {};
template <class B, bool kBwd>
struct Config<3, B, kBwd> : Kernel<Shape<_128, _128, _64>, Shape<_1, _1, _1>, Ping, PingEpi, Shape<_64, _64>, B, kBwd> {};
template <class B, bool kBwd>
struct Config<4, B, kBwd> : Kernel<Shape<_256, _128, _64>, Shape<_2, _1, _1>, Coop, CoopEpi, Auto, B, kBwd> {};
constexpr int kConfigs = 5;

int sm_count();  // 0 when unknown (CUTLASS then asks the driver)

// A (m x k, row-major, lda) and B (ColumnMajor: [n, k] with row stride ldb; RowMajor: [k, n])
// strides in the kernel's types.
template <class Gemm>
auto stride_a(int64_t ld, int64_t m) {
  return typename Gemm::GemmKernel::StrideA(make_stride(ld, _1{}, m * ld));
}
template <class Gemm, class LayoutB>
auto stride_b(int64_t ld, int64_t n, int64_t k) {
  if constexpr (std::is_same_v<LayoutB, cutlass::layout::ColumnMajor>)
    return typename Gemm::GemmKernel::StrideB(make_stride(ld, _1{}, n * ld));
  else
    return typename Gemm::GemmKernel::StrideB(make_stride(_1{}, ld, k * ld));
}
inline StrideRow stride_row(int64_t ld, int64_t m) { return make_stride(ld, _1{}, m * ld); }

// Runs a kernel with its arguments; false when CUTLASS cannot take them (nothing launched).
template <class Gemm>
bool launch(typename Gemm::Arguments& args, cudaStream_t stream) {
  args.hw_info.sm_count = sm_count();
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
  if (Gemm::get_workspace_size(args) != 0) return false;  // the persistent scheduler needs none
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return false;
  return gemm.run(stream) == cutlass::Status::kSuccess;  // the caller checks the launch
}

// Per-direction entry points (defined in the _fwd / _bwd units).
bool forward_config(int config, Rows x, Rows w, Rows gate, void* up, int64_t ld_up, void* h,
                    int64_t ld_h, int64_t m, int64_t n, int64_t k, cudaStream_t stream);
bool backward_config(int config, Rows dy, Rows w, Rows gate, Rows up, void* dgate, int64_t ld_dgate,
                     void* dup, int64_t ld_dup, int64_t m, int64_t n, int64_t k, cudaStream_t stream);

bool plain_gemm(Rows x, Rows w, void* out, int64_t ld_out, int64_t m, int64_t n, int64_t k,
                cudaStream_t stream);

}  // namespace ievo::cuda::swiglu_gemm::detail
