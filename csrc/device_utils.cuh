// Device helpers shared by the fastdiff kernels: fp32 conversion of the storage types, aligned
// vector packs for wide loads, and a block-wide fp32 sum.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastdiff_kernels.h"

namespace fastdiff {

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

// VEC consecutive elements, aligned to their total size, so that one load or store of a Pack is a
// single 16/8/4/2-byte memory instruction instead of VEC scalar ones.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T values[VEC];
};

// Reads element `index` of a small parameter vector (GroupNorm weight/bias, plan coefficients,
// guidance scale) whose dtype is only known at run time; the switch is uniform across the block.
__device__ __forceinline__ float load_as_float(const void* data, int64_t index, DType dtype) {
  switch (dtype) {
    case DType::Float16:
      return __half2float(static_cast<const __half*>(data)[index]);
    case DType::BFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[index]);
    case DType::Float64:
      return static_cast<float>(static_cast<const double*>(data)[index]);
    default:
      return static_cast<const float*>(data)[index];
  }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Sum of `value` over the whole block, returned to every thread. `scratch` must hold 32 floats
// and must not be reused by another block_sum until all threads have returned from this one
// (callers pass a different scratch array for each reduction). blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  value = warp_sum(value);
  if (lane == 0) {
    scratch[warp] = value;
  }
  __syncthreads();
  // Every warp reduces the per-warp partials itself: no second barrier or broadcast needed.
  float total = lane < num_warps ? scratch[lane] : 0.0f;
  return warp_sum(total);
}

}  // namespace fastdiff
