// Per-pixel math of the SAU repair (docs/method.md, sections 3 and 4), shared by the
// C++ CPU kernel and the CUDA kernel so that the CPU build CI runs exercises
// the arithmetic the GPU runs. Plain C++ and no torch headers: nvcc compiles
// it without torch, g++ without CUDA.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAU_HD __host__ __device__ __forceinline__
#else
#define SAU_HD inline
#endif

// Widest blur the kernels accept. Bounds the CUDA kernel's halo in shared
// memory; at the default sigma 0.2 every tap past the third is < 1e-27.
#define SAU_MAX_KSIZE 31
#define SAU_EPS 1e-8f

enum SauBlend { SAU_BLEND_CONVEX = 0, SAU_BLEND_PAPER = 1 };
enum SauSimilarity { SAU_SIM_LATENT = 0, SAU_SIM_DIFFERENCE = 1 };
enum SauDType { SAU_FLOAT32 = 0, SAU_FLOAT16 = 1, SAU_BFLOAT16 = 2 };

// Everything a kernel needs besides the pointers. Sizes and strides are in
// elements and 64-bit so that offsets never overflow.
struct SauRepairParams {
  int64_t B, C, H, W;
  int64_t zp_stride[4], zc_stride[4], out_stride[4];
  float tau1, tau2, gate;
  int has_gate;
  int similarity;  // SauSimilarity
  int radius;      // blur_ksize / 2, 0 when the blur is the identity
  float taps[SAU_MAX_KSIZE];
  // The masks are binary, so the blend has only four (z_p, z_c) weight pairs:
  // y = coef_p[cls] * z_p + coef_c[cls] * z_c with cls = 2 * M1 + M2.
  float coef_p[4], coef_c[4];
  // Mask coverage, optional: (B, 2) fp32 strides of the coverage output, which
  // receives per image the mean over H x W of M1 (column 0) and of M2 (column 1).
  int64_t cov_stride[2];
};

// Reflect without repeating the edge (index -1 reads 1, index n reads n - 2),
// as torch.nn.functional.pad(mode="reflect"). Valid for -n < i < 2n - 1.
SAU_HD int64_t sau_reflect(int64_t i, int64_t n) {
  return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i);
}

SAU_HD float sau_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// max(x, lo) as a select: unlike fmaxf it vectorises without -ffinite-math-only.
SAU_HD float sau_clamp_min(float x, float lo) { return x > lo ? x : lo; }

// Cosine from the accumulated <v, d>, |v|^2 and |d|^2, with the spec's
// per-factor eps clamp (not torch.cosine_similarity's clamp of the product).
SAU_HD float sau_cosine(float dot, float vv, float dd) {
  return dot / (sau_clamp_min(sqrtf(vv), SAU_EPS) * sau_clamp_min(sqrtf(dd), SAU_EPS));
}

// cls = 2 * M1 + M2 (strict comparisons, as in the spec). Bitwise rather than
// short-circuit operators: no branches, so the CPU loop over pixels vectorises.
SAU_HD int sau_mask_class(float s, float a, float tau1, float tau2, int has_gate,
                          float gate) {
  const int m1 = (int)(s > tau1) & ((int)!has_gate | (int)(a > gate));
  const int m2 = (int)(a > tau2);
  return 2 * m1 + m2;
}

// Weights of z_p and z_c for one mask combination.
SAU_HD void sau_blend_coeffs(int M1, int M2, float k, float alpha, int blend, float* cp,
                             float* cc) {
  const float m1 = sau_sigmoid(k * ((float)M1 - 0.5f));
  const float m2 = sau_sigmoid(k * ((float)M2 - 0.5f));
  if (blend == SAU_BLEND_PAPER) {
    *cp = (1.0f - m1) * (1.0f - m2);
    *cc = alpha * m1 + 0.5f * alpha * m2;
  } else {
    const float w = 1.0f - (1.0f - alpha * m1) * (1.0f - 0.5f * alpha * m2);
    *cp = 1.0f - w;
    *cc = w;
  }
}

// Normalised 1-D Gaussian taps for odd ksize; returns the radius. ksize 1 or
// sigma 0 is the identity (radius 0, one tap of 1).
SAU_HD int sau_gaussian_taps(float sigma, int ksize, float* taps) {
  if (ksize <= 1 || sigma <= 0.0f) {
    taps[0] = 1.0f;
    return 0;
  }
  const int r = ksize / 2;
  float sum = 0.0f;
  for (int i = 0; i < ksize; ++i) {
    const float x = (float)(i - r);
    taps[i] = expf(-(x * x) / (2.0f * sigma * sigma));
    sum += taps[i];
  }
  for (int i = 0; i < ksize; ++i) taps[i] /= sum;
  return r;
}

// Fills the scalar part of the params (sizes and strides are the caller's).
SAU_HD void sau_init_params(SauRepairParams* p, float tau1, float tau2, float k, float alpha,
                            float blur_sigma, int blur_ksize, int blend, int similarity,
                            int has_gate, float gate) {
  p->tau1 = tau1;
  p->tau2 = tau2;
  p->has_gate = has_gate;
  p->gate = has_gate ? gate : 0.0f;
  p->similarity = similarity;
  p->radius = sau_gaussian_taps(blur_sigma, blur_ksize, p->taps);
  for (int cls = 0; cls < 4; ++cls)
    sau_blend_coeffs(cls >> 1, cls & 1, k, alpha, blend, &p->coef_p[cls], &p->coef_c[cls]);
}

// Coverage from the mask counts of one image: count / (H * W), divided in fp32
// as torch's mean of the 0/1 mask is (the counts are exact in fp32 below 2^24).
SAU_HD float sau_coverage(float count, int64_t H, int64_t W) {
  return count / (float)(H * W);
}

// The CUDA launcher (csrc/sau_repair_cuda.cu). Raw pointers, a SauDType code
// and the stream as void* so that callers need neither CUDA nor torch headers.
// `coverage` may be null (no coverage asked). Returns a cudaError_t as int
// (0 = success).
int sau_repair_cuda_launch(int dtype, const void* zp, const void* zc, const float* delta,
                           const float* act, void* out, float* coverage,
                           const SauRepairParams& p, void* stream);
