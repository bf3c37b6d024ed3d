// Fused SAU repair on CUDA: cosine, masks, blend and the separable Gaussian
// blur in one kernel. Raw pointers only (no torch headers), so plain nvcc
// compiles it:  nvcc -c csrc/sau_repair_cuda.cu -gencode arch=compute_90,code=sm_90
//
// A block (32 x 8 threads) owns one image and a 32 x 32 output tile. Its window is the
// tile plus the blur radius r on every side, reflected at the image border.
//   1. mask class (2*M1 + M2) of every window pixel -> shared memory (1 byte each)
//   2. per channel: y = coef_p[cls] * z_p + coef_c[cls] * z_c over the window
//      -> shared; horizontal taps -> shared; vertical taps -> global.
// Threads of a warp walk consecutive columns, so global loads and stores are
// coalesced along W (for unit W stride); all offsets are 64-bit.
// Mask coverage (optional): step 1 also counts M1 and M2 over the block's own
// tile (not its halo) into shared counters, and one thread per block adds them
// to the image's (B, 2) row; a zeroing kernel before and a kernel dividing by
// H * W after complete it, all three on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sau_repair.h"

namespace {

constexpr int BLOCK_X = 32;  // one warp across a tile row
constexpr int BLOCK_Y = 8;
constexpr int TILE_W = BLOCK_X;
constexpr int TILE_H = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Window index -> image index: clamp past the last one any output needs (those
// pixels feed nothing, the clamp keeps the load in bounds), then reflect.
__device__ __forceinline__ int64_t window_coord(int64_t i, int64_t n, int r) {
  return sau_reflect(i < n - 1 + r ? i : n - 1 + r, n);
}

// Dynamic shared memory: taps and blend weights, then the window of y, the
// horizontal pass, and the window's mask classes (one byte each).
constexpr int SMEM_TAPS = 32;   // >= SAU_MAX_KSIZE
constexpr int SMEM_HEAD = SMEM_TAPS + 8 + 2;  // taps, blend weights, two mask counters

size_t smem_bytes(int r) {
  const size_t win = (size_t)(TILE_H + 2 * r) * (TILE_W + 2 * r);
  const size_t hb = (size_t)(TILE_H + 2 * r) * TILE_W;
  return (SMEM_HEAD + win + hb) * sizeof(float) + win;  // <= 27 KiB at SAU_MAX_KSIZE
}

dim3 grid_for(const SauRepairParams& p) {
  return dim3((unsigned)((p.W + TILE_W - 1) / TILE_W), (unsigned)((p.H + TILE_H - 1) / TILE_H),
              (unsigned)(p.B < 65535 ? p.B : 65535));  // blocks loop over the rest of the batch
}

template <typename T>
__global__ void __launch_bounds__(BLOCK_X * BLOCK_Y)
    sau_repair_kernel(const T* __restrict__ zp, const T* __restrict__ zc,
                      const float* __restrict__ delta, const float* __restrict__ act,
                      T* __restrict__ out, float* __restrict__ cov, const SauRepairParams p) {
  extern __shared__ float smem[];
  const int r = p.radius;
  const int K = 2 * r + 1;
  const int WIN_W = TILE_W + 2 * r;
  const int WIN_H = TILE_H + 2 * r;
  float* taps = smem;                                                   // K
  float* coef_p = smem + SMEM_TAPS;                                     // 4
  float* coef_c = coef_p + 4;                                           // 4
  int* counts = reinterpret_cast<int*>(coef_c + 4);                     // M1, M2 of the tile
  float* ys = smem + SMEM_HEAD;                                         // WIN_H x WIN_W
  float* hs = ys + WIN_H * WIN_W;                                       // WIN_H x TILE_W
  unsigned char* cls = reinterpret_cast<unsigned char*>(hs + WIN_H * TILE_W);  // WIN_H x WIN_W

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * BLOCK_X + tx;
  // Kernel params indexed by a runtime value would be copied to local memory:
  // stage the taps and the blend weights in shared memory instead.
  if (tid < K) taps[tid] = p.taps[tid];
  if (tid < 4) {
    coef_p[tid] = p.coef_p[tid];
    coef_c[tid] = p.coef_c[tid];
  }
  if (tid < 2) counts[tid] = 0;
  __syncthreads();

  const int64_t H = p.H, W = p.W, C = p.C;
  const int64_t h0 = (int64_t)blockIdx.y * TILE_H;
  const int64_t w0 = (int64_t)blockIdx.x * TILE_W;
  const bool diff = p.similarity == SAU_SIM_DIFFERENCE;

  for (int64_t b = blockIdx.z; b < p.B; b += gridDim.z) {
    const T* zp_b = zp + b * p.zp_stride[0];
    const T* zc_b = zc + b * p.zc_stride[0];
    T* out_b = out + b * p.out_stride[0];

    // 1. Mask class of every window pixel (a warp reads one window row).
    int m1 = 0, m2 = 0;  // this thread's pixels of the tile itself
    for (int wy = ty; wy < WIN_H; wy += BLOCK_Y) {
      const int64_t gh = window_coord(h0 - r + wy, H, r);
      for (int wx = tx; wx < WIN_W; wx += BLOCK_X) {
        const int64_t gw = window_coord(w0 - r + wx, W, r);
        const T* zp_px = zp_b + gh * p.zp_stride[2] + gw * p.zp_stride[3];
        const T* zc_px = zc_b + gh * p.zc_stride[2] + gw * p.zc_stride[3];
        const int64_t pix = gh * W + gw;
        float dot = 0.f, vv = 0.f, dd = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          float v = to_float(zp_px[c * p.zp_stride[1]]);
          if (diff) v -= to_float(zc_px[c * p.zc_stride[1]]);
          const float d = delta[c * H * W + pix];
          dot += v * d;
          vv += v * v;
          dd += d * d;
        }
        const int k = sau_mask_class(sau_cosine(dot, vv, dd), act[pix], p.tau1, p.tau2,
                                     p.has_gate, p.gate);
        cls[wy * WIN_W + wx] = (unsigned char)k;
        const bool own = wy >= r && wy < r + TILE_H && wx >= r && wx < r + TILE_W &&
                         h0 - r + wy < H && w0 - r + wx < W;
        m1 += own & (k >> 1);
        m2 += own & (k & 1);
      }
    }
    if (cov != nullptr && (m1 | m2)) {
      atomicAdd(&counts[0], m1);
      atomicAdd(&counts[1], m2);
    }
    __syncthreads();
    if (cov != nullptr && tid == 0) {  // exact: integer counts in fp32
      atomicAdd(&cov[b * p.cov_stride[0]], (float)counts[0]);
      atomicAdd(&cov[b * p.cov_stride[0] + p.cov_stride[1]], (float)counts[1]);
      counts[0] = counts[1] = 0;  // read again only after the syncs below
    }

    // 2. Per channel: blend over the window, horizontal taps, vertical taps.
    for (int64_t c = 0; c < C; ++c) {
      const T* zp_c = zp_b + c * p.zp_stride[1];
      const T* zc_c = zc_b + c * p.zc_stride[1];
      for (int wy = ty; wy < WIN_H; wy += BLOCK_Y) {
        const int64_t gh = window_coord(h0 - r + wy, H, r);
        for (int wx = tx; wx < WIN_W; wx += BLOCK_X) {
          const int64_t gw = window_coord(w0 - r + wx, W, r);
          const int k = cls[wy * WIN_W + wx];
          ys[wy * WIN_W + wx] = coef_p[k] * to_float(zp_c[gh * p.zp_stride[2] + gw * p.zp_stride[3]]) +
                                coef_c[k] * to_float(zc_c[gh * p.zc_stride[2] + gw * p.zc_stride[3]]);
        }
      }
      __syncthreads();

      for (int wy = ty; wy < WIN_H; wy += BLOCK_Y) {  // TILE_W == BLOCK_X: one column per thread
        const float* row = ys + wy * WIN_W + tx;
        float acc = 0.f;
        for (int t = 0; t < K; ++t) acc += taps[t] * row[t];
        hs[wy * TILE_W + tx] = acc;
      }
      __syncthreads();

      T* out_c = out_b + c * p.out_stride[1];
      const int64_t gw = w0 + tx;
      for (int y = ty; y < TILE_H; y += BLOCK_Y) {
        const int64_t gh = h0 + y;
        if (gh < H && gw < W) {
          const float* col = hs + y * TILE_W + tx;
          float acc = 0.f;
          for (int t = 0; t < K; ++t) acc += taps[t] * col[t * TILE_W];
          out_c[gh * p.out_stride[2] + gw * p.out_stride[3]] = from_float<T>(acc);
        }
      }
      __syncthreads();  // ys and hs are rewritten by the next channel
    }
    __syncthreads();  // cls and the counters are rewritten by the next image (also when C == 0)
  }
}

// Coverage before the repair kernel: zero, since that kernel adds to it.
__global__ void sau_coverage_zero(float* cov, const SauRepairParams p) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < p.B;
       b += (int64_t)gridDim.x * blockDim.x)
    cov[b * p.cov_stride[0]] = cov[b * p.cov_stride[0] + p.cov_stride[1]] = 0.0f;
}

// Coverage after it: mask counts -> means over H x W.
__global__ void sau_coverage_finish(float* cov, const SauRepairParams p) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < p.B;
       b += (int64_t)gridDim.x * blockDim.x) {
    float* row = cov + b * p.cov_stride[0];
    row[0] = sau_coverage(row[0], p.H, p.W);
    row[p.cov_stride[1]] = sau_coverage(row[p.cov_stride[1]], p.H, p.W);
  }
}

constexpr int COVERAGE_THREADS = 128;
unsigned coverage_blocks(const SauRepairParams& p) {
  const int64_t n = (p.B + COVERAGE_THREADS - 1) / COVERAGE_THREADS;
  return (unsigned)(n < 1024 ? (n > 0 ? n : 1) : 1024);
}

// The CPU emulation test (tests/cuda_emu) compiles the kernel with g++ and
// launches it itself: everything below needs nvcc.
#ifndef SAU_CUDA_EMULATION
template <typename T>
cudaError_t launch(const void* zp, const void* zc, const float* delta, const float* act, void* out,
                   float* cov, const SauRepairParams& p, cudaStream_t stream) {
  if (cov != nullptr) sau_coverage_zero<<<coverage_blocks(p), COVERAGE_THREADS, 0, stream>>>(cov, p);
  sau_repair_kernel<T><<<grid_for(p), dim3(BLOCK_X, BLOCK_Y), smem_bytes(p.radius), stream>>>(
      static_cast<const T*>(zp), static_cast<const T*>(zc), delta, act, static_cast<T*>(out), cov, p);
  if (cov != nullptr) sau_coverage_finish<<<coverage_blocks(p), COVERAGE_THREADS, 0, stream>>>(cov, p);
  return cudaGetLastError();
}
#endif

}  // namespace

#ifndef SAU_CUDA_EMULATION
int sau_repair_cuda_launch(int dtype, const void* zp, const void* zc, const float* delta,
                           const float* act, void* out, float* coverage,
                           const SauRepairParams& p, void* stream) {
  if (p.B == 0 || p.H == 0 || p.W == 0) return (int)cudaSuccess;
  if (p.radius < 0 || 2 * p.radius + 1 > SAU_MAX_KSIZE) return (int)cudaErrorInvalidValue;
  if ((p.H + TILE_H - 1) / TILE_H > 65535) return (int)cudaErrorInvalidConfiguration;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case SAU_FLOAT32:
      return (int)launch<float>(zp, zc, delta, act, out, coverage, p, s);
    case SAU_FLOAT16:
      return (int)launch<__half>(zp, zc, delta, act, out, coverage, p, s);
    case SAU_BFLOAT16:
      return (int)launch<__nv_bfloat16>(zp, zc, delta, act, out, coverage, p, s);
    default:
      return (int)cudaErrorInvalidValue;
  }
}
#endif
