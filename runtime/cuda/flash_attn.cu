// FlashAttention-2-style forward and backward for bf16 and fp16, hd 64/128 (see flash_attn.h).
// The element type T (bf16 or f16) only changes the mma.sync variant (.bf16 / .f16 inputs, fp32
// accumulation either way) and the rounding of P and dS to T; loads, ldmatrix and the tiling are
// 16-bit moves.
//
// Fragment layouts of mma.sync.m16n8k16.row.col (g = lane / 4, t = lane % 4):
//   A 16x16 (row-major): a0 = A[g][2t,2t+1], a1 = A[g+8][2t,2t+1], a2 = A[g][2t+8,+9],
//                        a3 = A[g+8][2t+8,+9]   (two 16-bit values per 32-bit register, low = first)
//   B 16x8:  b0 = B[2t,2t+1][g], b1 = B[2t+8,2t+9][g]
//   C 16x8:  c0,c1 = C[g][2t,2t+1], c2,c3 = C[g+8][2t,2t+1]
// So the C fragments of two adjacent 8-column tiles form the A fragment of one 16-wide k-step
// (used for P @ V, dS @ K, P^T @ dO, dS^T @ Q without going through shared memory).
// B operands stored "n-major" (K[key][d] for S = Q K^T) are read as 32-bit pairs; B operands
// stored "k-major" (V[key][d] for P V) are read with ldmatrix.trans. Shared tiles have rows of
// hd + 8 elements, so the 8 rows a quad touches fall in distinct banks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "runtime/cuda/check.h"
#include "runtime/cuda/flash_attn.h"
#include "runtime/cuda/wgmma.cuh"

namespace ievo::cuda::flash {
namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
constexpr int kThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, f16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// p[0] += a, p[1] += b (one 8-byte atomic on sm_90, two 4-byte ones before it).
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// A block's tile: grid (tiles, sequences, heads). Query tiles run the grid's x reversed, the
// longest (diagonal-most) tiles first; key tiles in order, tile 0 (the most work) first. b: the
// sequence's first token among the packed rows, len its length, row0 the tile's first row within
// it, head: blockIdx.z (a query head, or the kv head of key tiles).
struct BlockTile {
  int b, len, row0, head;
};
template <int ROWS, bool kQueryTile>
__device__ __forceinline__ BlockTile block_tile(const Params& p) {
  const int tile = kQueryTile ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int seq = blockIdx.y;
  const int b = p.cu[seq];
  return {b, p.cu[seq + 1] - b, tile * ROWS, static_cast<int>(blockIdx.z)};
}

// Two MMAs sharing A: c0 += A B(b[0], b[1]), c1 += A B(b[2], b[3]) (a b_pair_* fragment pair).
template <typename T>
__device__ __forceinline__ void mma_x2(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[4]) {
  mma16816<T>(c0, a, b[0], b[1]);
  mma16816<T>(c1, a, b[2], b[3]);
}

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Two floats rounded to T, packed (.x, the low half, = lo).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, f16>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// A fragment of the 16x16 block at `base` (row-major, leading dimension ld).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* base, int ld, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const T* p0 = base + g * ld + 2 * t;
  const T* p1 = p0 + 8 * ld;
  a[0] = ld32(p0);
  a[1] = ld32(p1);
  a[2] = ld32(p0 + 8);
  a[3] = ld32(p1 + 8);
}

// B fragment with B[k][n] = X[n][k], X row-major at base = &X[n0][k0].
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t& b0, uint32_t& b1, const T* base, int ld,
                                          int lane) {
  const T* p = base + (lane >> 2) * ld + 2 * (lane & 3);
  b0 = ld32(p);
  b1 = ld32(p + 8);
}

// B fragment with B[k][n] = X[k][n], X row-major at base = &X[k0][n0] (ldmatrix.trans: lanes
// 0-7 address rows k0..k0+7 of the first 8x8 matrix, lanes 8-15 rows k0+8..k0+15).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t& b0, uint32_t& b1, const T* base, int ld,
                                          int lane) {
  const T* p = base + (lane & 15) * ld;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(b0), "=r"(b1)
               : "r"(addr));
}

// Rows [0, R) of a tile: token tok0 + r, head h of a [N, H, HD] tensor; rows >= valid are zero.
template <int HD, int R, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t tok0, int valid,
                                          int heads, int h) {
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  constexpr int LD = HD + 8;
  for (int idx = threadIdx.x; idx < R * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < valid)
      val = *reinterpret_cast<const uint4*>(src + ((tok0 + r) * heads + h) * HD + c * 8);
    *reinterpret_cast<uint4*>(dst + r * LD + c * 8) = val;
  }
}

// C fragments (16 rows x 16 cols from tiles 2j, 2j+1) -> A fragment of one k-step.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// 2^x with subnormal results flushed to zero (ex2.approx.ftz: one MUFU op; exp2f's subnormal
// handling costs extra instructions in the softmax loops). Used by the forward and fused backward.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------------------------------------
// Asynchronous copies and ldmatrix.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, or 16 zero bytes where !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Four 8x8 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// Fragment loads with ldmatrix.x4 from a row-major shared tile X with leading dimension ld:
//   a_frag:   the A fragment of the 16x16 block X[r0..+16][c0..+16];
//   b_pair_nk: B fragments of two 8-column tiles, B[k][n] = X[n][k] for n in n0..+16, k in k0..+16
//              (r[0], r[1] for n0..+8; r[2], r[3] for n0+8..+16);
//   b_pair_kn: B fragments of two 8-column tiles, B[k][n] = X[k][n] for k in k0..+16, n in n0..+16
//              (ldmatrix.trans; r[0], r[1] for n0..+8; r[2], r[3] for n0+8..+16);
//   a_frag_t: the A fragment of A[m][k] = X[k][m] for m in m0..+16, k in k0..+16.
template <typename T>
__device__ __forceinline__ void a_frag(uint32_t (&r)[4], const T* X, int ld, int r0, int c0, int lane) {
  ldsm_x4(r, X + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8);
}
template <typename T>
__device__ __forceinline__ void b_pair_nk(uint32_t (&r)[4], const T* X, int ld, int n0, int k0, int lane) {
  ldsm_x4(r, X + (n0 + (lane >> 4) * 8 + (lane & 7)) * ld + k0 + ((lane >> 3) & 1) * 8);
}
template <typename T>
__device__ __forceinline__ void b_pair_kn(uint32_t (&r)[4], const T* X, int ld, int k0, int n0, int lane) {
  ldsm_x4_t(r, X + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + n0 + (lane >> 4) * 8);
}
template <typename T>
__device__ __forceinline__ void a_frag_t(uint32_t (&r)[4], const T* X, int ld, int m0, int k0, int lane) {
  ldsm_x4_t(r, X + (k0 + (lane >> 4) * 8 + (lane & 7)) * ld + m0 + ((lane >> 3) & 1) * 8);
}

// Rows [0, R) of a tile (token tok0 + r, head h of a [N, H, HD] tensor) into shared memory with
// cp.async; rows >= valid are zero-filled.
template <int HD, int R, typename T, int NT = kThreads>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int64_t tok0, int valid,
                                                int heads, int h) {
  constexpr int kChunks = HD / 8;
  constexpr int LD = HD + 8;
#pragma unroll
  for (int idx = threadIdx.x; idx < R * kChunks; idx += NT) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool ok = r < valid;
    cp_async16(dst + r * LD + c * 8, ok ? src + ((tok0 + r) * heads + h) * HD + c * 8 : src, ok);
  }
}

// The backward's per-query-tile lse and D (BQ entries each from [H, N] arrays at offset off;
// entries >= valid zero-filled): lse by threads 0..BQ-1, D by threads BQ..2BQ-1.
template <int BQ>
__device__ __forceinline__ void load_lse_delta(float* lse_dst, float* d_dst, const float* lse,
                                               const float* delta, int64_t off, int valid) {
  if (threadIdx.x >= 2 * BQ) return;
  const int r = threadIdx.x % BQ;
  const bool ok = r < valid;
  const float* src = threadIdx.x < BQ ? lse : delta;
  cp_async4((threadIdx.x < BQ ? lse_dst : d_dst) + r, ok ? src + off + r : src, ok);
}

// A warp's dK (times scale) and dV rows key[0], key[1] (C fragments over HD / 8 column tiles)
// to [N, Hkv, HD] tensors; keys >= len are skipped.
template <typename T, int HD>
__device__ __forceinline__ void store_dk_dv(T* dk, T* dv, const float (&dka)[HD / 8][4],
                                            const float (&dva)[HD / 8][4], const int (&key)[2],
                                            int len, int b, int hkv, int kvh, float scale, int t) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (key[i] >= len) continue;
    const int64_t off = ((b + static_cast<int64_t>(key[i])) * hkv + kvh) * HD;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dk + off + dt * 8 + 2 * t) =
          pack2<T>(dka[dt][2 * i] * scale, dka[dt][2 * i + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv + off + dt * 8 + 2 * t) = pack2<T>(dva[dt][2 * i], dva[dt][2 * i + 1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: one block of 4 warps per (128-query tile, sequence, query head); warp w owns query
// rows 32w..32w+31 (two 16-row MMA tiles, so every K/V fragment read from shared memory feeds
// two MMAs). Key/value tiles of 64 are double-buffered with cp.async; the causal mask is applied
// only on tiles that cross a warp's diagonal or the sequence end, and a warp skips tiles wholly
// above its diagonal. Q fragments stay in registers for hd 64 and are re-read (ldmatrix) for 128.
template <int HD, int BC_>
struct FwdTile {
  static constexpr int BR = 128, BC = BC_, LD = HD + 8;
  static constexpr int kSmem = (BR + 4 * BC) * LD * 2;
};

template <typename T, int HD, int BC_>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(Params p, T* out, float* lse) {
  using Cfg = FwdTile<HD, BC_>;
  constexpr int BR = Cfg::BR, BC = Cfg::BC, LD = Cfg::LD;
  constexpr bool kQRegs = HD <= 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BR * LD;      // [2][BC][LD]
  T* Vs = Ks + 2 * BC * LD;  // [2][BC][LD]
  const BlockTile bt = block_tile<BR, true>(p);
  const int b = bt.b, len = bt.len, q0 = bt.row0, h = bt.head;
  if (q0 >= len) return;
  const int kvh = h / (p.hq / p.hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const int kend = min(len, q0 + BR);
  const int n_kt = (kend + BC - 1) / BC;

  load_tile_async<HD, BR>(Qs, static_cast<const T*>(p.q), b + q0, min(BR, len - q0), p.hq, h);
  load_tile_async<HD, BC>(Ks, K, b, min(BC, len), p.hkv, kvh);
  load_tile_async<HD, BC>(Vs, V, b, min(BC, len), p.hkv, kvh);
  cp_async_commit();

  const int wr = warp * 32;     // the warp's first row within the tile
  const int wrow0 = q0 + wr;    // ... within the sequence
  float o[2][HD / 8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
  float m_r[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
  float l_r[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  const float sl2 = p.scale * kLog2e;
  uint32_t qreg[kQRegs ? 2 : 1][kQRegs ? HD / 16 : 1][4];

  for (int kt = 0; kt < n_kt; ++kt) {
    const int k0 = kt * BC;
    if (kt + 1 < n_kt) {
      const int st = (kt + 1) & 1, k1 = k0 + BC;
      load_tile_async<HD, BC>(Ks + st * BC * LD, K, b + k1, min(BC, len - k1), p.hkv, kvh);
      load_tile_async<HD, BC>(Vs + st * BC * LD, V, b + k1, min(BC, len - k1), p.hkv, kvh);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (kQRegs) {
      if (kt == 0) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int kk = 0; kk < HD / 16; ++kk) a_frag(qreg[mi][kk], Qs, LD, wr + mi * 16, kk * 16, lane);
      }
    }
    const T* Kt = Ks + (kt & 1) * BC * LD;
    const T* Vt = Vs + (kt & 1) * BC * LD;
    if (k0 <= wrow0 + 31 && wrow0 < len) {  // some key of this tile is visible to the warp
      float s[2][BC / 8][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) s[mi][nt][0] = s[mi][nt][1] = s[mi][nt][2] = s[mi][nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t qa[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          if constexpr (kQRegs) {
#pragma unroll
            for (int r = 0; r < 4; ++r) qa[mi][r] = qreg[mi][kk][r];
          } else {
            a_frag(qa[mi], Qs, LD, wr + mi * 16, kk * 16, lane);
          }
        }
#pragma unroll
        for (int np = 0; np < BC / 16; ++np) {
          uint32_t kb[4];
          b_pair_nk(kb, Kt, LD, np * 16, kk * 16, lane);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma_x2<T>(s[mi][2 * np], s[mi][2 * np + 1], qa[mi], kb);
          }
        }
      }
      if (k0 + BC - 1 > wrow0 || k0 + BC > len) {  // the tile crosses the diagonal or the end
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int key = k0 + nt * 8 + 2 * t + (r & 1);
              const int row = wrow0 + mi * 16 + g + 8 * (r >> 1);
              if (key > row || key >= len) s[mi][nt][r] = -INFINITY;
            }
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < BC / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * i], s[mi][nt][2 * i + 1]));
          const float mnew = fmaxf(m_r[mi][i], quad_max(mx));
          const float base = mnew == -INFINITY ? 0.f : mnew * sl2;
          const float corr = fast_exp2(m_r[mi][i] * sl2 - base);
          m_r[mi][i] = mnew;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < BC / 8; ++nt) {
            s[mi][nt][2 * i] = fast_exp2(fmaf(s[mi][nt][2 * i], sl2, -base));
            s[mi][nt][2 * i + 1] = fast_exp2(fmaf(s[mi][nt][2 * i + 1], sl2, -base));
            sum += s[mi][nt][2 * i] + s[mi][nt][2 * i + 1];
          }
          l_r[mi][i] = l_r[mi][i] * corr + sum;
#pragma unroll
          for (int dt = 0; dt < HD / 8; ++dt) {
            o[mi][dt][2 * i] *= corr;
            o[mi][dt][2 * i + 1] *= corr;
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) {
        uint32_t pa[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) c_to_a<T>(pa[mi], s[mi][2 * kk], s[mi][2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t vb[4];
          b_pair_kn(vb, Vt, LD, kk * 16, dp * 16, lane);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma_x2<T>(o[mi][2 * dp], o[mi][2 * dp + 1], pa[mi], vb);
          }
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // O through the warp's own rows of Qs, then 16-byte stores.
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float l = quad_sum(l_r[mi][i]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int r = wr + mi * 16 + g + 8 * i;
#pragma unroll
      for (int dt = 0; dt < HD / 8; ++dt)
        *reinterpret_cast<uint32_t*>(Qs + r * LD + dt * 8 + 2 * t) =
            pack2<T>(o[mi][dt][2 * i] * inv, o[mi][dt][2 * i + 1] * inv);
      if (t == 0 && q0 + r < len)
        lse[static_cast<int64_t>(h) * p.n_tokens + b + q0 + r] = m_r[mi][i] * p.scale + logf(l);
    }
  __syncwarp();
  constexpr int kChunks = HD / 8;
#pragma unroll
  for (int idx = lane; idx < 32 * kChunks; idx += 32) {
    const int r = wr + idx / kChunks, c = idx % kChunks;
    if (q0 + r < len)
      *reinterpret_cast<uint4*>(out + ((b + static_cast<int64_t>(q0 + r)) * p.hq + h) * HD + c * 8) =
          *reinterpret_cast<const uint4*>(Qs + r * LD + c * 8);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward with Hopper's warpgroup MMA (sm_90a): one block of 2 warpgroups per (128-query tile,
// sequence, query head), warpgroup w owning query rows 64w..64w+63. Q, K and V tiles sit in
// shared memory in wgmma's 128-byte-swizzled layout ([HD / 64][rows][64] elements, the 16-byte
// chunk c of row r stored at chunk c ^ (r % 8)); K/V tiles of 128 keys are double-buffered with
// cp.async. S = Q K^T is one m64n128k16 wgmma per 16 of the head dim (both operands from shared
// memory, K-major); P, rounded to T in registers, is the A operand of O += P V (V read N-major
// from shared memory). Softmax, masking and the output as in fwd_kernel.
template <int HD>
struct WgTile {
  static constexpr int BR = 128, BC = 128, kNT = 256;
  static constexpr int kQBytes = BR * HD * 2, kKVBytes = BC * HD * 2;
  static constexpr int kSmem = kQBytes + 4 * kKVBytes + 1024;  // + alignment slack
};

// 16-byte chunks of rows [0, R) (token tok0 + r, head h of a [N, H, HD] tensor) into the swizzled
// layout at dst (1024-byte aligned); rows >= valid are zero-filled.
template <int HD, int R, int NT, typename T>
__device__ __forceinline__ void load_tile_sw128(unsigned char* dst, const T* src, int64_t tok0,
                                                int valid, int heads, int h) {
  constexpr int kChunks = HD / 8;
  static_assert(R * kChunks % NT == 0, "whole passes over the tile");
#pragma unroll
  for (int i = 0; i < R * kChunks / NT; ++i) {
    const int idx = threadIdx.x + i * NT, r = idx / kChunks, c = idx % kChunks;
    const bool ok = r < valid;
    unsigned char* d = dst + (c >> 3) * (R * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);
    cp_async16(d, ok ? src + ((tok0 + r) * heads + h) * HD + c * 8 : src, ok);
  }
}

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)  // used by the wgmma kernels only
// Shared-memory matrix descriptor, 128-byte swizzle: lbo / sbo in bytes (see the PTX ISA's
// wgmma matrix descriptor: start address, leading and stride byte offsets in 16-byte units).
__device__ __forceinline__ uint64_t sw128_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return (static_cast<uint64_t>(smem_u32(p) & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// Pins registers that an in-flight wgmma reads or writes: an empty asm that "uses and redefines"
// them, placed after the wgmma.wait that retires the operation, so the compiler keeps them live
// (and does not give them to other values) until then.
template <int N>
__device__ __forceinline__ void keep(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void keep(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif

// One warpgroup's online-softmax step on a tile of scores s (its 64 rows x BC keys, accumulator
// layout): masks keys > row or >= len when `mask`, updates the running max m_r and sum l_r, and
// returns P rounded to T as the A fragments of the next P V product, and in corr the factor the
// output accumulators must be multiplied by.
template <typename T, int BC>
__device__ __forceinline__ void wg_softmax(float (&s)[BC / 2], uint32_t (&pa)[BC / 16][4], float (&m_r)[2],
                                           float (&l_r)[2], float (&corr)[2], bool mask, int k0,
                                           const int (&row)[2], int len, int t, float sl2) {
  if (mask) {
#pragma unroll
    for (int j = 0; j < BC / 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int key = k0 + j * 8 + 2 * t + (r & 1);
        if (key > row[r >> 1] || key >= len) s[4 * j + r] = -INFINITY;
      }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BC / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]));
    const float mnew = fmaxf(m_r[i], quad_max(mx));
    const float bse = mnew == -INFINITY ? 0.f : mnew * sl2;
    corr[i] = fast_exp2(m_r[i] * sl2 - bse);
    m_r[i] = mnew;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < BC / 8; ++j) {
      s[4 * j + 2 * i] = fast_exp2(fmaf(s[4 * j + 2 * i], sl2, -bse));
      s[4 * j + 2 * i + 1] = fast_exp2(fmaf(s[4 * j + 2 * i + 1], sl2, -bse));
      sum += s[4 * j + 2 * i] + s[4 * j + 2 * i + 1];
    }
    l_r[i] = l_r[i] * corr[i] + sum;
  }
#pragma unroll
  for (int kk = 0; kk < BC / 16; ++kk) {
    pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// Software pipeline (FlashAttention-3's intra-warpgroup overlap): iteration j issues S_j = Q K_j^T
// and O += P_{j-1} V_{j-1} back to back, then runs the softmax of S_j while the second product is
// still on the tensor cores. K runs one tile ahead of V: the copies issued at the top of iteration
// j (K_{j+1}, V_j) land by the top of iteration j + 1; two stages each.
template <typename T, int HD>
__global__ void __launch_bounds__(256, 1) fwd_wgmma_kernel(Params p, T* out, float* lse) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = WgTile<HD>;
  constexpr int BR = Cfg::BR, BC = Cfg::BC, NT = Cfg::kNT;
  constexpr bool kF16 = std::is_same_v<T, f16>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  unsigned char* Qs = base;
  unsigned char* Ks = Qs + Cfg::kQBytes;       // [2] stages
  unsigned char* Vs = Ks + 2 * Cfg::kKVBytes;  // [2] stages
  const BlockTile bt = block_tile<BR, true>(p);
  const int b = bt.b, len = bt.len, q0 = bt.row0, h = bt.head;
  if (q0 >= len) return;
  const int kvh = h / (p.hq / p.hkv);
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  // BR == BC and q0 % BR == 0: every tile k0 <= q0 is visible to both warpgroups' rows; only the
  // last one (the diagonal) or one crossing the sequence end needs the mask.
  const int n_kt = (min(len, q0 + BR) + BC - 1) / BC;
  const int wrow0 = q0 + wg * 64;
  const bool active = wrow0 < len;  // the second warpgroup may lie past the sequence end
  const int row[2] = {wrow0 + warp * 16 + g, wrow0 + warp * 16 + g + 8};
  const float sl2 = p.scale * kLog2e;
  auto kv_tile = [&](unsigned char* dst, const T* src, int kt) {
    const int k0 = kt * BC;
    load_tile_sw128<HD, BC, NT>(dst, src, b + k0, min(BC, len - k0), p.hkv, kvh);
  };
  auto s_product = [&](float (&s)[BC / 2], const unsigned char* Kt) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      const uint64_t da = sw128_desc(Qs + (kk >> 2) * (BR * 128) + wg * 64 * 128 + (kk & 3) * 32, 16, 1024);
      const uint64_t db = sw128_desc(Kt + (kk >> 2) * (BC * 128) + (kk & 3) * 32, 16, 1024);
      if constexpr (kF16) wgmma::ss_f16_n128(s, da, db, kk > 0);
      else wgmma::ss_bf16_n128(s, da, db, kk > 0);
    }
  };
  auto pv_product = [&](float (&o)[HD / 2], const uint32_t (&pa)[BC / 16][4], const unsigned char* Vt) {
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      const uint64_t db = sw128_desc(Vt + kk * 16 * 128, BC * 128, 1024);
      if constexpr (HD == 128) {
        if constexpr (kF16) wgmma::rs_f16_n128_tb(o, pa[kk], db);
        else wgmma::rs_bf16_n128_tb(o, pa[kk], db);
      } else {
        if constexpr (kF16) wgmma::rs_f16_n64_tb(o, pa[kk], db);
        else wgmma::rs_bf16_n64_tb(o, pa[kk], db);
      }
    }
  };
  auto tile_ready = [] {  // the copies issued so far have landed and are visible to the tensor cores
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
  };

  load_tile_sw128<HD, BR, NT>(Qs, static_cast<const T*>(p.q), b + q0, min(BR, len - q0), p.hq, h);
  kv_tile(Ks, K, 0);
  cp_async_commit();
  tile_ready();
  if (n_kt > 1) kv_tile(Ks + Cfg::kKVBytes, K, 1);
  kv_tile(Vs, V, 0);
  cp_async_commit();

  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f}, corr[2];
  // P of the previous tile, in two arrays used alternately (the loop is unrolled by two): a plain
  // copy from the new P into the one an in-flight wgmma reads lets the compiler merge the two,
  // and ptxas then serializes the wgmmas (C7513).
  uint32_t pa0[BC / 16][4], pa1[BC / 16][4];
  if (active) {
    float s[BC / 2];
    wgmma::fence();
    s_product(s, Ks);
    wgmma::commit();
    wgmma::wait<0>();
    keep(s);
    wg_softmax<T, BC>(s, pa0, m_r, l_r, corr, n_kt == 1 || BC > len, 0, row, len, t, sl2);
  }
  // Iteration kt: P_{kt-1} in pcur, P_kt into pnext.
  auto step = [&](int kt, uint32_t (&pcur)[BC / 16][4], uint32_t (&pnext)[BC / 16][4]) {
    tile_ready();  // K_kt and V_{kt-1}; every warpgroup is done with iteration kt - 1
    if (kt + 1 < n_kt) kv_tile(Ks + ((kt + 1) & 1) * Cfg::kKVBytes, K, kt + 1);
    kv_tile(Vs + (kt & 1) * Cfg::kKVBytes, V, kt);
    cp_async_commit();
    if (!active) return;
    float s[BC / 2];
    keep(o);
    wgmma::fence();
    s_product(s, Ks + (kt & 1) * Cfg::kKVBytes);
    wgmma::commit();
    pv_product(o, pcur, Vs + ((kt - 1) & 1) * Cfg::kKVBytes);
    wgmma::commit();
    wgmma::wait<1>();  // S_kt
    keep(s);
    const int k0 = kt * BC;
    wg_softmax<T, BC>(s, pnext, m_r, l_r, corr, k0 + BC - 1 > wrow0 || k0 + BC > len, k0, row, len, t, sl2);
    keep(pnext);  // the softmax runs before the wait below, not after it (while P V is in flight)
    keep(corr);
    keep(l_r);
    wgmma::wait<0>();  // O += P_{kt-1} V_{kt-1}
    keep(o);
    keep(pcur);
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) {
      o[4 * j + 0] *= corr[0];
      o[4 * j + 1] *= corr[0];
      o[4 * j + 2] *= corr[1];
      o[4 * j + 3] *= corr[1];
    }
  };
  int kt = 1;
  for (; kt + 1 < n_kt; kt += 2) {
    step(kt, pa0, pa1);
    step(kt + 1, pa1, pa0);
  }
  if (kt < n_kt) step(kt++, pa0, pa1);
  tile_ready();  // V_{n-1}
  if (active) {
    keep(o);
    wgmma::fence();
    const unsigned char* Vt = Vs + ((n_kt - 1) & 1) * Cfg::kKVBytes;
    if (n_kt & 1) pv_product(o, pa0, Vt);  // branches, not a run-time choice of array (local memory)
    else pv_product(o, pa1, Vt);
    wgmma::commit();
    wgmma::wait<0>();
    keep(o);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = quad_sum(l_r[i]);
    if (row[i] >= len) continue;
    const float inv = 1.f / l;
    T* orow = out + ((b + static_cast<int64_t>(row[i])) * p.hq + h) * HD;
#pragma unroll
    for (int j = 0; j < HD / 8; ++j)
      *reinterpret_cast<uint32_t*>(orow + j * 8 + 2 * t) = pack2<T>(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
    if (t == 0) lse[static_cast<int64_t>(h) * p.n_tokens + b + row[i]] = m_r[i] * p.scale + logf(l);
  }
#else
  (void)p, (void)out, (void)lse;
  __trap();  // run_forward launches this only where the sm_90a image is present
#endif
}

// Backward with Hopper's warpgroup MMA (sm_90a), FlashAttention-2's fused design (see
// bwd_fused_kernel) on wgmma: one block of 2 warpgroups per (128-key tile, sequence, kv head),
// warpgroup w owning keys 64w..64w+63, looping over the group's query heads and 64-query tiles
// from the diagonal to the end (Q, dO, lse and D double-buffered with cp.async). All tiles use
// wgmma's 128B-swizzled layout ([HD / 64][rows][64]), read K-major or MN-major as each product
// needs:  S^T = K Q^T and dP^T = V dO^T (both operands from shared memory);  dV += P^T dO and
// dK += dS^T Q (P^T, dS^T in registers);  dQ_w = dS_w K_w over the warpgroup's own keys (dS^T
// stored M-major to shared memory), added into the fp32 workspace with atomics.
template <int HD>
struct WgBwdTile {
  static constexpr int BC = 128, BQ = 64, kNT = 256;
  static constexpr int kKBytes = BC * HD * 2, kQBytes = BQ * HD * 2, kSBytes = BC * BQ * 2;
  static constexpr int kSmem = 2 * kKBytes + 4 * kQBytes + kSBytes + 4 * BQ * 4 + 1024;
};

template <typename T, int HD>
__global__ void __launch_bounds__(256, 1)
    bwd_wgmma_kernel(Params p, const T* dout, const float* lse, const float* delta, float* dq_acc,
                     T* dk, T* dv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = WgBwdTile<HD>;
  constexpr int BC = Cfg::BC, BQ = Cfg::BQ, NT = Cfg::kNT;
  constexpr bool kF16 = std::is_same_v<T, f16>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  unsigned char* Ks = base;
  unsigned char* Vs = Ks + Cfg::kKBytes;
  unsigned char* Qs = Vs + Cfg::kKBytes;      // [2] stages
  unsigned char* dOs = Qs + 2 * Cfg::kQBytes;  // [2] stages
  unsigned char* dSs = dOs + 2 * Cfg::kQBytes;  // dS^T [BC keys][BQ queries], M-major for dQ
  float* lse_s = reinterpret_cast<float*>(dSs + Cfg::kSBytes);  // [2][BQ]
  float* d_s = lse_s + 2 * BQ;                                  // [2][BQ]
  const BlockTile bt = block_tile<BC, false>(p);
  const int b = bt.b, len = bt.len, k0 = bt.row0, kvh = bt.head;
  if (k0 >= len) return;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const T* Q = static_cast<const T*>(p.q);
  const int rep = p.hq / p.hkv;
  const int n_qt = (len - k0 + BQ - 1) / BQ;  // query tiles k0, k0 + BQ, ...
  const int n_iter = rep * n_qt;
  const int kw = k0 + wg * 64;  // the warpgroup's first key
  const int key[2] = {kw + warp * 16 + g, kw + warp * 16 + g + 8};
  const float sl2 = p.scale * kLog2e;

  auto issue = [&](int it) {  // iteration it's (head, query tile) into stage it & 1
    const int hh = kvh * rep + it / n_qt, qs = k0 + (it % n_qt) * BQ, st = it & 1;
    load_tile_sw128<HD, BQ, NT>(Qs + st * Cfg::kQBytes, Q, b + qs, min(BQ, len - qs), p.hq, hh);
    load_tile_sw128<HD, BQ, NT>(dOs + st * Cfg::kQBytes, dout, b + qs, min(BQ, len - qs), p.hq, hh);
    load_lse_delta<BQ>(lse_s + st * BQ, d_s + st * BQ, lse, delta,
                       static_cast<int64_t>(hh) * p.n_tokens + b + qs, len - qs);
    cp_async_commit();
  };
  load_tile_sw128<HD, BC, NT>(Ks, static_cast<const T*>(p.k), b + k0, min(BC, len - k0), p.hkv, kvh);
  load_tile_sw128<HD, BC, NT>(Vs, static_cast<const T*>(p.v), b + k0, min(BC, len - k0), p.hkv, kvh);
  issue(0);  // commits K and V with iteration 0's loads

  float dka[HD / 2], dva[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) dka[i] = dva[i] = 0.f;

  for (int it = 0; it < n_iter; ++it) {
    const int hh = kvh * rep + it / n_qt, qs = k0 + (it % n_qt) * BQ, st = it & 1;
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // this stage landed; every warpgroup is done with the other one
    if (it + 1 < n_iter) issue(it + 1);
    const unsigned char* Qt = Qs + st * Cfg::kQBytes;
    const unsigned char* dOt = dOs + st * Cfg::kQBytes;
    // Keys of a warpgroup all after the tile's last query, or past the end: nothing to add. The
    // first warpgroup's keys are never (qs >= k0); the second's are on the diagonal tile.
    const bool second_active = !(k0 + 64 > qs + BQ - 1 || k0 + 64 >= len);
    const bool active = wg == 0 || second_active;
    if (active) {
      const float* lse_t = lse_s + st * BQ;
      const float* d_t = d_s + st * BQ;
      float sp[BQ / 2], dp[BQ / 2];
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        const int off = (kk >> 2) * (BC * 128) + wg * 64 * 128 + (kk & 3) * 32;
        const int qoff = (kk >> 2) * (BQ * 128) + (kk & 3) * 32;
        if constexpr (kF16) {
          wgmma::ss_f16_n64(sp, sw128_desc(Ks + off, 16, 1024), sw128_desc(Qt + qoff, 16, 1024), kk > 0);
          wgmma::ss_f16_n64(dp, sw128_desc(Vs + off, 16, 1024), sw128_desc(dOt + qoff, 16, 1024), kk > 0);
        } else {
          wgmma::ss_bf16_n64(sp, sw128_desc(Ks + off, 16, 1024), sw128_desc(Qt + qoff, 16, 1024), kk > 0);
          wgmma::ss_bf16_n64(dp, sw128_desc(Vs + off, 16, 1024), sw128_desc(dOt + qoff, 16, 1024), kk > 0);
        }
      }
      wgmma::commit();
      wgmma::wait<0>();
      keep(sp);
      keep(dp);
      const bool edge = qs < kw + 64 || qs + BQ > len || kw + 64 > len;  // diagonal or sequence end
      uint32_t pt[BQ / 16][4], dst[BQ / 16][4];
#pragma unroll
      for (int j = 0; j < BQ / 8; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int ql = j * 8 + 2 * t + (r & 1), qr = qs + ql, kr = key[r >> 1];
          float pv = fast_exp2(fmaf(sp[4 * j + r], sl2, -lse_t[ql] * kLog2e));
          if (edge && !(kr <= qr && qr < len && kr < len)) pv = 0.f;
          sp[4 * j + r] = pv;                               // P^T
          dp[4 * j + r] = pv * (dp[4 * j + r] - d_t[ql]);  // dS^T
        }
        // dS^T (key row R, query columns 8j + 2t, +1) into dSs: 128B-swizzled rows of 64 queries.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int R = wg * 64 + warp * 16 + g + 8 * i;
          *reinterpret_cast<uint32_t*>(dSs + R * 128 + ((j ^ (R & 7)) << 4) + 4 * t) =
              pack2<T>(dp[4 * j + 2 * i], dp[4 * j + 2 * i + 1]);
        }
      }
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        pt[kk][0] = pack2<T>(sp[8 * kk + 0], sp[8 * kk + 1]);
        pt[kk][1] = pack2<T>(sp[8 * kk + 2], sp[8 * kk + 3]);
        pt[kk][2] = pack2<T>(sp[8 * kk + 4], sp[8 * kk + 5]);
        pt[kk][3] = pack2<T>(sp[8 * kk + 6], sp[8 * kk + 7]);
        dst[kk][0] = pack2<T>(dp[8 * kk + 0], dp[8 * kk + 1]);
        dst[kk][1] = pack2<T>(dp[8 * kk + 2], dp[8 * kk + 3]);
        dst[kk][2] = pack2<T>(dp[8 * kk + 4], dp[8 * kk + 5]);
        dst[kk][3] = pack2<T>(dp[8 * kk + 6], dp[8 * kk + 7]);
      }
      fence_proxy_async();  // dS^T (ordinary stores) is read by the tensor cores below
      keep(dka);
      keep(dva);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        // B = dO / Q with k = query, n = head dim: N-major reads of the same tiles.
        const uint64_t bo = sw128_desc(dOt + kk * 16 * 128, BQ * 128, 1024);
        const uint64_t bq = sw128_desc(Qt + kk * 16 * 128, BQ * 128, 1024);
        if constexpr (HD == 128) {
          if constexpr (kF16) {
            wgmma::rs_f16_n128_tb(dva, pt[kk], bo);
            wgmma::rs_f16_n128_tb(dka, dst[kk], bq);
          } else {
            wgmma::rs_bf16_n128_tb(dva, pt[kk], bo);
            wgmma::rs_bf16_n128_tb(dka, dst[kk], bq);
          }
        } else {
          if constexpr (kF16) {
            wgmma::rs_f16_n64_tb(dva, pt[kk], bo);
            wgmma::rs_f16_n64_tb(dka, dst[kk], bq);
          } else {
            wgmma::rs_bf16_n64_tb(dva, pt[kk], bo);
            wgmma::rs_bf16_n64_tb(dka, dst[kk], bq);
          }
        }
      }
      wgmma::commit();
      wgmma::wait<0>();
      keep(dka);
      keep(dva);
      keep(pt);
      keep(dst);
    }
    // dQ = dS K, added to dq_acc. hd 128: warpgroup w takes head-dim columns 64w.. over the
    // block's active keys (both warpgroups' dS^T rows: a block barrier); hd 64: each warpgroup
    // its own keys over all columns (a warpgroup barrier; twice the atomics).
    constexpr bool kSplitN = HD == 128;
    constexpr int kN = kSplitN ? 64 : HD;
    if constexpr (kSplitN) __syncthreads();
    else asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
    if (!kSplitN && !active) continue;
    const int key0 = kSplitN ? 0 : wg * 64;                    // first dS^T row summed
    const int n_kk = kSplitN ? (second_active ? 8 : 4) : 4;  // 16-key steps
    const int col0 = kSplitN ? wg * 64 : 0;
    float dqa[kN / 2];
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      if (kk >= n_kk) break;
      const uint64_t da = sw128_desc(dSs + (key0 + kk * 16) * 128, 1024, 1024);
      const uint64_t db = sw128_desc(Ks + (col0 / 64) * (BC * 128) + (key0 + kk * 16) * 128, BC * 128, 1024);
      if constexpr (kF16) wgmma::ss_f16_n64_tt(dqa, da, db, kk > 0);
      else wgmma::ss_bf16_n64_tt(dqa, da, db, kk > 0);
    }
    wgmma::commit();
    wgmma::wait<0>();
    keep(dqa);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int qr = qs + warp * 16 + g + 8 * i;
      if (qr >= len) continue;
      float* dstp = dq_acc + ((b + static_cast<int64_t>(qr)) * p.hq + hh) * HD + col0 + 2 * t;
#pragma unroll
      for (int j = 0; j < kN / 8; ++j)
        atomic_add2(dstp + j * 8, dqa[4 * j + 2 * i], dqa[4 * j + 2 * i + 1]);
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (key[i] >= len) continue;
    const int64_t off = ((b + static_cast<int64_t>(key[i])) * p.hkv + kvh) * HD;
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) {
      *reinterpret_cast<uint32_t*>(dk + off + j * 8 + 2 * t) =
          pack2<T>(dka[4 * j + 2 * i] * p.scale, dka[4 * j + 2 * i + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv + off + j * 8 + 2 * t) = pack2<T>(dva[4 * j + 2 * i], dva[4 * j + 2 * i + 1]);
    }
  }
#else
  (void)p, (void)dout, (void)lse, (void)delta, (void)dq_acc, (void)dk, (void)dv;
  __trap();  // run_backward launches this only where the sm_90a image is present
#endif
}

__global__ void wgmma_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

// ---------------------------------------------------------------------------------------------
// The deterministic backward kernels' products for a warp's 16 rows (mma.sync, operands in shared
// memory with leading dimension LD). c1 = A1 B1^T and c2 = A2 B2^T over the head dim: a1, a2 at
// the warp's first row, b1, b2 [N rows, HD] (S and dP, or their transposes).
template <typename T, int HD, int N, int LD>
__device__ __forceinline__ void two_products_nt(float (&c1)[N / 8][4], float (&c2)[N / 8][4], const T* a1,
                                                const T* a2, const T* b1, const T* b2, int lane) {
  zero(c1);
  zero(c2);
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t x1[4], x2[4];
    load_a(x1, a1 + kk * 16, LD, lane);
    load_a(x2, a2 + kk * 16, LD, lane);
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      uint32_t f0, f1;
      load_b_nk(f0, f1, b1 + nt * 8 * LD + kk * 16, LD, lane);
      mma16816<T>(c1[nt], x1, f0, f1);
      load_b_nk(f0, f1, b2 + nt * 8 * LD + kk * 16, LD, lane);
      mma16816<T>(c2[nt], x2, f0, f1);
    }
  }
}

// acc += C B: C (16 x N) the fragments c, rounded to T; B [N rows, HD].
template <typename T, int HD, int N, int LD>
__device__ __forceinline__ void accumulate_cb(float (&acc)[HD / 8][4], const float (&c)[N / 8][4],
                                              const T* bm, int lane) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    uint32_t a[4];
    c_to_a<T>(a, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
      uint32_t f0, f1;
      load_b_kn(f0, f1, bm + kk * 16 * LD + dt * 8, LD, lane);
      mma16816<T>(acc[dt], a, f0, f1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
template <typename T, int HD>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(Params p, const T* dout,
                                                          const float* lse, const float* delta,
                                                          T* dq) {
  constexpr int BR = 64, BC = 32, LD = HD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* dOs = Qs + BR * LD;
  T* Ks = dOs + BR * LD;
  T* Vs = Ks + BC * LD;
  const BlockTile bt = block_tile<BR, true>(p);
  const int b = bt.b, len = bt.len, q0 = bt.row0, h = bt.head;
  if (q0 >= len) return;
  const int kvh = h / (p.hq / p.hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  load_tile<HD, BR>(Qs, static_cast<const T*>(p.q), b + q0, min(BR, len - q0), p.hq, h);
  load_tile<HD, BR>(dOs, dout, b + q0, min(BR, len - q0), p.hq, h);

  const float sl2 = p.scale * kLog2e;
  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float lse2[2], dr[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t idx = static_cast<int64_t>(h) * p.n_tokens + b + row[i];
    lse2[i] = row[i] < len ? lse[idx] * kLog2e : 0.f;
    dr[i] = row[i] < len ? delta[idx] : 0.f;
  }
  float acc[HD / 8][4];
  zero(acc);
  const int kend = min(len, q0 + BR);
  const int n_kt = (kend + BC - 1) / BC;

  for (int kt = 0; kt < n_kt; ++kt) {
    const int k0 = kt * BC;
    __syncthreads();  // previous tile fully consumed (and Q/dO loaded on the first pass)
    load_tile<HD, BC>(Ks, K, b + k0, min(BC, len - k0), p.hkv, kvh);
    load_tile<HD, BC>(Vs, V, b + k0, min(BC, len - k0), p.hkv, kvh);
    __syncthreads();
    float s[BC / 8][4], dp[BC / 8][4];
    two_products_nt<T, HD, BC, LD>(s, dp, Qs + warp * 16 * LD, dOs + warp * 16 * LD, Ks, Vs, lane);  // S, dP
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int key = k0 + nt * 8 + 2 * t + (r & 1);
        const int qr = row[r >> 1];
        const bool valid = key <= qr && qr < len && key < len;
        const float pv = valid ? exp2f(s[nt][r] * sl2 - lse2[r >> 1]) : 0.f;
        s[nt][r] = pv * (dp[nt][r] - dr[r >> 1]);  // dS
      }
    }
    accumulate_cb<T, HD, BC, LD>(acc, s, Ks, lane);  // dQ += dS K
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (row[i] >= len) continue;
    T* drow = dq + ((b + static_cast<int64_t>(row[i])) * p.hq + h) * HD;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt)
      *reinterpret_cast<uint32_t*>(drow + dt * 8 + 2 * t) =
          pack2<T>(acc[dt][2 * i] * p.scale, acc[dt][2 * i + 1] * p.scale);
  }
}

// ---------------------------------------------------------------------------------------------
template <typename T, int HD>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(Params p, const T* dout,
                                                            const float* lse, const float* delta,
                                                            T* dk, T* dv) {
  constexpr int BC = 64, BQ = 32, LD = HD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BC * LD;
  T* Qs = Vs + BC * LD;
  T* dOs = Qs + BQ * LD;
  float* lse_s = reinterpret_cast<float*>(dOs + BQ * LD);
  float* d_s = lse_s + BQ;
  const BlockTile bt = block_tile<BC, false>(p);
  const int b = bt.b, len = bt.len, k0 = bt.row0, kvh = bt.head;
  if (k0 >= len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* Q = static_cast<const T*>(p.q);
  load_tile<HD, BC>(Ks, static_cast<const T*>(p.k), b + k0, min(BC, len - k0), p.hkv, kvh);
  load_tile<HD, BC>(Vs, static_cast<const T*>(p.v), b + k0, min(BC, len - k0), p.hkv, kvh);

  const float sl2 = p.scale * kLog2e;
  const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  float dka[HD / 8][4], dva[HD / 8][4];
  zero(dka);
  zero(dva);
  const int rep = p.hq / p.hkv;

  for (int hh = kvh * rep; hh < (kvh + 1) * rep; ++hh) {
    for (int qs = k0 / BQ * BQ; qs < len; qs += BQ) {
      __syncthreads();  // previous Q/dO tile consumed
      load_tile<HD, BQ>(Qs, Q, b + qs, min(BQ, len - qs), p.hq, hh);
      load_tile<HD, BQ>(dOs, dout, b + qs, min(BQ, len - qs), p.hq, hh);
      if (threadIdx.x < BQ) {
        const int qr = qs + threadIdx.x;
        const int64_t idx = static_cast<int64_t>(hh) * p.n_tokens + b + qr;
        lse_s[threadIdx.x] = qr < len ? lse[idx] * kLog2e : 0.f;
        d_s[threadIdx.x] = qr < len ? delta[idx] : 0.f;
      }
      __syncthreads();
      float st[BQ / 8][4], dpt[BQ / 8][4];  // S^T = K Q^T, dP^T = V dO^T
      two_products_nt<T, HD, BQ, LD>(st, dpt, Ks + warp * 16 * LD, Vs + warp * 16 * LD, Qs, dOs, lane);
#pragma unroll
      for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int ql = nt * 8 + 2 * t + (r & 1), qr = qs + ql;
          const int kr = key[r >> 1];
          const bool valid = kr <= qr && qr < len && kr < len;
          const float pv = valid ? exp2f(st[nt][r] * sl2 - lse_s[ql]) : 0.f;
          st[nt][r] = pv;                            // P^T
          dpt[nt][r] = pv * (dpt[nt][r] - d_s[ql]);  // dS^T
        }
      }
      accumulate_cb<T, HD, BQ, LD>(dva, st, dOs, lane);   // dV += P^T dO
      accumulate_cb<T, HD, BQ, LD>(dka, dpt, Qs, lane);  // dK += dS^T Q
    }
  }

  store_dk_dv<T, HD>(dk, dv, dka, dva, key, len, b, p.hkv, kvh, p.scale, t);
}

// ---------------------------------------------------------------------------------------------
// Backward, fused (FlashAttention-2's design): one block of W warps per (16W-key tile, sequence,
// kv head), warp w owning keys 16w..16w+15. It loops over the group's query heads and the 64-query
// tiles from the diagonal to the sequence end (Q, dO, lse and D double-buffered with cp.async),
// keeps dK and dV in registers, and adds each tile's dQ = dS K into an fp32 buffer with atomics
// (dS^T goes through shared memory so each warp adds 16 whole query rows). The order of those
// additions varies from run to run; cuda::deterministic() selects the two kernels above instead.
template <int HD, int W>
struct BwdTile {
  static constexpr int kNT = 32 * W;
  static constexpr int BC = 16 * W, BQ = 64, LD = HD + 8, LDS = BQ + 8;
  static constexpr int kSmem = (2 * BC + 4 * BQ) * LD * 2 + BC * LDS * 2 + 4 * BQ * 4;
  static_assert(kNT >= 2 * BQ, "one thread per lse and per D entry of a query tile");
};

template <typename T, int HD, int W>
__global__ void __launch_bounds__(32 * W, 8 / W)
    bwd_fused_kernel(Params p, const T* dout, const float* lse, const float* delta, float* dq_acc,
                     T* dk, T* dv) {
  using Cfg = BwdTile<HD, W>;
  constexpr int BC = Cfg::BC, BQ = Cfg::BQ, LD = Cfg::LD, LDS = Cfg::LDS, NT = Cfg::kNT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BC * LD;
  T* Qs = Vs + BC * LD;       // [2][BQ][LD]
  T* dOs = Qs + 2 * BQ * LD;  // [2][BQ][LD]
  T* dSs = dOs + 2 * BQ * LD;  // [BC][LDS]: dS^T of the current tile
  float* lse_s = reinterpret_cast<float*>(dSs + BC * LDS);  // [2][BQ]
  float* d_s = lse_s + 2 * BQ;                              // [2][BQ]
  const BlockTile bt = block_tile<BC, false>(p);
  const int b = bt.b, len = bt.len, k0 = bt.row0, kvh = bt.head;
  if (k0 >= len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* Q = static_cast<const T*>(p.q);
  const int rep = p.hq / p.hkv;
  const int n_qt = (len - k0 + BQ - 1) / BQ;  // query tiles k0, k0 + BQ, ... (BQ divides BC)
  const int n_iter = rep * n_qt;

  auto issue = [&](int it) {  // iteration it's (head, query tile) into stage it & 1
    const int hh = kvh * rep + it / n_qt, qs = k0 + (it % n_qt) * BQ, st = it & 1;
    load_tile_async<HD, BQ, T, NT>(Qs + st * BQ * LD, Q, b + qs, min(BQ, len - qs), p.hq, hh);
    load_tile_async<HD, BQ, T, NT>(dOs + st * BQ * LD, dout, b + qs, min(BQ, len - qs), p.hq, hh);
    load_lse_delta<BQ>(lse_s + st * BQ, d_s + st * BQ, lse, delta,
                       static_cast<int64_t>(hh) * p.n_tokens + b + qs, len - qs);
    cp_async_commit();
  };
  load_tile_async<HD, BC, T, NT>(Ks, static_cast<const T*>(p.k), b + k0, min(BC, len - k0), p.hkv, kvh);
  load_tile_async<HD, BC, T, NT>(Vs, static_cast<const T*>(p.v), b + k0, min(BC, len - k0), p.hkv, kvh);
  issue(0);  // commits K and V with iteration 0's loads

  const float sl2 = p.scale * kLog2e;
  const int wk = warp * 16;
  const int key[2] = {k0 + wk + g, k0 + wk + g + 8};
  float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
  for (int i = 0; i < HD / 8; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) dka[i][r] = dva[i][r] = 0.f;

  for (int it = 0; it < n_iter; ++it) {
    const int hh = kvh * rep + it / n_qt, qs = k0 + (it % n_qt) * BQ, st = it & 1;
    if (it + 1 < n_iter) {
      issue(it + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* Qt = Qs + st * BQ * LD;
    const T* dOt = dOs + st * BQ * LD;
    const float* lse_t = lse_s + st * BQ;
    const float* d_t = d_s + st * BQ;
    float sp[BQ / 8][4], dp[BQ / 8][4];
    zero(sp);
    zero(dp);
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t ak[4], av[4];
      a_frag(ak, Ks, LD, wk, kk * 16, lane);
      a_frag(av, Vs, LD, wk, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < BQ / 16; ++np) {
        uint32_t qb[4], ob[4];
        b_pair_nk(qb, Qt, LD, np * 16, kk * 16, lane);
        mma_x2<T>(sp[2 * np], sp[2 * np + 1], ak, qb);  // S^T = K Q^T
        b_pair_nk(ob, dOt, LD, np * 16, kk * 16, lane);
        mma_x2<T>(dp[2 * np], dp[2 * np + 1], av, ob);  // dP^T = V dO^T
      }
    }
    const bool edge = qs < k0 + BC || qs + BQ > len || k0 + BC > len;  // diagonal or sequence end
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int ql = nt * 8 + 2 * t + (r & 1), qr = qs + ql, kr = key[r >> 1];
        float pv = fast_exp2(fmaf(sp[nt][r], sl2, -lse_t[ql] * kLog2e));
        if (edge && !(kr <= qr && qr < len && kr < len)) pv = 0.f;
        sp[nt][r] = pv;                           // P^T
        dp[nt][r] = pv * (dp[nt][r] - d_t[ql]);  // dS^T
      }
    }
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i)
        *reinterpret_cast<uint32_t*>(dSs + (wk + g + 8 * i) * LDS + nt * 8 + 2 * t) =
            pack2<T>(dp[nt][2 * i], dp[nt][2 * i + 1]);
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t ap[4], ads[4];
      c_to_a<T>(ap, sp[2 * kk], sp[2 * kk + 1]);
      c_to_a<T>(ads, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int dq2 = 0; dq2 < HD / 16; ++dq2) {
        uint32_t ob[4], qb[4];
        b_pair_kn(ob, dOt, LD, kk * 16, dq2 * 16, lane);
        mma_x2<T>(dva[2 * dq2], dva[2 * dq2 + 1], ap, ob);  // dV += P^T dO
        b_pair_kn(qb, Qt, LD, kk * 16, dq2 * 16, lane);
        mma_x2<T>(dka[2 * dq2], dka[2 * dq2 + 1], ads, qb);  // dK += dS^T Q
      }
    }
    __syncthreads();  // dS^T complete
    // dQ = dS (BQ x BC) K (BC x HD), added to dq_acc: warp w takes query rows 16 (w % 4).. and
    // the (w / 4)-th of W / 4 column ranges of HD.
    constexpr int kCols = HD / (W / 4);
    const int qm = (warp & 3) * 16, dc = (warp >> 2) * kCols;
    float dqa[kCols / 8][4];
#pragma unroll
    for (int i = 0; i < kCols / 8; ++i) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      a_frag_t(a, dSs, LDS, qm, kk * 16, lane);
#pragma unroll
      for (int dq2 = 0; dq2 < kCols / 16; ++dq2) {
        uint32_t kb[4];
        b_pair_kn(kb, Ks, LD, kk * 16, dc + dq2 * 16, lane);
        mma_x2<T>(dqa[2 * dq2], dqa[2 * dq2 + 1], a, kb);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int qr = qs + qm + g + 8 * i;
      if (qr >= len) continue;
      float* dst = dq_acc + ((b + static_cast<int64_t>(qr)) * p.hq + hh) * HD + dc + 2 * t;
#pragma unroll
      for (int dt = 0; dt < kCols / 8; ++dt)
        atomic_add2(dst + dt * 8, dqa[dt][2 * i], dqa[dt][2 * i + 1]);
    }
    __syncthreads();  // stage st and dS^T are rewritten next
  }

  store_dk_dv<T, HD>(dk, dv, dka, dva, key, len, b, p.hkv, kvh, p.scale, t);
}

// dq = scale * dq_acc, rounded to T (8 elements a thread).
template <typename T>
__global__ void dq_convert_kernel(const float* acc, T* dq, int64_t n, float scale) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  const float4 a = *reinterpret_cast<const float4*>(acc + i);
  const float4 c = *reinterpret_cast<const float4*>(acc + i + 4);
  uint4 o;
  o.x = pack2<T>(a.x * scale, a.y * scale);
  o.y = pack2<T>(a.z * scale, a.w * scale);
  o.z = pack2<T>(c.x * scale, c.y * scale);
  o.w = pack2<T>(c.z * scale, c.w * scale);
  *reinterpret_cast<uint4*>(dq + i) = o;
}

template <typename Kernel>
void allow_smem(Kernel k, int bytes) {
  if (bytes > 48 * 1024)
    IEVO_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// allow_smem once per kernel (the first launch's).
template <auto Kernel>
void allow_smem_once(int bytes) {
  static const bool done = (allow_smem(Kernel, bytes), true);
  (void)done;
}

// Whether this binary has an sm_90a image for the current GPU (wgmma): probed once.
bool wgmma_image() {
  static const bool ok = [] {
    int major = 0, dev = 0;
    IEVO_CUDA_CHECK(cudaGetDevice(&dev));
    IEVO_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major != 9) return false;
    int* d = nullptr;
    int h = 0;
    IEVO_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
    wgmma_probe_kernel<<<1, 1>>>(d);
    IEVO_CUDA_CHECK(cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost));
    IEVO_CUDA_CHECK(cudaFree(d));
    return h == 1;
  }();
  return ok;
}

std::atomic<bool> g_use_wgmma{true};
bool use_wgmma_now() { return g_use_wgmma.load() && wgmma_image(); }

template <typename T, int HD>
void run_forward(const Params& p, void* out, float* lse, cudaStream_t s) {
  if (use_wgmma_now()) {
    using W = WgTile<HD>;
    allow_smem_once<fwd_wgmma_kernel<T, HD>>(W::kSmem);
    const dim3 grid((p.max_seqlen + W::BR - 1) / W::BR, p.num_seqs, p.hq);
    fwd_wgmma_kernel<T, HD><<<grid, W::kNT, W::kSmem, s>>>(p, static_cast<T*>(out), lse);
    IEVO_CUDA_LAUNCH_CHECK("flash fwd_wgmma_kernel");
    return;
  }
  using F = FwdTile<HD, 64>;
  allow_smem_once<fwd_kernel<T, HD, F::BC>>(F::kSmem);
  const dim3 grid((p.max_seqlen + F::BR - 1) / F::BR, p.num_seqs, p.hq);
  fwd_kernel<T, HD, F::BC><<<grid, kThreads, F::kSmem, s>>>(p, static_cast<T*>(out), lse);
  IEVO_CUDA_LAUNCH_CHECK("flash fwd_kernel");
}

// Warps of the fused backward: 8 (128-key tiles) measured 201 TFLOP/s against 191 for 4 (64-key
// tiles) on the H100 at hd 128 (B4 T4096 h16), 142 / 143 at TinyLlama's hd 64 shape.
constexpr int kBwdWarps = 8;

template <typename T, int HD>
void run_backward(const Params& p, const void* dout, const float* lse, const float* delta,
                  void* dq, void* dk, void* dv, float* dq_acc, cudaStream_t s) {
  constexpr int LD = HD + 8;
  constexpr int smem_dq = (2 * 64 + 2 * 32) * LD * 2;
  constexpr int smem_kv = (2 * 64 + 2 * 32) * LD * 2 + 2 * 32 * 4;
  const T* g = static_cast<const T*>(dout);
  const dim3 grid_k((p.max_seqlen + 63) / 64, p.num_seqs, p.hkv);
  if (dq_acc) {
    const int64_t n = static_cast<int64_t>(p.n_tokens) * p.hq * HD;
    IEVO_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, n * sizeof(float), s));
    if (use_wgmma_now()) {
      using W = WgBwdTile<HD>;
      allow_smem_once<bwd_wgmma_kernel<T, HD>>(W::kSmem);
      const dim3 grid_w((p.max_seqlen + W::BC - 1) / W::BC, p.num_seqs, p.hkv);
      bwd_wgmma_kernel<T, HD><<<grid_w, W::kNT, W::kSmem, s>>>(
          p, g, lse, delta, dq_acc, static_cast<T*>(dk), static_cast<T*>(dv));
      IEVO_CUDA_LAUNCH_CHECK("flash bwd_wgmma_kernel");
    } else {
      using F = BwdTile<HD, kBwdWarps>;
      allow_smem_once<bwd_fused_kernel<T, HD, kBwdWarps>>(F::kSmem);
      const dim3 grid_f((p.max_seqlen + F::BC - 1) / F::BC, p.num_seqs, p.hkv);
      bwd_fused_kernel<T, HD, kBwdWarps><<<grid_f, F::kNT, F::kSmem, s>>>(
          p, g, lse, delta, dq_acc, static_cast<T*>(dk), static_cast<T*>(dv));
      IEVO_CUDA_LAUNCH_CHECK("flash bwd_fused_kernel");
    }
    dq_convert_kernel<T><<<static_cast<unsigned>((n / 8 + 255) / 256), 256, 0, s>>>(
        dq_acc, static_cast<T*>(dq), n, p.scale);
    IEVO_CUDA_LAUNCH_CHECK("flash dq_convert_kernel");
    return;
  }
  allow_smem_once<bwd_dq_kernel<T, HD>>(smem_dq);
  allow_smem_once<bwd_dkdv_kernel<T, HD>>(smem_kv);
  const dim3 grid_q((p.max_seqlen + 63) / 64, p.num_seqs, p.hq);
  bwd_dq_kernel<T, HD><<<grid_q, kThreads, smem_dq, s>>>(p, g, lse, delta, static_cast<T*>(dq));
  IEVO_CUDA_LAUNCH_CHECK("flash bwd_dq_kernel");
  bwd_dkdv_kernel<T, HD><<<grid_k, kThreads, smem_kv, s>>>(p, g, lse, delta, static_cast<T*>(dk),
                                                           static_cast<T*>(dv));
  IEVO_CUDA_LAUNCH_CHECK("flash bwd_dkdv_kernel");
}

// Calls f(T{}, std::integral_constant<int, HD>{}) for the element type and head dim of p.
template <typename F>
void dispatch(const Params& p, F&& f) {
  auto by_hd = [&](auto tag) {
    if (p.hd == 64) f(tag, std::integral_constant<int, 64>{});
    else if (p.hd == 128) f(tag, std::integral_constant<int, 128>{});
    else IEVO_FAIL("flash attention: head dim ", p.hd, " not supported (64 or 128)");
  };
  if (p.fp16) by_hd(f16{});
  else by_hd(bf16{});
}

}  // namespace

bool supported(int hd) { return hd == 64 || hd == 128; }

bool wgmma_available() { return wgmma_image(); }
void set_use_wgmma(bool on) { g_use_wgmma.store(on); }
bool use_wgmma() { return use_wgmma_now(); }

size_t backward_workspace(const Params& p) {
  return static_cast<size_t>(p.n_tokens) * p.hq * p.hd * sizeof(float);
}

void forward(const Params& p, void* out, float* lse, cudaStream_t s) {
  dispatch(p, [&](auto tag, auto hd) { run_forward<decltype(tag), decltype(hd)::value>(p, out, lse, s); });
}

void backward(const Params& p, const void* dout, const float* lse, const float* delta, void* dq,
              void* dk, void* dv, float* dq_acc, cudaStream_t s) {
  dispatch(p, [&](auto tag, auto hd) {
    run_backward<decltype(tag), decltype(hd)::value>(p, dout, lse, delta, dq, dk, dv, dq_acc, s);
  });
}

}  // namespace ievo::cuda::flash
