// Runs the CUDA kernel of csrc/sau_repair_cuda.cu on the CPU, so that its
// indexing (windows, halos, reflection, strides, tiles at the image edge) is
// tested where no GPU is: each CUDA thread is a std::thread, __syncthreads is a
// std::barrier, and blocks run one after another (so one shared-memory buffer
// serves them all). Only the kernel is compiled here; the launcher needs nvcc.
// Built by tests/test_cuda_emulation.py with g++ -std=c++20 and CUDA's headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <stdexcept>
#include <cstdint>
#include <thread>
#include <vector>

namespace emu {
thread_local uint3 thread_idx, block_idx;
dim3 grid_dim, block_dim;
std::barrier<>* block_barrier = nullptr;
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define blockDim emu::block_dim
#define __syncthreads() emu::block_barrier->arrive_and_wait()
#undef __shared__
#define __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)

// CUDA's atomicAdd (shared and global memory alike), for the threads above.
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace {
// The kernel's `extern __shared__ float smem[]` binds to this (same unnamed namespace).
alignas(16) float smem[48 * 1024 / sizeof(float)];
}  // namespace

#define SAU_CUDA_EMULATION
#include "../../csrc/sau_repair_cuda.cu"

namespace {

// A kernel without __syncthreads, one emulated thread at a time.
template <typename F>
void run_serial(unsigned blocks, unsigned threads, F kernel) {
  emu::grid_dim = dim3(blocks);
  emu::block_dim = dim3(threads);
  for (unsigned x = 0; x < blocks; ++x)
    for (unsigned t = 0; t < threads; ++t) {
      emu::block_idx = make_uint3(x, 0, 0);
      emu::thread_idx = make_uint3(t, 0, 0);
      kernel();
    }
}

// Every block of a grid, one after another, each with its threads running at once.
template <typename F>
void run_blocks(dim3 grid, dim3 block, F kernel) {
  emu::grid_dim = grid;
  emu::block_dim = block;
  const int nthreads = (int)(block.x * block.y);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(nthreads);
        emu::block_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (int t = 0; t < nthreads; ++t)
          threads.emplace_back([&, t] {
            emu::block_idx = make_uint3(x, y, z);
            emu::thread_idx = make_uint3(t % block.x, t / block.x, 0);
            kernel();
          });
        for (auto& th : threads) th.join();
      }
}

// As the launcher: the kernel `vectorised_path` chooses, between the coverage kernels.
template <typename T>
void run(bool vectorised, const void* zp, const void* zc, const float* delta, const float* act, void* out,
         float* cov, const SauRepairParams& p) {
  const T* zp_t = static_cast<const T*>(zp);
  const T* zc_t = static_cast<const T*>(zc);
  T* out_t = static_cast<T*>(out);
  if (cov != nullptr)
    run_serial(coverage_blocks(p), COVERAGE_THREADS, [&] { sau_coverage_zero(cov, p); });
  const size_t smem_needed = vectorised ? vec_smem_bytes<T>(p.C, p.radius) : smem_bytes(p.radius);
  if (smem_needed > sizeof(smem)) throw std::runtime_error("shared memory over 48 KiB");
  if (vectorised) {
    const VecKernel<T> kernel = vec_kernel_for<T>(p.radius);
    run_blocks(vec_grid_for(p), dim3(VTHREADS), [&] { kernel(zp_t, zc_t, delta, act, out_t, cov, p); });
  } else {
    run_blocks(grid_for(p), dim3(BLOCK_X, BLOCK_Y),
               [&] { sau_repair_kernel<T>(zp_t, zc_t, delta, act, out_t, cov, p); });
  }
  if (cov != nullptr)
    run_serial(coverage_blocks(p), COVERAGE_THREADS, [&] { sau_coverage_finish(cov, p); });
}

}  // namespace

// ctypes entry point: sizes, element strides (z_p, z_c, out: 4 each; then the
// coverage's 2), parameters. `cov` may be null. `*vectorised` receives which
// kernel ran (1: the vectorised one).
extern "C" int sau_emu_repair(int dtype, const void* zp, const void* zc, const float* delta,
                              const float* act, void* out, float* cov, const int64_t* sizes,
                              const int64_t* strides, float tau1, float tau2, float k, float alpha,
                              float blur_sigma, int blur_ksize, int blend, int similarity,
                              int has_gate, float gate, int* vectorised) {
  SauRepairParams p{};
  p.B = sizes[0], p.C = sizes[1], p.H = sizes[2], p.W = sizes[3];
  for (int d = 0; d < 4; ++d) {
    p.zp_stride[d] = strides[d];
    p.zc_stride[d] = strides[4 + d];
    p.out_stride[d] = strides[8 + d];
  }
  p.cov_stride[0] = strides[12];
  p.cov_stride[1] = strides[13];
  sau_init_params(&p, tau1, tau2, k, alpha, blur_sigma, blur_ksize, blend, similarity, has_gate,
                  gate);
  const bool vec = vectorised_path(dtype, zp, zc, delta, act, out, p);
  *vectorised = vec;
  try {
    switch (dtype) {
      case SAU_FLOAT32: run<float>(vec, zp, zc, delta, act, out, cov, p); break;
      case SAU_FLOAT16: run<__half>(vec, zp, zc, delta, act, out, cov, p); break;
      case SAU_BFLOAT16: run<__nv_bfloat16>(vec, zp, zc, delta, act, out, cov, p); break;
      default: return 1;
    }
  } catch (...) {
    return 2;
  }
  return 0;
}
