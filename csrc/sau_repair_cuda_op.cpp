// CUDA registration of sau::repair / sau::repair_out (built only with a CUDA
// torch): checks, output allocation, then the raw-pointer launcher of
// sau_repair_cuda.cu on the current stream. No sync, no allocation besides the
// output (and a float copy of delta/act only if they are not already fp32
// contiguous), so the out= variant can be captured in a CUDA graph.
// c10/cuda headers rather than ATen/cuda/CUDAContext.h: those pull in cuSPARSE,
// cuBLAS and cuSOLVER headers, which a minimal CUDA toolkit does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sau_repair_torch.h"

namespace sau {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return SAU_FLOAT32;
    case at::kHalf:
      return SAU_FLOAT16;
    case at::kBFloat16:
      return SAU_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, "sau.repair: unsupported dtype ", t);
  }
  return -1;  // unreachable
}

void run_cuda(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
              const at::Tensor& act, const RepairArgs& args, at::Tensor& out,
              const at::Tensor& coverage) {
  if (z_p.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(z_p.device());
  const at::Tensor d = delta.to(at::kFloat).contiguous();
  const at::Tensor a = act.to(at::kFloat).contiguous();
  const SauRepairParams p = make_params(z_p, z_c, out, coverage, args);
  const int err = sau_repair_cuda_launch(
      dtype_code(z_p.scalar_type()), z_p.const_data_ptr(), z_c.const_data_ptr(),
      d.const_data_ptr<float>(), a.const_data_ptr<float>(), out.mutable_data_ptr(),
      coverage.defined() ? coverage.mutable_data_ptr<float>() : nullptr, p,
      static_cast<void*>(at::cuda::getCurrentCUDAStream().stream()));
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

}  // namespace
}  // namespace sau

TORCH_LIBRARY_IMPL(sau, CUDA, m) {
  m.impl("repair", &sau::repair_op<&sau::run_cuda>);
  m.impl("repair_out", &sau::repair_out_op<&sau::run_cuda>);
}
