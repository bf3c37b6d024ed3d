// Fused SAU repair on CUDA: cosine, masks, blend and the separable Gaussian
// blur in one kernel. Raw pointers only (no torch headers), so plain nvcc
// compiles it:  nvcc -c csrc/sau_repair_cuda.cu -gencode arch=compute_90,code=sm_90
//
// Two kernels, one chosen per call by `vectorised_path` (the only place):
//
// The vectorised kernel (rows of unit stride, 16-byte aligned, W a multiple of 8
// halves or 4 floats, blur radius <= 3, the usual case) reads every input element
// from global memory once, in 16-byte loads along W, and writes in 16-byte stores.
// A block (128 threads) owns one image and a 64 x 32 output tile; its window is the
// tile plus one vector group on each side (the halo columns, reflected at the
// image border) and the blur radius above and below.
//   1. per window vector group (8 or 4 pixels): mask class from the channel loop,
//      then y = coef_p[cls] * z_p + coef_c[cls] * z_c of every channel -> shared
//      (the second read of z_p comes from L1: this thread has just loaded it)
//   2. per thread, a strip of 2 (fp16) or 4 (fp32) rows x one vector group: the
//      horizontal taps of each window row it needs into registers, the vertical
//      taps from those, one 16-byte store per output row and channel.
// The radius is a template parameter, so the tap loops unroll into registers.
//
// The general kernel (any strides, sizes and radius up to SAU_MAX_KSIZE / 2): a
// block (32 x 8 threads) owns one image and a 32 x 32 output tile. Its window is the
// tile plus the blur radius r on every side, reflected at the image border.
//   1. mask class (2*M1 + M2) of every window pixel -> shared memory (1 byte each)
//   2. per channel: y = coef_p[cls] * z_p + coef_c[cls] * z_c over the window
//      -> shared; horizontal taps -> shared; vertical taps -> global.
// Threads of a warp walk consecutive columns, so global loads and stores are
// coalesced along W (for unit W stride); all offsets are 64-bit.
//
// Mask coverage (optional), both kernels: step 1 also counts M1 and M2 over the
// block's own tile (not its halo) into shared counters, and one thread per block
// adds them to the image's (B, 2) row; a zeroing kernel before and a kernel
// dividing by H * W after complete it, all three on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string.h>

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

// The head of both kernels' shared memory (SMEM_HEAD floats): the taps, the blend weights
// (kernel params indexed by a runtime value would be copied to local memory) and the
// tile's M1 and M2 counters for the coverage. Offsets from the shared base, not pointers
// kept in registers: the vectorised kernel has none to spare.
__device__ __forceinline__ float* head_taps(float* smem) { return smem; }
__device__ __forceinline__ float* head_coef_p(float* smem) { return smem + SMEM_TAPS; }
__device__ __forceinline__ float* head_coef_c(float* smem) { return smem + SMEM_TAPS + 4; }
__device__ __forceinline__ int* head_counts(float* smem) {
  return reinterpret_cast<int*>(smem + SMEM_TAPS + 8);
}

// Stages the head from the params; every thread of the block calls it (it syncs).
__device__ __forceinline__ void stage_head(float* smem, const SauRepairParams& p, int tid) {
  if (tid < 2 * p.radius + 1) head_taps(smem)[tid] = p.taps[tid];
  if (tid < 4) {
    head_coef_p(smem)[tid] = p.coef_p[tid];
    head_coef_c(smem)[tid] = p.coef_c[tid];
  }
  if (tid < 2) head_counts(smem)[tid] = 0;
  __syncthreads();
}

// Adds this thread's mask counts of the tile (m1, m2) to the block's, then the block's to
// image b's coverage row (exact: integer counts in fp32). Every thread of the block calls
// it (it syncs); the counters are read again only after the kernel's next sync.
__device__ __forceinline__ void add_coverage(float* smem, float* cov, int64_t b,
                                             const SauRepairParams& p, int m1, int m2, int tid) {
  int* counts = head_counts(smem);
  if (cov != nullptr && (m1 | m2)) {
    atomicAdd(&counts[0], m1);
    atomicAdd(&counts[1], m2);
  }
  __syncthreads();
  if (cov != nullptr && tid == 0) {
    atomicAdd(&cov[b * p.cov_stride[0]], (float)counts[0]);
    atomicAdd(&cov[b * p.cov_stride[0] + p.cov_stride[1]], (float)counts[1]);
    counts[0] = counts[1] = 0;
  }
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
  float* ys = smem + SMEM_HEAD;                                         // WIN_H x WIN_W
  float* hs = ys + WIN_H * WIN_W;                                       // WIN_H x TILE_W
  unsigned char* cls = reinterpret_cast<unsigned char*>(hs + WIN_H * TILE_W);  // WIN_H x WIN_W

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * BLOCK_X + tx;
  stage_head(smem, p, tid);
  const float* taps = head_taps(smem);
  const float* coef_p = head_coef_p(smem);
  const float* coef_c = head_coef_c(smem);

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
    add_coverage(smem, cov, b, p, m1, m2, tid);

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

// ---- The vectorised kernel -------------------------------------------------------

constexpr int VEC_BYTES = 16;  // one 128-bit load or store
constexpr int VTILE_W = 64;
constexpr int VTILE_H = 32;
constexpr int VTHREADS = 128;
constexpr int VMAX_RADIUS = 3;  // ksize <= 7; wider blurs take the general kernel

template <typename T>
struct VecTile {
  static constexpr int VEC = VEC_BYTES / (int)sizeof(T);  // elements per load
  static constexpr int GX = VTILE_W / VEC;                // vector groups across the tile
  static constexpr int GY = VTHREADS / GX;                // threads down the tile
  static constexpr int STRIP = VTILE_H / GY;              // output rows per thread
  static constexpr int WC = (GX + 2) * VEC;               // window columns: a group each side
  static_assert(GX * GY == VTHREADS && STRIP * GY == VTILE_H, "tile and block must match");
  static_assert(VMAX_RADIUS <= VEC, "the halo group must hold the blur radius");
};

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* src, float (&dst)[N]) {
  static_assert(N * sizeof(T) == VEC_BYTES, "one 16-byte load");
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  T e[N];
  memcpy(e, &raw, sizeof(raw));
#pragma unroll
  for (int j = 0; j < N; ++j) dst[j] = to_float(e[j]);
}

template <int N>
__device__ __forceinline__ void load_floats(const float* src, float (&dst)[N]) {
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    const float4 f = reinterpret_cast<const float4*>(src)[q];
    dst[4 * q] = f.x;
    dst[4 * q + 1] = f.y;
    dst[4 * q + 2] = f.z;
    dst[4 * q + 3] = f.w;
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* dst, const float (&src)[N]) {
  T e[N];
#pragma unroll
  for (int j = 0; j < N; ++j) e[j] = from_float<T>(src[j]);
  uint4 raw;
  memcpy(&raw, e, sizeof(raw));
  *reinterpret_cast<uint4*>(dst) = raw;
}

template <typename T>
size_t vec_smem_bytes(int64_t C, int r) {
  return (SMEM_HEAD + (size_t)C * (VTILE_H + 2 * r) * VecTile<T>::WC) * sizeof(float);
}

template <typename T, int R>
__global__ void __launch_bounds__(VTHREADS)
    sau_repair_vec_kernel(const T* __restrict__ zp, const T* __restrict__ zc,
                          const float* __restrict__ delta, const float* __restrict__ act,
                          T* __restrict__ out, float* __restrict__ cov, const SauRepairParams p) {
  using L = VecTile<T>;
  constexpr int VEC = L::VEC;
  constexpr int K = 2 * R + 1;
  constexpr int WR = VTILE_H + 2 * R;  // window rows
  constexpr int WG = L::GX + 2;        // window vector groups per row
  extern __shared__ float smem[];
  float* ys = smem + SMEM_HEAD;  // C x WR x WC: the blended window

  const int tid = threadIdx.x;
  stage_head(smem, p, tid);
  const float* taps = head_taps(smem);
  const float* coef_p = head_coef_p(smem);
  const float* coef_c = head_coef_c(smem);

  const int64_t H = p.H, W = p.W, C = p.C, HW = H * W;
  const int64_t h0 = (int64_t)blockIdx.y * VTILE_H;
  const int64_t w0 = (int64_t)blockIdx.x * VTILE_W;
  const int64_t wl = w0 - VEC;  // image column of window column 0
  const bool diff = p.similarity == SAU_SIM_DIFFERENCE;

  // Step 2's outputs: columns x .. x + VEC - 1 of rows y0 .. y0 + STRIP - 1. The
  // window columns its taps read, reflected at the image edge, once per block.
  const int gx = tid % L::GX, gy = tid / L::GX;
  const int64_t x = w0 + (int64_t)gx * VEC;
  const int64_t y0 = h0 + (int64_t)gy * L::STRIP;
  int wcol[VEC + 2 * R];
#pragma unroll
  for (int m = 0; m < VEC + 2 * R; ++m)
    wcol[m] = x < W ? (int)(sau_reflect(x - R + m, W) - wl) : 0;

  for (int64_t b = blockIdx.z; b < p.B; b += gridDim.z) {
    const T* zp_b = zp + b * p.zp_stride[0];
    const T* zc_b = zc + b * p.zc_stride[0];
    T* out_b = out + b * p.out_stride[0];

    // 1. The window, a vector group at a time: mask class, then the blend -> shared.
    int m1 = 0, m2 = 0;  // this thread's pixels of the tile itself
    for (int i = tid; i < WR * WG; i += VTHREADS) {
      const int wr = i / WG, wg = i % WG;
      const int64_t col = wl + (int64_t)wg * VEC;
      if (col < 0 || col >= W) continue;  // reflection reads only columns inside the image
      const int64_t row = h0 - R + wr;
      const int64_t gh = window_coord(row, H, R);
      const T* zp_px = zp_b + gh * p.zp_stride[2] + col;
      const T* zc_px = zc_b + gh * p.zc_stride[2] + col;
      float dot[VEC], vv[VEC], dd[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dot[j] = vv[j] = dd[j] = 0.f;
#pragma unroll 4
      for (int64_t c = 0; c < C; ++c) {  // (unrolled: the loads of several channels in flight)
        float v[VEC], d[VEC];
        load_vec(zp_px + c * p.zp_stride[1], v);
        if (diff) {
          float w[VEC];
          load_vec(zc_px + c * p.zc_stride[1], w);
#pragma unroll
          for (int j = 0; j < VEC; ++j) v[j] -= w[j];
        }
        load_floats(delta + c * HW + gh * W + col, d);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dot[j] += v[j] * d[j];
          vv[j] += v[j] * v[j];
          dd[j] += d[j] * d[j];
        }
      }
      float a[VEC];
      load_floats(act + gh * W + col, a);
      const bool own = row >= h0 && row < h0 + VTILE_H && row < H && col >= w0 && col < w0 + VTILE_W;
      int cls[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        cls[j] = sau_mask_class(sau_cosine(dot[j], vv[j], dd[j]), a[j], p.tau1, p.tau2,
                                p.has_gate, p.gate);
        m1 += own & (cls[j] >> 1);
        m2 += own & (cls[j] & 1);
      }
      float* ys_px = ys + wr * L::WC + wg * VEC;
#pragma unroll 4
      for (int64_t c = 0; c < C; ++c) {
        float vp[VEC], vc[VEC];
        load_vec(zp_px + c * p.zp_stride[1], vp);
        load_vec(zc_px + c * p.zc_stride[1], vc);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          ys_px[c * WR * L::WC + j] = coef_p[cls[j]] * vp[j] + coef_c[cls[j]] * vc[j];
      }
    }
    add_coverage(smem, cov, b, p, m1, m2, tid);

    // 2. This thread's strip: horizontal taps of the window rows it needs, then vertical.
    if (x < W) {
      for (int64_t c = 0; c < C; ++c) {
        const float* ys_c = ys + c * WR * L::WC + gy * L::STRIP * L::WC;
        float hz[L::STRIP + 2 * R][VEC];
#pragma unroll
        for (int i = 0; i < L::STRIP + 2 * R; ++i) {
          float win[VEC + 2 * R];
#pragma unroll
          for (int m = 0; m < VEC + 2 * R; ++m) win[m] = ys_c[i * L::WC + wcol[m]];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            float acc = 0.f;
#pragma unroll
            for (int t = 0; t < K; ++t) acc += taps[t] * win[j + t];
            hz[i][j] = acc;
          }
        }
        T* out_c = out_b + c * p.out_stride[1] + x;
#pragma unroll
        for (int s = 0; s < L::STRIP; ++s) {
          if (y0 + s < H) {
            float o[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              float acc = 0.f;
#pragma unroll
              for (int t = 0; t < K; ++t) acc += taps[t] * hz[s + t][j];
              o[j] = acc;
            }
            store_vec(out_c + (y0 + s) * p.out_stride[2], o);
          }
        }
      }
    }
    __syncthreads();  // ys and the counters are rewritten by the next image
  }
}

dim3 vec_grid_for(const SauRepairParams& p) {
  return dim3((unsigned)((p.W + VTILE_W - 1) / VTILE_W), (unsigned)((p.H + VTILE_H - 1) / VTILE_H),
              (unsigned)(p.B < 65535 ? p.B : 65535));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % VEC_BYTES == 0; }

// The one place the kernel is chosen: the vectorised one where its 16-byte loads and
// stores are legal (unit W stride, every row start 16-byte aligned) and its shapes
// hold (W a whole number of vectors, radius <= 3, the window in 48 KiB of shared
// memory); the general kernel otherwise.
bool vectorised_path(int dtype, const void* zp, const void* zc, const float* delta, const float* act,
                     const void* out, const SauRepairParams& p) {
  const int64_t vec = dtype == SAU_FLOAT32 ? 4 : 8;
  if (p.radius > VMAX_RADIUS || p.W % vec != 0 || p.H <= p.radius || p.W <= p.radius) return false;
  if ((p.H + VTILE_H - 1) / VTILE_H > 65535) return false;
  const int64_t* strides[3] = {p.zp_stride, p.zc_stride, p.out_stride};
  for (const int64_t* s : strides)
    if (s[3] != 1 || s[0] % vec || s[1] % vec || s[2] % vec) return false;
  if (!aligned16(zp) || !aligned16(zc) || !aligned16(out) || !aligned16(delta) || !aligned16(act))
    return false;
  const size_t smem = dtype == SAU_FLOAT32 ? vec_smem_bytes<float>(p.C, p.radius)
                                           : vec_smem_bytes<__half>(p.C, p.radius);
  return smem <= 48 * 1024;
}

// The vectorised kernel for this radius (a template parameter).
template <typename T>
using VecKernel = void (*)(const T*, const T*, const float*, const float*, T*, float*,
                           const SauRepairParams);

template <typename T>
VecKernel<T> vec_kernel_for(int radius) {
  switch (radius) {
    case 0: return sau_repair_vec_kernel<T, 0>;
    case 1: return sau_repair_vec_kernel<T, 1>;
    case 2: return sau_repair_vec_kernel<T, 2>;
    default: return sau_repair_vec_kernel<T, 3>;
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
cudaError_t launch(bool vectorised, const void* zp, const void* zc, const float* delta, const float* act,
                   void* out, float* cov, const SauRepairParams& p, cudaStream_t stream) {
  const T* zp_t = static_cast<const T*>(zp);
  const T* zc_t = static_cast<const T*>(zc);
  T* out_t = static_cast<T*>(out);
  if (cov != nullptr) sau_coverage_zero<<<coverage_blocks(p), COVERAGE_THREADS, 0, stream>>>(cov, p);
  if (vectorised)
    vec_kernel_for<T>(p.radius)<<<vec_grid_for(p), VTHREADS, vec_smem_bytes<T>(p.C, p.radius), stream>>>(
        zp_t, zc_t, delta, act, out_t, cov, p);
  else
    sau_repair_kernel<T><<<grid_for(p), dim3(BLOCK_X, BLOCK_Y), smem_bytes(p.radius), stream>>>(
        zp_t, zc_t, delta, act, out_t, cov, p);
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
  const bool vec = vectorised_path(dtype, zp, zc, delta, act, out, p);
  switch (dtype) {
    case SAU_FLOAT32:
      return (int)launch<float>(vec, zp, zc, delta, act, out, coverage, p, s);
    case SAU_FLOAT16:
      return (int)launch<__half>(vec, zp, zc, delta, act, out, coverage, p, s);
    case SAU_BFLOAT16:
      return (int)launch<__nv_bfloat16>(vec, zp, zc, delta, act, out, coverage, p, s);
    default:
      return (int)cudaErrorInvalidValue;
  }
}
#endif
