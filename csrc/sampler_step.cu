// Fused classifier-free guidance (Ho & Salimans 2022) + one step of a sampling plan
// (fastdiff/sampling/plan.py): every sampler we ship is linear in (x, m, x0_prev, z and up to
// three older x0 estimates) per model call,
//   m = u + w (c - u);  x0 = c1 (c0 x) + c2 m;
//   x_next = c3 x + c4 x0 + c5 x0_prev + c6 z + sum_k c(7+k) x0_older[k],
// so one elementwise pass replaces the ~10 PyTorch ops of the eager step. Memory-bound: each
// thread moves 8 elements per tensor with 128-bit loads/stores when every pointer is 16-byte
// aligned. The plan row (and optionally w) is read on the device, never baked into a launch, so a
// captured CUDA graph replays correctly for every step.
#include <cuda_runtime.h>

#include "device_utils.cuh"
#include "fastdiff_kernels.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 8;         // elements per thread per iteration: 16 bytes of fp16/bf16
constexpr int64_t kMaxBlocks = 4096;  // grid-stride beyond this; ample for one H100/H200

template <typename T>
__device__ __forceinline__ void load_chunk(const T* data, float (&values)[kChunk]) {
  constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int k = 0; k < kChunk / kWidth; ++k) {
    const Pack<T, kWidth> pack = *reinterpret_cast<const Pack<T, kWidth>*>(data + k * kWidth);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      values[k * kWidth + j] = to_float(pack.values[j]);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* data, const float (&values)[kChunk]) {
  constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int k = 0; k < kChunk / kWidth; ++k) {
    Pack<T, kWidth> pack;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      pack.values[j] = from_float<T>(values[k * kWidth + j]);
    }
    *reinterpret_cast<Pack<T, kWidth>*>(data + k * kWidth) = pack;
  }
}

struct StepCoefficients {
  float c[10];
  float guidance;
};

__device__ __forceinline__ StepCoefficients read_coefficients(const SamplerStepArgs& a) {
  int64_t row = 0;
  if (a.step != nullptr) {
    row = *a.step;
    // Clamped instead of trusted: an out-of-range step must not read outside the table.
    row = row < 0 ? 0 : (row >= a.num_steps ? a.num_steps - 1 : row);
  }
  StepCoefficients k;
#pragma unroll
  for (int j = 0; j < 10; ++j) {
    k.c[j] = load_as_float(a.coefficients, row * a.coefficient_stride + j, a.coefficient_dtype);
  }
  k.guidance = a.guidance_scale != nullptr ? load_as_float(a.guidance_scale, 0, a.guidance_dtype)
                                           : a.guidance_scale_value;
  return k;
}

// The step for one element, in fp32; same association as the eager op: x0 = c1 (c0 x) + c2 m.
__device__ __forceinline__ void step_element(const StepCoefficients& k, float x, float model,
                                             float x0_prev, float noise, float older_sum,
                                             float& x_next, float& x0) {
  x0 = k.c[1] * (k.c[0] * x) + k.c[2] * model;
  x_next = k.c[3] * x + k.c[4] * x0 + k.c[5] * x0_prev + k.c[6] * noise + older_sum;
}

template <typename TS, typename TM, bool VECTORIZED>
__global__ void __launch_bounds__(kThreads) sampler_step_kernel(const SamplerStepArgs a) {
  const StepCoefficients k = read_coefficients(a);
  const TS* x = static_cast<const TS*>(a.x);
  const TM* uncond = static_cast<const TM*>(a.model_out);
  const TM* cond = a.guided ? uncond + a.numel : nullptr;
  const TS* x0_prev = static_cast<const TS*>(a.x0_prev);
  const TS* noise = static_cast<const TS*>(a.noise);
  const TS* x0_older = static_cast<const TS*>(a.x0_older);
  const int num_older = x0_older != nullptr ? a.num_older : 0;
  TS* x_next = static_cast<TS*>(a.x_next);
  TS* x0 = static_cast<TS*>(a.x0);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  int64_t scalar_start = 0;
  if constexpr (VECTORIZED) {
    const int64_t chunks = a.numel / kChunk;
    for (int64_t chunk = thread; chunk < chunks; chunk += threads) {
      const int64_t offset = chunk * kChunk;
      float xs[kChunk], model[kChunk], cond_values[kChunk], previous[kChunk], z[kChunk],
          older[kChunk];
      load_chunk(x + offset, xs);
      load_chunk(uncond + offset, model);
      if (cond != nullptr) {
        load_chunk(cond + offset, cond_values);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          model[j] = fmaf(k.guidance, cond_values[j] - model[j], model[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        previous[j] = 0.0f;
        z[j] = 0.0f;
        older[j] = 0.0f;
      }
      if (x0_prev != nullptr) {
        load_chunk(x0_prev + offset, previous);
      }
      if (noise != nullptr) {
        load_chunk(noise + offset, z);
      }
      for (int slot = 0; slot < num_older; ++slot) {  // sum_k c(7+k) x0_older[k]
        float values[kChunk];
        load_chunk(x0_older + slot * a.numel + offset, values);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          older[j] = fmaf(k.c[7 + slot], values[j], older[j]);
        }
      }
      float next_values[kChunk], x0_values[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        step_element(k, xs[j], model[j], previous[j], z[j], older[j], next_values[j],
                     x0_values[j]);
      }
      store_chunk(x_next + offset, next_values);
      store_chunk(x0 + offset, x0_values);
    }
    scalar_start = chunks * kChunk;  // the < 8 trailing elements go through the scalar loop
  }
  for (int64_t i = scalar_start + thread; i < a.numel; i += threads) {
    float model = to_float(uncond[i]);
    if (cond != nullptr) {
      model = fmaf(k.guidance, to_float(cond[i]) - model, model);
    }
    const float previous = x0_prev != nullptr ? to_float(x0_prev[i]) : 0.0f;
    const float z = noise != nullptr ? to_float(noise[i]) : 0.0f;
    float older = 0.0f;
    for (int slot = 0; slot < num_older; ++slot) {
      older = fmaf(k.c[7 + slot], to_float(x0_older[slot * a.numel + i]), older);
    }
    float next_value, x0_value;
    step_element(k, to_float(x[i]), model, previous, z, older, next_value, x0_value);
    x_next[i] = from_float<TS>(next_value);
    x0[i] = from_float<TS>(x0_value);
  }
}

bool aligned16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

template <typename TS, typename TM>
cudaError_t launch_types(const SamplerStepArgs& a, cudaStream_t stream) {
  const void* cond = a.guided ? static_cast<const TM*>(a.model_out) + a.numel : nullptr;
  const bool vectorized = aligned16(a.x) && aligned16(a.model_out) && aligned16(cond) &&
                          aligned16(a.x0_prev) && aligned16(a.noise) &&
                          aligned16(a.x0_older) && (a.num_older == 0 || a.numel % kChunk == 0) &&
                          aligned16(a.x_next) &&
                          aligned16(a.x0);
  const int64_t units = vectorized ? (a.numel + kChunk - 1) / kChunk : a.numel;
  int64_t blocks = (units + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
  if (vectorized) {
    sampler_step_kernel<TS, TM, true><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(a);
  } else {
    sampler_step_kernel<TS, TM, false>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename TS>
cudaError_t launch_for_state(const SamplerStepArgs& a, cudaStream_t stream) {
  switch (a.model_dtype) {
    case DType::Float32:
      return launch_types<TS, float>(a, stream);
    case DType::Float16:
      return launch_types<TS, __half>(a, stream);
    case DType::BFloat16:
      return launch_types<TS, __nv_bfloat16>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

bool is_float_or_double(DType dtype) {
  return dtype == DType::Float32 || dtype == DType::Float64;
}

}  // namespace

cudaError_t sampler_step_launch(const SamplerStepArgs& a, cudaStream_t stream) {
  if (a.numel < 0 || a.coefficients == nullptr || a.num_steps < 1 ||
      !is_float_or_double(a.coefficient_dtype)) {
    return cudaErrorInvalidValue;
  }
  if (a.numel == 0) {
    return cudaSuccess;  // before the pointer checks: an empty tensor's data pointer is null
  }
  if (a.x == nullptr || a.model_out == nullptr || a.x_next == nullptr || a.x0 == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (a.state_dtype) {
    case DType::Float32:
      return launch_for_state<float>(a, stream);
    case DType::Float16:
      return launch_for_state<__half>(a, stream);
    case DType::BFloat16:
      return launch_for_state<__nv_bfloat16>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fastdiff
