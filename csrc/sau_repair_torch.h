// Host-side helpers shared by the CPU and CUDA registrations (both need torch):
// argument checks that raise ValueError/TypeError, the kernel params, and the
// op entry points each backend instantiates with its own launch.
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

// A backend's kernel launch: inputs checked, `out` allocated, z_p, z_c -> out.
using RunRepair = void (*)(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                           const at::Tensor& act, const RepairArgs& args, at::Tensor& out);

// sau::repair for a backend: the schema's arguments, the checks, a fresh output.
template <RunRepair run>
at::Tensor repair_op(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                     const at::Tensor& act, double tau1, double tau2, double k, double alpha,
                     double blur_sigma, int64_t blur_ksize, c10::string_view blend,
                     c10::string_view similarity, std::optional<double> gate) {
  const RepairArgs args{tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend, similarity, gate};
  check_inputs(z_p, z_c, delta, act, args, at::Tensor());
  at::Tensor out = at::empty(z_p.sizes(), z_p.options());
  run(z_p, z_c, delta, act, args, out);
  return out;
}

// sau::repair_out for a backend: the same, into the caller's `out`.
template <RunRepair run>
void repair_out_op(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                   const at::Tensor& act, double tau1, double tau2, double k, double alpha,
                   double blur_sigma, int64_t blur_ksize, c10::string_view blend,
                   c10::string_view similarity, std::optional<double> gate, at::Tensor out) {
  const RepairArgs args{tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend, similarity, gate};
  check_inputs(z_p, z_c, delta, act, args, out);
  run(z_p, z_c, delta, act, args, out);
}

}  // namespace sau
