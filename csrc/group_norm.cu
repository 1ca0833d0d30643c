// GroupNorm (+ optional SiLU) for groups small enough to live in registers: the U-Net's low
// resolutions (H*W <= 1024 in SD1.5/SDXL). One thread block owns one (sample, group) and keeps
// every element of the group in registers between the statistics and the normalisation, so the
// input is read from global memory once and the output written once (a two-kernel or two-pass
// GroupNorm reads it twice). Statistics are fp32: mean first, then the centred second moment from
// the same registers, which avoids the cancellation of E[x^2] - E[x]^2.
#include <cuda_runtime.h>

#include "device_utils.cuh"
#include "fastdiff_kernels.h"

namespace fastdiff {
namespace {

constexpr int kMaxThreads = 1024;
#ifndef FASTDIFF_GROUP_NORM_BYTES_PER_THREAD
#define FASTDIFF_GROUP_NORM_BYTES_PER_THREAD 64
#endif
// Register budget for the slice of a group each thread holds: 64 bytes keeps every
// instantiation spill-free under the 64-register cap of 1024-thread blocks (128 spills).
constexpr int kBytesPerThread = FASTDIFF_GROUP_NORM_BYTES_PER_THREAD;
constexpr int kMaxGroupChannels = kGroupNormMaxGroupChannels;

// Each thread walks its packs with a constant stride, so addressing costs one add per pack:
//   NHWC: a thread keeps one column (a VEC-wide slice of the group's channels) and steps over
//         pixels; blockDim.x / packs_per_row rows are covered per step (threads beyond that idle).
//   NCHW: the group is one contiguous run; thread t reads packs t, t + blockDim.x, ...
struct GroupNormParams {
  const void* x;
  void* out;
  const void* weight;
  const void* bias;
  int64_t channels;
  int64_t spatial;
  int64_t groups;
  int group_channels;
  int total_packs;    // packs of VEC elements in one group
  int packs_per_row;  // NHWC: group_channels / VEC
  int rows_per_step;  // NHWC: rows covered by one step of all active threads
  float eps;
  bool silu;
  bool channels_last;
  DType param_dtype;
};

template <typename T, int VEC, int MAX_LOADS>
__global__ void __launch_bounds__(kMaxThreads)
    group_norm_kernel(const GroupNormParams p) {
  __shared__ float mean_scratch[32];
  __shared__ float variance_scratch[32];
  __shared__ float scale[kMaxGroupChannels];
  __shared__ float shift[kMaxGroupChannels];

  const int64_t sample = blockIdx.x / p.groups;
  const int64_t group = blockIdx.x % p.groups;
  const int64_t first_channel = group * p.group_channels;
  const int64_t group_base = p.channels_last
                                 ? sample * p.spatial * p.channels + first_channel
                                 : (sample * p.channels + first_channel) * p.spatial;
  const T* x = static_cast<const T*>(p.x) + group_base;
  T* out = static_cast<T*>(p.out) + group_base;

  // The group's affine parameters, once, as fp32 (their dtype is only known at run time).
  for (int c = threadIdx.x; c < p.group_channels; c += blockDim.x) {
    scale[c] = p.weight ? load_as_float(p.weight, first_channel + c, p.param_dtype) : 1.0f;
    shift[c] = p.bias ? load_as_float(p.bias, first_channel + c, p.param_dtype) : 0.0f;
  }

  int start;     // element offset of this thread's first pack inside the group
  int stride;    // elements between this thread's consecutive packs
  int my_packs;  // packs this thread owns (<= MAX_LOADS, guaranteed by the launcher)
  int column = 0;
  if (p.channels_last) {
    const int rows = p.total_packs / p.packs_per_row;
    const int row = threadIdx.x / p.packs_per_row;
    column = (threadIdx.x % p.packs_per_row) * VEC;
    start = row * static_cast<int>(p.channels) + column;
    stride = p.rows_per_step * static_cast<int>(p.channels);
    const bool active = row < p.rows_per_step;
    my_packs = active && row < rows ? (rows - row + p.rows_per_step - 1) / p.rows_per_step : 0;
  } else {
    start = threadIdx.x * VEC;
    stride = blockDim.x * VEC;
    const int remaining = p.total_packs - static_cast<int>(threadIdx.x);
    my_packs = remaining > 0 ? (remaining + blockDim.x - 1) / blockDim.x : 0;
  }

  // The sum is taken around the group's first element: with data far from zero (a large mean,
  // a small spread) the shifted values keep the digits that a plain fp32 sum would round away.
  const float pivot = to_float(x[0]);

  // Load the thread's share of the group once; it stays in registers until the store.
  Pack<T, VEC> packs[MAX_LOADS];
  float local_sum = 0.0f;
#pragma unroll
  for (int i = 0; i < MAX_LOADS; ++i) {
    if (i < my_packs) {
      packs[i] = *reinterpret_cast<const Pack<T, VEC>*>(x + start + i * stride);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        local_sum += to_float(packs[i].values[j]) - pivot;
      }
    }
  }
  const float count = static_cast<float>(p.total_packs) * VEC;
  const float mean = pivot + block_sum(local_sum, mean_scratch) / count;

  float local_squares = 0.0f;
#pragma unroll
  for (int i = 0; i < MAX_LOADS; ++i) {
    if (i < my_packs) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float centred = to_float(packs[i].values[j]) - mean;
        local_squares = fmaf(centred, centred, local_squares);
      }
    }
  }
  // block_sum's barrier also orders the scale/shift writes above before the reads below.
  const float variance = block_sum(local_squares, variance_scratch) / count;
  const float inv_std = rsqrtf(variance + p.eps);

#pragma unroll
  for (int i = 0; i < MAX_LOADS; ++i) {
    if (i < my_packs) {
      const int offset = start + i * stride;
      // NCHW: a pack never straddles two channels (the launcher requires spatial % VEC == 0).
      const int pack_channel = p.channels_last ? column : offset / static_cast<int>(p.spatial);
      Pack<T, VEC> result;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int channel = p.channels_last ? pack_channel + j : pack_channel;
        float y = fmaf((to_float(packs[i].values[j]) - mean) * inv_std, scale[channel],
                       shift[channel]);
        if (p.silu) {
          y = y / (1.0f + __expf(-y));
        }
        result.values[j] = from_float<T>(y);
      }
      *reinterpret_cast<Pack<T, VEC>*>(out + offset) = result;
    }
  }
}

template <typename T, int VEC>
cudaError_t launch_kernel(const GroupNormLaunch& launch, const GroupNormParams& params,
                          int64_t blocks, cudaStream_t stream) {
  constexpr int kMaxLoads = kBytesPerThread / static_cast<int>(sizeof(T) * VEC);
  group_norm_kernel<T, VEC, kMaxLoads>
      <<<static_cast<unsigned int>(blocks), static_cast<unsigned int>(launch.threads), 0,
         stream>>>(params);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_type(const GroupNormLaunch& launch, const GroupNormParams& params,
                            int64_t blocks, cudaStream_t stream) {
  switch (launch.vec) {
    case 8:
      if constexpr (sizeof(T) <= 2) {
        return launch_kernel<T, 8>(launch, params, blocks, stream);
      }
      break;
    case 4:
      return launch_kernel<T, 4>(launch, params, blocks, stream);
    case 2:
      return launch_kernel<T, 2>(launch, params, blocks, stream);
    case 1:
      return launch_kernel<T, 1>(launch, params, blocks, stream);
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

int element_bytes(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return 4;
    case DType::Float16:
    case DType::BFloat16:
      return 2;
    default:
      return 0;
  }
}

}  // namespace

GroupNormLaunch group_norm_plan(const GroupNormArgs& args) {
  GroupNormLaunch launch{};
  const int bytes = element_bytes(args.dtype);
  if (bytes == 0 || args.batch < 0 || args.channels <= 0 || args.spatial < 0 ||
      args.groups <= 0 || args.channels % args.groups != 0) {
    return launch;
  }
  const int64_t group_channels = args.channels / args.groups;
  // Offsets inside one sample are 32-bit, and weight/bias are staged in shared memory.
  if (group_channels > kMaxGroupChannels || args.spatial * args.channels >= (int64_t{1} << 31) ||
      args.batch * args.groups >= (int64_t{1} << 31)) {
    return launch;
  }
  if (args.batch == 0 || args.spatial == 0) {
    launch.supported = true;  // empty tensor: nothing to launch
    return launch;
  }
  // Widest pack (at most 16 bytes) that divides the contiguous run and keeps packs aligned:
  // NHWC packs run along a group's channels, NCHW packs along one channel's pixels.
  const int64_t run = args.channels_last ? group_channels : args.spatial;
  const uintptr_t addresses =
      reinterpret_cast<uintptr_t>(args.x) | reinterpret_cast<uintptr_t>(args.out);
  int vec = 16 / bytes;
  while (vec > 1 && (run % vec != 0 || addresses % (static_cast<uintptr_t>(vec) * bytes) != 0)) {
    vec /= 2;
  }
  const int max_loads = kBytesPerThread / (vec * bytes);
  const int64_t total_packs = args.spatial * group_channels / vec;
  int64_t threads = (total_packs + 31) / 32 * 32;
  if (threads > kMaxThreads) {
    threads = kMaxThreads;
  }
  int64_t loads;
  if (args.channels_last) {
    const int64_t packs_per_row = group_channels / vec;
    if (packs_per_row > threads) {
      return launch;
    }
    launch.packs_per_row = static_cast<int>(packs_per_row);
    launch.rows_per_step = static_cast<int>(threads / packs_per_row);
    loads = (args.spatial + launch.rows_per_step - 1) / launch.rows_per_step;
  } else {
    launch.packs_per_row = 1;
    launch.rows_per_step = 1;
    loads = (total_packs + threads - 1) / threads;
  }
  launch.vec = vec;
  launch.threads = static_cast<int>(threads);
  launch.loads = static_cast<int>(loads);
  launch.total_packs = static_cast<int>(total_packs);
  launch.supported = loads <= max_loads;
  return launch;
}

cudaError_t group_norm_launch(const GroupNormArgs& args, cudaStream_t stream) {
  const GroupNormLaunch launch = group_norm_plan(args);
  if (!launch.supported) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.spatial == 0) {
    return cudaSuccess;  // before the pointer check: an empty tensor's data pointer is null
  }
  if (args.x == nullptr || args.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  GroupNormParams params{};
  params.x = args.x;
  params.out = args.out;
  params.weight = args.weight;
  params.bias = args.bias;
  params.channels = args.channels;
  params.spatial = args.spatial;
  params.groups = args.groups;
  params.group_channels = static_cast<int>(args.channels / args.groups);
  params.total_packs = launch.total_packs;
  params.packs_per_row = launch.packs_per_row;
  params.rows_per_step = launch.rows_per_step;
  params.eps = args.eps;
  params.silu = args.silu;
  params.channels_last = args.channels_last;
  params.param_dtype = args.param_dtype;
  const int64_t blocks = args.batch * args.groups;
  switch (args.dtype) {
    case DType::Float32:
      return launch_for_type<float>(launch, params, blocks, stream);
    case DType::Float16:
      return launch_for_type<__half>(launch, params, blocks, stream);
    case DType::BFloat16:
      return launch_for_type<__nv_bfloat16>(launch, params, blocks, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fastdiff
