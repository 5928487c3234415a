// RMSNorm forward and backward as PyTorch custom ops (torch.ops.mmfm_rms_norm.forward / .backward).
//
// Same math as mmfm/models/language/llama.py (RMSNorm), all in fp32:
//   rstd = rsqrt(mean(x^2) + eps),  y = x * rstd * w   (y cast back to x.dtype)
//   dx   = rstd * (g - x * rstd^2 * mean(g * x)),  g = dy * w
//   dw   = sum over rows of dy * x * rstd
// x, dy: fp32, fp16 or bf16; weight: the dtype of x, or fp32. Rows of any hidden size.
//
// Headers: only ATen core/per-op headers, c10/cuda and torch/library.h. Not torch/extension.h (pybind11
// and the whole C++ frontend: 2-3x the compile time) and not ATen/cuda/CUDAContext.h (needs cuBLAS,
// cuSPARSE and cuSOLVER headers). So `nvcc -c` also works against a CPU torch wheel's headers and a
// bare CUDA toolkit: see compile_check in mmfm/kernels/cuda_ext.py.

#include <algorithm>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// Sum of v over the block, returned to every thread. `shared` holds one float per warp.
__device__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.f;
  return warp_sum(v);
}

// One block per row.
template <typename T, typename W>
__global__ void rms_norm_fwd(const T* __restrict__ x, const W* __restrict__ w, T* __restrict__ y,
                             float* __restrict__ rstd, int64_t hidden, float eps) {
  __shared__ float shared[kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;

  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = static_cast<float>(xr[i]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss, shared) / hidden + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
    yr[i] = static_cast<T>(static_cast<float>(xr[i]) * r * static_cast<float>(w[i]));
}

// Block-stride over rows. Each block writes dx for its rows and accumulates its dweight partial sums
// into its own row of `partial` ([gridDim.x, hidden], fp32): a column is always handled by the same
// thread, so there are no races and no atomics.
template <typename T, typename W>
__global__ void rms_norm_bwd(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
                             const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ partial,
                             int64_t rows, int64_t hidden) {
  __shared__ float shared[kWarp];
  float* part = partial + blockIdx.x * hidden;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    T* dxr = dx + row * hidden;
    const float r = rstd[row];

    float dot = 0.f;  // sum(g * x)
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
      dot += static_cast<float>(dyr[i]) * static_cast<float>(w[i]) * static_cast<float>(xr[i]);
    const float c = block_sum(dot, shared) / hidden * r * r;

    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
      const float xv = static_cast<float>(xr[i]), dyv = static_cast<float>(dyr[i]);
      dxr[i] = static_cast<T>(r * (dyv * static_cast<float>(w[i]) - xv * c));
      part[i] += dyv * xv * r;
    }
  }
}

// Second stage of dweight: sum the per-block partials of each column.
template <typename W>
__global__ void sum_partials(const float* __restrict__ partial, W* __restrict__ dw, int64_t blocks,
                             int64_t hidden) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= hidden) return;
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) acc += partial[b * hidden + col];
  dw[col] = static_cast<W>(acc);
}

// Threads per row block: enough to cover the row once, a multiple of 32, at most 1024.
int threads_for(int64_t hidden) {
  const int64_t t = (hidden + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(kWarp, t)));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rms_norm: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "rms_norm: ", name, " must be contiguous");
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "x");
  check_cuda(weight, "weight");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rms_norm: x must have a non-empty last dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight must have shape [",
              x.size(-1), "] (the last dimension of x), got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "rms_norm: x and weight must be on the same device");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "rms_norm: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt || weight.scalar_type() == at::kFloat,
              "rms_norm: weight must have the dtype of x (", dt, ") or float32, got ", weight.scalar_type());
}

template <typename T, typename W>
void launch_forward(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, at::Tensor& rstd,
                    int64_t rows, int64_t hidden, float eps) {
  rms_norm_fwd<T, W><<<rows, threads_for(hidden), 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), weight.data_ptr<W>(), y.data_ptr<T>(), rstd.data_ptr<float>(), hidden, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename W>
void launch_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dw, at::Tensor& partial,
                     int64_t rows, int64_t hidden) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = partial.size(0);
  rms_norm_bwd<T, W><<<blocks, threads_for(hidden), 0, stream>>>(
      dy.data_ptr<T>(), x.data_ptr<T>(), weight.data_ptr<W>(), rstd.data_ptr<float>(), dx.data_ptr<T>(),
      partial.data_ptr<float>(), rows, hidden);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_partials<W><<<(hidden + 255) / 256, 256, 0, stream>>>(partial.data_ptr<float>(), dw.data_ptr<W>(), blocks,
                                                            hidden);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls LAUNCH<T, W>(...) with T the dtype of x (float, half or bfloat16) and W that of weight (T or float).
#define RMS_NORM_CASE(DTYPE, LAUNCH, ...)            \
  AT_DISPATCH_CASE(DTYPE, [&] {                      \
    if (weight.scalar_type() == x.scalar_type())     \
      LAUNCH<scalar_t, scalar_t>(__VA_ARGS__);       \
    else                                             \
      LAUNCH<scalar_t, float>(__VA_ARGS__);          \
  })
#define RMS_NORM_DISPATCH(LAUNCH, ...)                               \
  AT_DISPATCH_SWITCH(x.scalar_type(), #LAUNCH,                       \
                     RMS_NORM_CASE(at::kFloat, LAUNCH, __VA_ARGS__)  \
                     RMS_NORM_CASE(at::kHalf, LAUNCH, __VA_ARGS__)   \
                     RMS_NORM_CASE(at::kBFloat16, LAUNCH, __VA_ARGS__))

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(at::Tensor x, at::Tensor weight, double eps) {
  check_inputs(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  auto y = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, rstd};
  RMS_NORM_DISPATCH(launch_forward, x, weight, y, rstd, rows, hidden, static_cast<float>(eps));
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(at::Tensor dy, at::Tensor x, at::Tensor weight,
                                                     at::Tensor rstd) {
  check_inputs(x, weight);
  check_cuda(dy, "dy");
  check_cuda(rstd, "rstd");
  TORCH_CHECK(dy.device() == x.device() && rstd.device() == x.device(),
              "rms_norm: dy, x and rstd must be on the same device");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "rms_norm: dy must have the shape and dtype of x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows,
              "rms_norm: rstd must be float32 with one value per row (", rows, ")");
  auto dx = at::empty_like(x);
  if (rows == 0) return {dx, at::zeros_like(weight)};
  auto dw = at::empty_like(weight);

  // Enough blocks to fill the GPU a few times over; each owns a row of fp32 partial sums.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t blocks = std::min<int64_t>(rows, 4 * static_cast<int64_t>(sms));
  auto partial = at::zeros({blocks, hidden}, x.options().dtype(at::kFloat));
  RMS_NORM_DISPATCH(launch_backward, dy, x, weight, rstd, dx, dw, partial, rows, hidden);
  return {dx, dw};
}

// Ops torch.ops.mmfm_rms_norm.forward / .backward, with CUDA kernels.
TORCH_LIBRARY(mmfm_rms_norm, m) {
  m.def("forward(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
}

TORCH_LIBRARY_IMPL(mmfm_rms_norm, CUDA, m) {
  m.impl("forward", &rms_norm_forward);
  m.impl("backward", &rms_norm_backward);
}
