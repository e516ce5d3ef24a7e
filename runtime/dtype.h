// Element types and devices.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

// Host and device (nvcc) for the few conversions the kernels share with the CPU code.
#ifdef __CUDACC__
#define IEVO_HOST_DEVICE __host__ __device__
#else
#define IEVO_HOST_DEVICE
#endif

namespace ievo {

// I16: storage only (ZeRO's master-weight remainders, parallel/zero.h); no arithmetic op takes it.
enum class DType : uint8_t { F32, F64, BF16, F16, I32, I64, I16 };
enum class Device : uint8_t { CPU, CUDA };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // "f32", "bf16", ...
DType dtype_from_name(const std::string& s);  // accepts "f32"/"fp32"/"float32", ... ; throws
const char* device_name(Device d);

// bf16 <-> f32 on the host: round-to-nearest-even, NaN kept quiet.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// An f32 as a bf16 and a 16-bit remainder, and back, bit-exactly (TransformerEngine's FusedAdam
// store_param_remainders): hi = the upper 16 bits, plus one when bit 15 is set (round to nearest,
// ties away from zero: the same as f32_to_bf16 except on exact ties); rem = the lower 16 bits as
// a signed integer, negative exactly when hi was rounded up. The CUDA kernels call the same two.
IEVO_HOST_DEVICE inline void f32_split_bf16(float f, uint16_t& hi, int16_t& rem) {
  uint32_t u;
  memcpy(&u, &f, 4);
  rem = static_cast<int16_t>(static_cast<uint16_t>(u & 0xffffu));
  hi = static_cast<uint16_t>((u >> 16) + ((u >> 15) & 1u));
}
IEVO_HOST_DEVICE inline float f32_join_bf16(uint16_t hi, int16_t rem) {
  const uint32_t h = static_cast<uint16_t>(hi - (rem < 0 ? 1 : 0));
  const uint32_t u = (h << 16) | static_cast<uint16_t>(rem);
  float f;
  memcpy(&f, &u, 4);
  return f;
}
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

}  // namespace ievo
