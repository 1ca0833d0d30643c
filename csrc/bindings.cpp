// The one torch-facing file of the fastdiff CUDA extension: argument checks with clear errors,
// output allocation, and registration as torch ops under the `fastdiff_cuda` namespace
// (torch.ops.fastdiff_cuda.<op>); the kernels themselves are in the .cu files, which never see a
// torch header. Registering ops (rather than pybind functions) keeps the functions usable under
// torch.compile (fakes are registered from Python) and CUDA-graph capture (work is enqueued on the
// current stream and outputs come from the caching allocator).
//
// Error classes: FASTDIFF_CHECK -> RuntimeError (device, dtype, layout, unsupported size),
// FASTDIFF_CHECK_VALUE -> ValueError (shapes and argument values).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "fastdiff_kernels.h"

namespace {

using fastdiff::DType;

// Error messages are assembled here into one std::string (numbers through std::to_string) and
// handed to TORCH_CHECK as its only argument, which c10::str passes through untouched: the error
// path then runs no std::ostream code (no ostringstream, no locale num_put facet), the one thing
// that the message which segfaulted on the H200 did and the message that raised cleanly did not.
template <typename Part>
void append(std::string& text, const Part& part) {
  if constexpr (std::is_arithmetic_v<Part>) {
    text += std::to_string(part);
  } else {
    text += part;  // const char*, char arrays and std::string
  }
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string text;
  (append(text, parts), ...);
  return text;
}

// The message is only built when the check fails.
#define FASTDIFF_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__))
#define FASTDIFF_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, message(__VA_ARGS__))

DType to_dtype(at::ScalarType type, const char* op, const char* name) {
  switch (type) {
    case at::kFloat:
      return DType::Float32;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kDouble:
      return DType::Float64;
    default:
      break;
  }
  FASTDIFF_CHECK(false, op, ": ", name, " has dtype ", c10::toString(type),
                 "; allowed: float32, float16, bfloat16");
  return DType::Float32;  // unreachable: FASTDIFF_CHECK(false) throws
}

// "[2, 4, 64, 64]": shapes and strides in messages are formatted here, with std::to_string only,
// keeping the error path free of stream operators.
std::string dims(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    text += (i == 0 ? "" : ", ") + std::to_string(sizes[i]);
  }
  return text + "]";
}

void check_storage_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto type = t.scalar_type();
  FASTDIFF_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": ", name,
                 " has dtype ", c10::toString(type), "; allowed: float32, float16, bfloat16");
}

void check_cuda(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  FASTDIFF_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ",
                 t.device().str());
  FASTDIFF_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device().str(),
                 " but x is on ", x.device().str());
}

void check_launch(cudaError_t status, const char* op) {
  FASTDIFF_CHECK(status == cudaSuccess, op, ": kernel launch failed: ",
                 cudaGetErrorString(status));
}

// ----------------------------------------------------------------------------------- group_norm

constexpr const char* kGroupNorm = "fastdiff_cuda::group_norm";

// require_cuda is false only for the plan query, which is arithmetic on x's shape, strides, dtype
// and address and launches nothing.
fastdiff::GroupNormArgs group_norm_args(const at::Tensor& x, int64_t num_groups,
                                        bool require_cuda = true) {
  FASTDIFF_CHECK(!require_cuda || x.is_cuda(), kGroupNorm,
                 ": x must be a CUDA tensor, got device ", x.device().str());
  check_storage_dtype(x, kGroupNorm, "x");
  FASTDIFF_CHECK_VALUE(x.dim() >= 2, kGroupNorm, ": x must be (N, C, *), got shape ",
                       dims(x.sizes()));
  const int64_t channels = x.size(1);
  FASTDIFF_CHECK_VALUE(num_groups >= 1 && channels % num_groups == 0, kGroupNorm,
                       ": num_groups=", num_groups, " must divide the ", channels,
                       " channels of x (shape ", dims(x.sizes()), ")");
  const bool contiguous = x.is_contiguous();
  const bool channels_last = !contiguous && x.dim() == 4 &&
                             x.is_contiguous(at::MemoryFormat::ChannelsLast);
  FASTDIFF_CHECK(contiguous || channels_last, kGroupNorm,
                 ": x must be contiguous (NCHW) or channels_last (NHWC), got shape ",
                 dims(x.sizes()), " with strides ", dims(x.strides()));
  fastdiff::GroupNormArgs args{};
  args.x = x.data_ptr();
  args.batch = x.size(0);
  args.channels = channels;
  args.spatial = channels == 0 || args.batch == 0 ? 0 : x.numel() / (args.batch * channels);
  args.groups = num_groups;
  args.channels_last = channels_last;
  args.dtype = to_dtype(x.scalar_type(), kGroupNorm, "x");
  args.param_dtype = DType::Float32;
  return args;
}

void check_affine(const std::optional<at::Tensor>& param, const at::Tensor& x, const char* name) {
  if (!param.has_value()) {
    return;
  }
  const at::Tensor& p = *param;
  check_cuda(p, x, kGroupNorm, name);
  check_storage_dtype(p, kGroupNorm, name);
  FASTDIFF_CHECK_VALUE(p.dim() == 1 && p.size(0) == x.size(1), kGroupNorm, ": ", name,
                       " has shape ", dims(p.sizes()), ", expected (", x.size(1), ",)");
  FASTDIFF_CHECK(p.is_contiguous(), kGroupNorm, ": ", name, " must be contiguous");
}

// The launch plan with the output assumed as aligned as x (the caching allocator's blocks are):
// the same decision the launcher makes once the output exists.
fastdiff::GroupNormLaunch plan_for_input(fastdiff::GroupNormArgs args) {
  args.out = const_cast<void*>(args.x);
  return fastdiff::group_norm_plan(args);
}

void check_group_fits(const fastdiff::GroupNormArgs& args, const at::Tensor& x,
                      int64_t num_groups) {
  FASTDIFF_CHECK(plan_for_input(args).supported, kGroupNorm, ": a group of ", args.spatial, " x ",
                 args.channels / num_groups, " elements (x shape ", dims(x.sizes()),
                 ", num_groups=", num_groups, ") does not fit the register-resident kernel; ",
                 "use the triton backend for it (fastdiff.ops.cuda_extension.supports_group_norm)");
}

at::Tensor group_norm(const at::Tensor& x, int64_t num_groups,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps, bool silu) {
  fastdiff::GroupNormArgs args = group_norm_args(x, num_groups);
  check_affine(weight, x, "weight");
  check_affine(bias, x, "bias");
  if (weight.has_value() && bias.has_value()) {
    FASTDIFF_CHECK(weight->scalar_type() == bias->scalar_type(), kGroupNorm,
                   ": weight (", c10::toString(weight->scalar_type()), ") and bias (",
                   c10::toString(bias->scalar_type()),
                   ") must have the same dtype");
  }
  FASTDIFF_CHECK_VALUE(eps >= 0.0, kGroupNorm, ": eps must be >= 0, got ", eps);
  check_group_fits(args, x, num_groups);
  // Every check above runs before anything is allocated or the device is switched.
  const c10::cuda::CUDAGuard guard(x.device());
  // Preserve x's strides exactly (they can differ from the canonical ones in size-1 dims).
  at::Tensor out = at::empty_like(x);
  args.out = out.data_ptr();
  args.weight = weight.has_value() ? weight->data_ptr() : nullptr;
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  const at::ScalarType param_type =
      weight.has_value() ? weight->scalar_type()
                         : (bias.has_value() ? bias->scalar_type() : at::kFloat);
  args.param_dtype = to_dtype(param_type, kGroupNorm, "weight");
  args.eps = static_cast<float>(eps);
  args.silu = silu;
  check_launch(fastdiff::group_norm_launch(args, c10::cuda::getCurrentCUDAStream().stream()),
               kGroupNorm);
  return out;
}

// [supported, vec, threads, loads]: lets tests check the Python-side support rule against the
// launcher's own decision, and benchmarks report the configuration they measured. Any device's
// tensor may ask (benchmarks/gpu_stack_check.sh compares the two rules on CPU tensors).
std::vector<int64_t> group_norm_plan(const at::Tensor& x, int64_t num_groups) {
  const fastdiff::GroupNormLaunch launch =
      plan_for_input(group_norm_args(x, num_groups, /*require_cuda=*/false));
  return {launch.supported ? 1 : 0, launch.vec, launch.threads, launch.loads};
}

// --------------------------------------------------------------------------------- sampler_step

constexpr const char* kSamplerStep = "fastdiff_cuda::sampler_step";

bool same_dense_layout(const at::Tensor& x, const at::Tensor& other) {
  if (x.is_contiguous() && other.is_contiguous()) {
    return true;
  }
  return x.dim() == 4 && other.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         other.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_sample_tensor(const std::optional<at::Tensor>& t, const at::Tensor& x,
                         const char* name) {
  if (!t.has_value()) {
    return;
  }
  check_cuda(*t, x, kSamplerStep, name);
  FASTDIFF_CHECK_VALUE(t->sizes() == x.sizes(), kSamplerStep, ": ", name, " has shape ",
                       dims(t->sizes()), " but x has shape ", dims(x.sizes()));
  FASTDIFF_CHECK(t->scalar_type() == x.scalar_type(), kSamplerStep, ": ", name, " has dtype ",
                 c10::toString(t->scalar_type()), " but x has dtype ",
                 c10::toString(x.scalar_type()));
  FASTDIFF_CHECK(same_dense_layout(x, *t), kSamplerStep, ": ", name,
                 " must share x's dense layout (both contiguous or both channels_last)");
}

std::tuple<at::Tensor, at::Tensor> sampler_step(
    const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coefficients,
    const std::optional<at::Tensor>& step, const std::optional<at::Tensor>& x0_prev,
    const std::optional<at::Tensor>& guidance, double guidance_value,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& x0_older) {
  FASTDIFF_CHECK(x.is_cuda(), kSamplerStep, ": x must be a CUDA tensor, got device ",
                 x.device().str());
  check_storage_dtype(x, kSamplerStep, "x");
  FASTDIFF_CHECK_VALUE(x.dim() >= 1, kSamplerStep, ": x must have a batch dimension");
  check_cuda(model_output, x, kSamplerStep, "model_output");
  check_storage_dtype(model_output, kSamplerStep, "model_output");
  const int64_t batch = x.size(0);
  const bool shape_ok = model_output.dim() == x.dim() &&
                        model_output.sizes().slice(1) == x.sizes().slice(1) &&
                        (model_output.size(0) == batch || model_output.size(0) == 2 * batch);
  FASTDIFF_CHECK_VALUE(shape_ok, kSamplerStep, ": model_output has shape ",
                       dims(model_output.sizes()), "; expected x's shape ", dims(x.sizes()),
                       " or [uncond; cond] with batch ", 2 * batch);
  FASTDIFF_CHECK(same_dense_layout(x, model_output), kSamplerStep,
                 ": model_output must share x's dense layout ",
                 "(both contiguous or both channels_last)");
  check_sample_tensor(x0_prev, x, "x0_prev");
  check_sample_tensor(noise, x, "noise");
  if (x0_older.has_value()) {
    check_cuda(*x0_older, x, kSamplerStep, "x0_older");
    FASTDIFF_CHECK_VALUE(x0_older->dim() == x.dim() + 1 && x0_older->size(0) >= 1 &&
                             x0_older->size(0) <= 3 && x0_older->sizes().slice(1) == x.sizes(),
                         kSamplerStep, ": x0_older has shape ", dims(x0_older->sizes()),
                         "; expected [K, *x.shape] with K in [1, 3], x has shape ",
                         dims(x.sizes()));
    FASTDIFF_CHECK(x0_older->scalar_type() == x.scalar_type(), kSamplerStep,
                   ": x0_older has dtype ", c10::toString(x0_older->scalar_type()),
                   " but x has dtype ", c10::toString(x.scalar_type()));
    FASTDIFF_CHECK(x0_older->stride(0) == x.numel() && same_dense_layout(x, (*x0_older)[0]),
                   kSamplerStep,
                   ": x0_older's slices must share x's dense layout, numel apart, got strides ",
                   dims(x0_older->strides()));
  }

  check_cuda(coefficients, x, kSamplerStep, "coefficients");
  const auto coefficient_type = coefficients.scalar_type();
  FASTDIFF_CHECK(coefficient_type == at::kFloat || coefficient_type == at::kDouble, kSamplerStep,
                 ": coefficients has dtype ", c10::toString(coefficient_type),
                 "; allowed: float32, float64");
  FASTDIFF_CHECK_VALUE((coefficients.dim() == 1 || coefficients.dim() == 2) &&
                           coefficients.size(-1) == 10 && coefficients.numel() > 0,
                       kSamplerStep, ": coefficients must be a [S, 10] table or one [10] row, got ",
                       dims(coefficients.sizes()));
  FASTDIFF_CHECK(coefficients.stride(-1) == 1, kSamplerStep,
                 ": coefficients must have unit-stride columns, got strides ",
                 dims(coefficients.strides()));
  FASTDIFF_CHECK_VALUE((coefficients.dim() == 2) == step.has_value(), kSamplerStep,
                       ": pass step with a [S, 10] coefficient table and no step with one [10] row");
  if (step.has_value()) {
    check_cuda(*step, x, kSamplerStep, "step");
    FASTDIFF_CHECK(step->scalar_type() == at::kLong && step->numel() == 1, kSamplerStep,
                   ": step must be one int64 element, got ", c10::toString(step->scalar_type()),
                   " of shape ", dims(step->sizes()));
  }
  if (guidance.has_value()) {
    check_cuda(*guidance, x, kSamplerStep, "guidance");
    const auto guidance_type = guidance->scalar_type();
    FASTDIFF_CHECK(guidance->numel() == 1 &&
                       (guidance_type == at::kFloat || guidance_type == at::kDouble ||
                        guidance_type == at::kHalf || guidance_type == at::kBFloat16),
                   kSamplerStep,
                   ": guidance must be one float32/float64/float16/bfloat16 element, got ",
                   c10::toString(guidance_type), " of shape ", dims(guidance->sizes()));
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor x_next = at::empty_like(x);
  at::Tensor x0 = at::empty_like(x);
  fastdiff::SamplerStepArgs args{};
  args.x = x.data_ptr();
  args.model_out = model_output.data_ptr();
  args.x0_prev = x0_prev.has_value() ? x0_prev->data_ptr() : nullptr;
  args.noise = noise.has_value() ? noise->data_ptr() : nullptr;
  args.x0_older = x0_older.has_value() ? x0_older->data_ptr() : nullptr;
  args.num_older = x0_older.has_value() ? static_cast<int>(x0_older->size(0)) : 0;
  args.x_next = x_next.data_ptr();
  args.x0 = x0.data_ptr();
  args.coefficients = coefficients.data_ptr();
  args.coefficient_stride = coefficients.dim() == 2 ? coefficients.stride(0) : 0;
  args.step = step.has_value() ? step->data_ptr<int64_t>() : nullptr;
  args.num_steps = coefficients.dim() == 2 ? coefficients.size(0) : 1;
  args.guidance_scale = guidance.has_value() ? guidance->data_ptr() : nullptr;
  args.guidance_scale_value = static_cast<float>(guidance_value);
  args.guided = batch > 0 && model_output.size(0) == 2 * batch;
  args.numel = x.numel();
  args.state_dtype = to_dtype(x.scalar_type(), kSamplerStep, "x");
  args.model_dtype = to_dtype(model_output.scalar_type(), kSamplerStep, "model_output");
  args.coefficient_dtype = to_dtype(coefficient_type, kSamplerStep, "coefficients");
  args.guidance_dtype = guidance.has_value()
                            ? to_dtype(guidance->scalar_type(), kSamplerStep, "guidance")
                            : DType::Float32;
  check_launch(fastdiff::sampler_step_launch(args, c10::cuda::getCurrentCUDAStream().stream()),
               kSamplerStep);
  return {x_next, x0};
}

}  // namespace

TORCH_LIBRARY(fastdiff_cuda, m) {
  m.def("group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
        "bool silu) -> Tensor");
  m.def("group_norm_plan(Tensor x, int num_groups) -> int[]");
  m.def("sampler_step(Tensor x, Tensor model_output, Tensor coefficients, Tensor? step, "
        "Tensor? x0_prev, Tensor? guidance, float guidance_value, Tensor? noise, "
        "Tensor? x0_older) "
        "-> (Tensor, Tensor)");
}

// CPU inputs reach the same functions so that they fail with the named-argument message above
// rather than the dispatcher's generic "could not run on backend CPU".
TORCH_LIBRARY_IMPL(fastdiff_cuda, CUDA, m) {
  m.impl("group_norm", &group_norm);
  m.impl("group_norm_plan", &group_norm_plan);
  m.impl("sampler_step", &sampler_step);
}

TORCH_LIBRARY_IMPL(fastdiff_cuda, CPU, m) {
  m.impl("group_norm", &group_norm);
  m.impl("group_norm_plan", &group_norm_plan);
  m.impl("sampler_step", &sampler_step);
}

// setup.py builds this file as the Python module fastdiff._C; importing it runs the registrations
// above. The JIT build loads the library directly and never calls this.
#define FASTDIFF_CONCAT_(a, b) a##b
#define FASTDIFF_CONCAT(a, b) FASTDIFF_CONCAT_(a, b)
PyMODINIT_FUNC FASTDIFF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastdiff._C",
                               "fastdiff CUDA kernels, registered as torch.ops.fastdiff_cuda",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
