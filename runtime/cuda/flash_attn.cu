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
#include <type_traits>

#include "runtime/cuda/check.h"
#include "runtime/cuda/flash_attn.h"

namespace ievo::cuda::flash {
namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
constexpr int kThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

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

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------------------------------------
template <typename T, int HD>
__global__ void __launch_bounds__(kThreads) fwd_kernel(Params p, T* out, float* lse) {
  constexpr int BR = 64, BC = 64, LD = HD + 8;
  __shared__ __align__(16) T Ks[BC * LD];
  __shared__ __align__(16) T Vs[BC * LD];
  const int tile = gridDim.x - 1 - blockIdx.x;  // longest (diagonal-most) tiles first
  const int seq = blockIdx.y, h = blockIdx.z;
  const int b = p.cu[seq], len = p.cu[seq + 1] - b;
  const int q0 = tile * BR;
  if (q0 >= len) return;
  const int kvh = h / (p.hq / p.hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);

  // Q fragments (this warp's 16 rows) via the K buffer.
  load_tile<HD, BR>(Ks, Q, b + q0, min(BR, len - q0), p.hq, h);
  __syncthreads();
  uint32_t qf[HD / 16][4];
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) load_a(qf[kk], Ks + warp * 16 * LD + kk * 16, LD, lane);
  __syncthreads();

  float o[HD / 8][4];
#pragma unroll
  for (int i = 0; i < HD / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  const float sl2 = p.scale * kLog2e;
  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const int kend = min(len, q0 + BR);
  const int n_kt = (kend + BC - 1) / BC;

  for (int kt = 0; kt < n_kt; ++kt) {
    const int k0 = kt * BC;
    load_tile<HD, BC>(Ks, K, b + k0, min(BC, len - k0), p.hkv, kvh);
    load_tile<HD, BC>(Vs, V, b + k0, min(BC, len - k0), p.hkv, kvh);
    __syncthreads();
    float s[BC / 8][4];
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {
        uint32_t b0, b1;
        load_b_nk(b0, b1, Ks + nt * 8 * LD + kk * 16, LD, lane);
        mma16816<T>(s[nt], qf[kk], b0, b1);
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int key = k0 + nt * 8 + 2 * t + (r & 1);
        const float val = (key <= row[r >> 1] && key < len) ? s[nt][r] * sl2 : -INFINITY;
        s[nt][r] = val;
        mx[r >> 1] = fmaxf(mx[r >> 1], val);
      }
    }
    float muse[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float mnew = fmaxf(m_r[i], quad_max(mx[i]));
      muse[i] = mnew == -INFINITY ? 0.f : mnew;
      const float corr = exp2f(m_r[i] - muse[i]);
      m_r[i] = mnew;
      l_r[i] *= corr;
#pragma unroll
      for (int dt = 0; dt < HD / 8; ++dt) {
        o[dt][2 * i] *= corr;
        o[dt][2 * i + 1] *= corr;
      }
    }
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float pv = exp2f(s[nt][r] - muse[r >> 1]);
        s[nt][r] = pv;
        l_r[r >> 1] += pv;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < HD / 8; ++dt) {
        uint32_t b0, b1;
        load_b_kn(b0, b1, Vs + kk * 16 * LD + dt * 8, LD, lane);
        mma16816<T>(o[dt], a, b0, b1);
      }
    }
    __syncthreads();
  }

  T* O = out;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = quad_sum(l_r[i]);
    if (row[i] >= len) continue;
    const float inv = 1.f / l;
    const int64_t tok = b + row[i];
    T* orow = O + (tok * p.hq + h) * HD;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt)
      *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) = pack2<T>(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
    if (t == 0) lse[static_cast<int64_t>(h) * p.n_tokens + tok] = m_r[i] * kLn2 + logf(l);
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
  const int tile = gridDim.x - 1 - blockIdx.x;
  const int seq = blockIdx.y, h = blockIdx.z;
  const int b = p.cu[seq], len = p.cu[seq + 1] - b;
  const int q0 = tile * BR;
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
#pragma unroll
  for (int i = 0; i < HD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const int kend = min(len, q0 + BR);
  const int n_kt = (kend + BC - 1) / BC;

  for (int kt = 0; kt < n_kt; ++kt) {
    const int k0 = kt * BC;
    __syncthreads();  // previous tile fully consumed (and Q/dO loaded on the first pass)
    load_tile<HD, BC>(Ks, K, b + k0, min(BC, len - k0), p.hkv, kvh);
    load_tile<HD, BC>(Vs, V, b + k0, min(BC, len - k0), p.hkv, kvh);
    __syncthreads();
    float s[BC / 8][4], dp[BC / 8][4];
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[nt][r] = dp[nt][r] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t aq[4], ad[4];
      load_a(aq, Qs + warp * 16 * LD + kk * 16, LD, lane);
      load_a(ad, dOs + warp * 16 * LD + kk * 16, LD, lane);
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {
        uint32_t b0, b1;
        load_b_nk(b0, b1, Ks + nt * 8 * LD + kk * 16, LD, lane);
        mma16816<T>(s[nt], aq, b0, b1);
        load_b_nk(b0, b1, Vs + nt * 8 * LD + kk * 16, LD, lane);
        mma16816<T>(dp[nt], ad, b0, b1);
      }
    }
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
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < HD / 8; ++dt) {
        uint32_t b0, b1;
        load_b_kn(b0, b1, Ks + kk * 16 * LD + dt * 8, LD, lane);
        mma16816<T>(acc[dt], a, b0, b1);
      }
    }
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
  const int tile = blockIdx.x;  // tile 0 has the most work: first
  const int seq = blockIdx.y, kvh = blockIdx.z;
  const int b = p.cu[seq], len = p.cu[seq + 1] - b;
  const int k0 = tile * BC;
  if (k0 >= len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* Q = static_cast<const T*>(p.q);
  load_tile<HD, BC>(Ks, static_cast<const T*>(p.k), b + k0, min(BC, len - k0), p.hkv, kvh);
  load_tile<HD, BC>(Vs, static_cast<const T*>(p.v), b + k0, min(BC, len - k0), p.hkv, kvh);

  const float sl2 = p.scale * kLog2e;
  const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
  for (int i = 0; i < HD / 8; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) dka[i][r] = dva[i][r] = 0.f;
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
      float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
      for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) st[nt][r] = dpt[nt][r] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t ak[4], av[4];
        load_a(ak, Ks + warp * 16 * LD + kk * 16, LD, lane);
        load_a(av, Vs + warp * 16 * LD + kk * 16, LD, lane);
#pragma unroll
        for (int nt = 0; nt < BQ / 8; ++nt) {
          uint32_t b0, b1;
          load_b_nk(b0, b1, Qs + nt * 8 * LD + kk * 16, LD, lane);
          mma16816<T>(st[nt], ak, b0, b1);  // S^T = K Q^T
          load_b_nk(b0, b1, dOs + nt * 8 * LD + kk * 16, LD, lane);
          mma16816<T>(dpt[nt], av, b0, b1);  // dP^T = V dO^T
        }
      }
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
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        uint32_t ap[4], ads[4];
        c_to_a<T>(ap, st[2 * kk], st[2 * kk + 1]);
        c_to_a<T>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt) {
          uint32_t b0, b1;
          load_b_kn(b0, b1, dOs + kk * 16 * LD + dt * 8, LD, lane);
          mma16816<T>(dva[dt], ap, b0, b1);  // dV += P^T dO
          load_b_kn(b0, b1, Qs + kk * 16 * LD + dt * 8, LD, lane);
          mma16816<T>(dka[dt], ads, b0, b1);  // dK += dS^T Q
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (key[i] >= len) continue;
    const int64_t off = ((b + static_cast<int64_t>(key[i])) * p.hkv + kvh) * HD;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dk + off + dt * 8 + 2 * t) =
          pack2<T>(dka[dt][2 * i] * p.scale, dka[dt][2 * i + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv + off + dt * 8 + 2 * t) = pack2<T>(dva[dt][2 * i], dva[dt][2 * i + 1]);
    }
  }
}

template <typename Kernel>
void allow_smem(Kernel k, int bytes) {
  if (bytes > 48 * 1024)
    IEVO_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

template <typename T, int HD>
void run_forward(const Params& p, void* out, float* lse, cudaStream_t s) {
  const dim3 grid((p.max_seqlen + 63) / 64, p.num_seqs, p.hq);
  fwd_kernel<T, HD><<<grid, kThreads, 0, s>>>(p, static_cast<T*>(out), lse);
  IEVO_CUDA_LAUNCH_CHECK("flash fwd_kernel");
}

template <typename T, int HD>
void run_backward(const Params& p, const void* dout, const float* lse, const float* delta,
                  void* dq, void* dk, void* dv, cudaStream_t s) {
  constexpr int LD = HD + 8;
  const int smem_dq = (2 * 64 + 2 * 32) * LD * 2;
  const int smem_kv = (2 * 64 + 2 * 32) * LD * 2 + 2 * 32 * 4;
  static const bool attrs = [&] {
    allow_smem(bwd_dq_kernel<T, HD>, smem_dq);
    allow_smem(bwd_dkdv_kernel<T, HD>, smem_kv);
    return true;
  }();
  (void)attrs;
  const T* g = static_cast<const T*>(dout);
  const dim3 grid_q((p.max_seqlen + 63) / 64, p.num_seqs, p.hq);
  bwd_dq_kernel<T, HD><<<grid_q, kThreads, smem_dq, s>>>(p, g, lse, delta, static_cast<T*>(dq));
  IEVO_CUDA_LAUNCH_CHECK("flash bwd_dq_kernel");
  const dim3 grid_k((p.max_seqlen + 63) / 64, p.num_seqs, p.hkv);
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

void forward(const Params& p, void* out, float* lse, cudaStream_t s) {
  dispatch(p, [&](auto tag, auto hd) { run_forward<decltype(tag), decltype(hd)::value>(p, out, lse, s); });
}

void backward(const Params& p, const void* dout, const float* lse, const float* delta, void* dq,
              void* dk, void* dv, cudaStream_t s) {
  dispatch(p, [&](auto tag, auto hd) {
    run_backward<decltype(tag), decltype(hd)::value>(p, dout, lse, delta, dq, dk, dv, s);
  });
}

}  // namespace ievo::cuda::flash
