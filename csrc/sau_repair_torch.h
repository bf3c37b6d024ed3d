// Host-side helpers shared by the CPU and CUDA registrations (both need torch):
// argument checks that raise ValueError/TypeError, and the kernel params.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "sau_repair.h"

namespace sau {

// The scalar arguments of sau::repair, as the schema passes them.
struct RepairArgs {
  double tau1, tau2, k, alpha, blur_sigma;
  int64_t blur_ksize;
  c10::string_view blend, similarity;
  std::optional<double> gate;
};

// Checks shapes, dtypes, devices and parameters; `out` may be undefined.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface as ValueError / TypeError.
void check_inputs(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                  const at::Tensor& act, const RepairArgs& args, const at::Tensor& out);

// Kernel params for z_p, z_c -> out (any strides).
SauRepairParams make_params(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& out,
                            const RepairArgs& args);

}  // namespace sau
