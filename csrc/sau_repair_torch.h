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

// Checks shapes, dtypes, devices, parameters and aliasing; `out` and `coverage`
// may be undefined. These are the op's only checks on its hot path: the Python
// wrapper adds none for the C++ backends. TORCH_CHECK_VALUE / TORCH_CHECK_TYPE
// surface as ValueError / TypeError.
void check_inputs(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                  const at::Tensor& act, const RepairArgs& args, const at::Tensor& out,
                  const at::Tensor& coverage);

// Kernel params for z_p, z_c -> out (any strides), and coverage when defined.
SauRepairParams make_params(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& out,
                            const at::Tensor& coverage, const RepairArgs& args);

// A backend's kernel launch: inputs checked, `out` allocated, z_p, z_c -> out,
// and the mask coverage -> `coverage` when it is defined.
using RunRepair = void (*)(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                           const at::Tensor& act, const RepairArgs& args, at::Tensor& out,
                           const at::Tensor& coverage);

// sau::repair for a backend: the schema's arguments, the checks, a fresh output
// (the only allocation).
template <RunRepair run>
at::Tensor repair_op(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                     const at::Tensor& act, double tau1, double tau2, double k, double alpha,
                     double blur_sigma, int64_t blur_ksize, c10::string_view blend,
                     c10::string_view similarity, std::optional<double> gate) {
  const RepairArgs args{tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend, similarity, gate};
  check_inputs(z_p, z_c, delta, act, args, at::Tensor(), at::Tensor());
  at::Tensor out = at::empty(z_p.sizes(), z_p.options());
  run(z_p, z_c, delta, act, args, out, at::Tensor());
  return out;
}

// sau::repair_out for a backend: the same, into the caller's `out` (and
// `coverage`, when given), allocating nothing.
template <RunRepair run>
void repair_out_op(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                   const at::Tensor& act, double tau1, double tau2, double k, double alpha,
                   double blur_sigma, int64_t blur_ksize, c10::string_view blend,
                   c10::string_view similarity, std::optional<double> gate, at::Tensor out,
                   const std::optional<at::Tensor>& coverage) {
  const RepairArgs args{tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend, similarity, gate};
  const at::Tensor cov = coverage.has_value() ? *coverage : at::Tensor();
  check_inputs(z_p, z_c, delta, act, args, out, cov);
  run(z_p, z_c, delta, act, args, out, cov);
}

}  // namespace sau
