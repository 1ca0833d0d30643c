// Launchers for the fastdiff CUDA kernels: plain C++ over raw pointers, sizes and a stream.
//
// This header deliberately includes nothing from PyTorch so that every .cu file compiles with a
// bare `nvcc -arch=sm_90 -c` (the CI check in csrc/check_compile.sh). The torch-facing argument
// checks live in the one binding file, csrc/bindings.cpp, which calls these launchers after
// validating device, dtype, layout and shapes. Launchers validate only what they rely on for
// memory safety and return cudaErrorInvalidValue instead of launching on bad sizes.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastdiff {

// Element types the kernels are instantiated for. Values are part of the binding's contract.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ optional SiLU), one thread block per (sample, group), the group held in registers.
//
// The group of sample n is seen as a dense 2-D array [rows][cols] whose rows are row_stride
// elements apart:
//   channels-last (NHWC): rows = H*W pixels, cols = C/G channels, row_stride = C
//   contiguous    (NCHW): rows = C/G channels, cols = H*W pixels, row_stride = H*W
// so one kernel serves both layouts. Statistics are fp32 and two-pass (mean, then the centred
// second moment) over values that stay in registers: the input is read from memory exactly once.
struct GroupNormArgs {
  const void* x;       // input, dtype `dtype`, layout described by `channels_last`
  void* out;           // output, same dtype and layout as x
  const void* weight;  // per-channel scale [C], dtype `param_dtype`, or nullptr (scale 1)
  const void* bias;    // per-channel shift [C], dtype `param_dtype`, or nullptr (shift 0)
  int64_t batch;       // N
  int64_t channels;    // C
  int64_t spatial;     // H*W (product of all trailing dimensions)
  int64_t groups;      // G, divides C
  float eps;
  bool silu;           // apply x * sigmoid(x) after the affine
  bool channels_last;  // true: NHWC memory order; false: NCHW
  DType dtype;         // Float32, Float16 or BFloat16
  DType param_dtype;   // dtype of weight/bias: Float32, Float16 or BFloat16
};

// Largest C / G the kernel accepts (weight and bias of a group are staged in shared memory).
constexpr int kGroupNormMaxGroupChannels = 1024;

// How a GroupNorm call would be launched; `supported` is false when the group does not fit in
// the registers of one block (then callers use another backend) or the sizes are invalid.
struct GroupNormLaunch {
  bool supported;
  int vec;            // elements per memory access: 16 bytes' worth when alignment allows, else less
  int threads;        // threads per block
  int loads;          // packs each thread keeps in registers
  int total_packs;    // packs per group
  int packs_per_row;  // NHWC: packs across one pixel's group channels
  int rows_per_step;  // NHWC: pixels covered by one pass of the block
};

// Pure host arithmetic (no CUDA calls): the launch configuration for `args`.
GroupNormLaunch group_norm_plan(const GroupNormArgs& args);

// Launches the kernel on `stream`. Returns cudaErrorInvalidValue (without launching) when
// group_norm_plan(args) is not supported.
cudaError_t group_norm_launch(const GroupNormArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// One fused classifier-free-guidance + sampler step (the SamplingPlan contract of fastdiff/sampling/plan.py):
//   m      = u + w (c - u)          (or m = model_out without guidance)
//   x_in   = c0 x
//   x0     = c1 x_in + c2 m
//   x_next = c3 x + c4 x0 + c5 x0_prev + c6 z + sum_k c(7+k) x0_older[k]   (k < num_older)
// The coefficient row is read on the device (coefficients + stride * step[0]), and w may be read from
// device memory too, so one captured CUDA graph serves every step of a sampling plan.
struct SamplerStepArgs {
  const void* x;          // current state [numel], dtype `state_dtype`
  const void* model_out;  // [2 * numel] = [uncond; cond] when `guided`, else [numel]; `model_dtype`
  const void* x0_prev;    // previous step's x0 [numel], `state_dtype`, or nullptr (zeros)
  const void* noise;      // z [numel], `state_dtype`, or nullptr (zeros)
  const void* x0_older;   // [num_older, numel]: x0 two, three... rows back, `state_dtype`
  int num_older;          // 0..3 (x0_older may be nullptr when 0)
  void* x_next;           // output [numel], `state_dtype`
  void* x0;               // output [numel], `state_dtype`
  const void* coefficients;    // plan table [num_steps, 10] or one [10] row; `coefficient_dtype`
  int64_t coefficient_stride;  // elements between table rows (columns are unit-stride)
  const int64_t* step;         // device scalar: row index into the table; nullptr -> row 0
  int64_t num_steps;           // rows in the table; the kernel clamps the step into [0, rows)
  const void* guidance_scale;  // device scalar w (dtype `guidance_dtype`), or nullptr
  float guidance_scale_value;  // w when guidance_scale is nullptr
  bool guided;                 // model_out holds [uncond; cond]
  int64_t numel;               // elements of x
  DType state_dtype;           // Float32, Float16 or BFloat16
  DType model_dtype;           // Float32, Float16 or BFloat16
  DType coefficient_dtype;     // Float32 or Float64
  DType guidance_dtype;        // Float32, Float64, Float16 or BFloat16
};

// Returns cudaErrorInvalidValue (without launching) on null pointers or unsupported dtypes.
cudaError_t sampler_step_launch(const SamplerStepArgs& args, cudaStream_t stream);

}  // namespace fastdiff
