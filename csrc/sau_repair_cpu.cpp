// The sau::repair schema and its fused CPU kernel.
//
// One pass per (image, block of output rows): for the block's rows plus the
// blur halo, compute y (cosine, masks, blend) a row at a time into thread-local
// buffers, blur each row horizontally, then blur the block vertically and
// store. Nothing but the output is allocated; the taps are computed once per
// call (no exp in the blur loops). The mask coverage, when asked, is counted
// in the same pass over the block's own rows (not its halo).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "sau_repair_torch.h"

namespace sau {

namespace {

int parse_blend(c10::string_view s) {
  if (s == "convex") return SAU_BLEND_CONVEX;
  if (s == "paper") return SAU_BLEND_PAPER;
  TORCH_CHECK_VALUE(false, "sau.repair: unknown blend '", s, "' (expected 'convex' or 'paper')");
  return -1;  // unreachable
}

int parse_similarity(c10::string_view s) {
  if (s == "latent") return SAU_SIM_LATENT;
  if (s == "difference") return SAU_SIM_DIFFERENCE;
  TORCH_CHECK_VALUE(false, "sau.repair: unknown similarity '", s,
                    "' (expected 'latent' or 'difference')");
  return -1;  // unreachable
}

bool is_storage_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

namespace {

// Whether two tensors' memory may overlap: exact where ATen can tell, otherwise
// whether their byte ranges intersect (conservative for interleaved views).
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::No:
      return false;
    case at::MemOverlapStatus::Full:
    case at::MemOverlapStatus::Partial:
      return true;
    default:
      break;
  }
  auto range = [](const at::Tensor& t) {
    const char* lo = static_cast<const char*>(t.const_data_ptr());
    int64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * std::abs(t.stride(d));
    return std::make_pair(lo, lo + extent * (int64_t)t.element_size());
  };
  const auto ra = range(a), rb = range(b);
  return ra.first < rb.second && rb.first < ra.second;
}

// A written tensor must not share memory with an input, nor with itself.
void check_written(const char* name, const at::Tensor& t, const at::Tensor& z_p,
                   const at::Tensor& z_c, const at::Tensor& delta, const at::Tensor& act) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "sau.repair: ", name,
                    " has elements that share memory (an expanded view?)");
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"z_p", &z_p}, {"z_c", &z_c}, {"delta", &delta}, {"act", &act}};
  for (const auto& [input_name, input] : inputs)
    TORCH_CHECK_VALUE(!may_overlap(t, *input), "sau.repair: ", name,
                      " must not alias an input, but it shares memory with ", input_name);
}

}  // namespace

void check_inputs(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
                  const at::Tensor& act, const RepairArgs& args, const at::Tensor& out,
                  const at::Tensor& coverage) {
  TORCH_CHECK_TYPE(is_storage_dtype(z_p.scalar_type()),
                   "sau.repair: z_p must be float16, bfloat16 or float32, got ", z_p.scalar_type());
  TORCH_CHECK_TYPE(z_c.scalar_type() == z_p.scalar_type(), "sau.repair: z_c dtype ",
                   z_c.scalar_type(), " differs from z_p dtype ", z_p.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(delta.scalar_type()),
                   "sau.repair: delta must be a float tensor, got ", delta.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(act.scalar_type()),
                   "sau.repair: act must be a float tensor, got ", act.scalar_type());
  TORCH_CHECK_VALUE(z_c.device() == z_p.device() && delta.device() == z_p.device() &&
                        act.device() == z_p.device(),
                    "sau.repair: all inputs must be on one device, got z_p ", z_p.device(),
                    ", z_c ", z_c.device(), ", delta ", delta.device(), ", act ", act.device());
  TORCH_CHECK_VALUE(z_p.dim() == 4, "sau.repair: z_p must be (B, C, H, W), got shape ",
                    z_p.sizes());
  TORCH_CHECK_VALUE(z_c.sizes() == z_p.sizes(), "sau.repair: z_c shape ", z_c.sizes(),
                    " differs from z_p shape ", z_p.sizes());
  const auto B = z_p.size(0), C = z_p.size(1), H = z_p.size(2), W = z_p.size(3);
  TORCH_CHECK_VALUE(delta.dim() == 3 && delta.size(0) == C && delta.size(1) == H &&
                        delta.size(2) == W,
                    "sau.repair: delta shape ", delta.sizes(), " must be (C, H, W) = (", C, ", ",
                    H, ", ", W, ")");
  TORCH_CHECK_VALUE(act.dim() == 2 && act.size(0) == H && act.size(1) == W,
                    "sau.repair: act shape ", act.sizes(), " must be (H, W) = (", H, ", ", W,
                    ")");
  TORCH_CHECK_VALUE(args.blur_ksize >= 1 && args.blur_ksize % 2 == 1 &&
                        args.blur_ksize <= SAU_MAX_KSIZE,
                    "sau.repair: blur_ksize must be odd and in [1, ", SAU_MAX_KSIZE, "], got ",
                    args.blur_ksize);
  TORCH_CHECK_VALUE(args.blur_sigma >= 0.0, "sau.repair: blur_sigma must be >= 0, got ",
                    args.blur_sigma);
  TORCH_CHECK_VALUE(H > args.blur_ksize / 2 && W > args.blur_ksize / 2,
                    "sau.repair: reflect border needs H and W > blur_ksize // 2 = ",
                    args.blur_ksize / 2, ", got H=", H, ", W=", W);
  parse_blend(args.blend);
  parse_similarity(args.similarity);
  if (out.defined()) {
    TORCH_CHECK_VALUE(out.sizes() == z_p.sizes(), "sau.repair: out shape ", out.sizes(),
                      " differs from z_p shape ", z_p.sizes());
    TORCH_CHECK_TYPE(out.scalar_type() == z_p.scalar_type(), "sau.repair: out dtype ",
                     out.scalar_type(), " differs from z_p dtype ", z_p.scalar_type());
    TORCH_CHECK_VALUE(out.device() == z_p.device(), "sau.repair: out device ", out.device(),
                      " differs from z_p device ", z_p.device());
    check_written("out", out, z_p, z_c, delta, act);
  }
  if (coverage.defined()) {
    TORCH_CHECK_VALUE(coverage.dim() == 2 && coverage.size(0) == B && coverage.size(1) == 2,
                      "sau.repair: coverage shape ", coverage.sizes(), " must be (B, 2) = (", B,
                      ", 2)");
    TORCH_CHECK_TYPE(coverage.scalar_type() == at::kFloat,
                     "sau.repair: coverage must be float32, got ", coverage.scalar_type());
    TORCH_CHECK_VALUE(coverage.device() == z_p.device(), "sau.repair: coverage device ",
                      coverage.device(), " differs from z_p device ", z_p.device());
    check_written("coverage", coverage, z_p, z_c, delta, act);
    TORCH_CHECK_VALUE(!(out.defined() && may_overlap(coverage, out)),
                      "sau.repair: coverage must not alias out");
  }
}

SauRepairParams make_params(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& out,
                            const at::Tensor& coverage, const RepairArgs& args) {
  SauRepairParams p{};
  p.B = z_p.size(0);
  p.C = z_p.size(1);
  p.H = z_p.size(2);
  p.W = z_p.size(3);
  for (int d = 0; d < 4; ++d) {
    p.zp_stride[d] = z_p.stride(d);
    p.zc_stride[d] = z_c.stride(d);
    p.out_stride[d] = out.stride(d);
  }
  for (int d = 0; d < 2; ++d) p.cov_stride[d] = coverage.defined() ? coverage.stride(d) : 0;
  sau_init_params(&p, (float)args.tau1, (float)args.tau2, (float)args.k, (float)args.alpha,
                  (float)args.blur_sigma, (int)args.blur_ksize, parse_blend(args.blend),
                  parse_similarity(args.similarity), args.gate.has_value(),
                  args.gate.has_value() ? (float)*args.gate : 0.0f);
  return p;
}

namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define SAU_F16C 1
// c10::Half converts one value at a time in software; F16C converts eight per
// instruction, with the same round-to-nearest-even. Picked at run time, so the
// build needs no -m flags and runs on any x86-64.
bool has_f16c() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx") &&
                                                     __builtin_cpu_supports("f16c"));
  return yes;
}

__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, int64_t n,
                                                            float* dst) {
  int64_t w = 0;
  for (; w + 8 <= n; w += 8)
    _mm256_storeu_ps(dst + w, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + w))));
  for (; w < n; ++w) dst[w] = static_cast<float>(src[w]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, int64_t n,
                                                            c10::Half* dst) {
  int64_t w = 0;
  for (; w + 8 <= n; w += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + w),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + w), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; w < n; ++w) dst[w] = static_cast<c10::Half>(src[w]);
}
#endif

// Row of one channel to fp32; the unit-stride branch lets the compiler vectorise.
template <typename scalar_t>
void load_row(const scalar_t* __restrict__ src, int64_t stride, int64_t n, float* __restrict__ dst) {
#ifdef SAU_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (stride == 1 && has_f16c()) return half_to_float_f16c(src, n, dst);
  }
#endif
  if (stride == 1) {
    for (int64_t w = 0; w < n; ++w) dst[w] = static_cast<float>(src[w]);
  } else {
    for (int64_t w = 0; w < n; ++w) dst[w] = static_cast<float>(src[w * stride]);
  }
}

template <typename scalar_t>
void store_row(const float* __restrict__ src, int64_t stride, int64_t n, scalar_t* __restrict__ dst) {
#ifdef SAU_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (stride == 1 && has_f16c()) return float_to_half_f16c(src, n, dst);
  }
#endif
  if (stride == 1) {
    for (int64_t w = 0; w < n; ++w) dst[w] = static_cast<scalar_t>(src[w]);
  } else {
    for (int64_t w = 0; w < n; ++w) dst[w * stride] = static_cast<scalar_t>(src[w]);
  }
}

// Thread-local scratch for one (image, row block). Sized once per thread and
// reused, so steady-state calls allocate nothing.
struct Scratch {
  std::vector<float> data;
  float *zp, *zc, *dot, *vv, *dd, *cp, *cc, *ypad, *acc, *hb;
  void reserve(int64_t C, int64_t W, int64_t halo_rows, int r) {
    const int64_t n = 2 * C * W + 7 * W + 2 * r + halo_rows * C * W;
    if ((int64_t)data.size() < n) data.resize(n);
    float* q = data.data();
    zp = q; q += C * W;
    zc = q; q += C * W;
    dot = q; q += W;
    vv = q; q += W;
    dd = q; q += W;
    cp = q; q += W;
    cc = q; q += W;
    acc = q; q += W;
    ypad = q; q += W + 2 * r;
    hb = q;
  }
};

// Horizontally blurred y of image b, row hr, all channels, into hb (C x W).
// Returns the number of the row's pixels where M1 fires.
template <typename scalar_t>
int64_t blended_row_hblur(const scalar_t* zp, const scalar_t* zc, const float* delta,
                          const float* act, const SauRepairParams& p, int64_t b, int64_t hr,
                          Scratch& s, float* hb) {
  const int64_t C = p.C, H = p.H, W = p.W;
  const int r = p.radius;
  for (int64_t c = 0; c < C; ++c) {
    load_row(zp + b * p.zp_stride[0] + c * p.zp_stride[1] + hr * p.zp_stride[2], p.zp_stride[3], W,
             s.zp + c * W);
    load_row(zc + b * p.zc_stride[0] + c * p.zc_stride[1] + hr * p.zc_stride[2], p.zc_stride[3], W,
             s.zc + c * W);
  }

  // Cosine of v with delta, then the mask class -> blend weights per pixel.
  float* __restrict__ dot = s.dot;
  float* __restrict__ vv = s.vv;
  float* __restrict__ dd = s.dd;
  std::fill(dot, dot + W, 0.0f);
  std::fill(vv, vv + W, 0.0f);
  std::fill(dd, dd + W, 0.0f);
  const bool diff = p.similarity == SAU_SIM_DIFFERENCE;
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict__ pz = s.zp + c * W;
    const float* __restrict__ qz = s.zc + c * W;
    const float* __restrict__ d = delta + (c * H + hr) * W;
    for (int64_t w = 0; w < W; ++w) {
      const float v = diff ? pz[w] - qz[w] : pz[w];
      dot[w] += v * d[w];
      vv[w] += v * v;
      dd[w] += d[w] * d[w];
    }
  }
  const float* __restrict__ a = act + hr * W;
  float* __restrict__ cp = s.cp;
  float* __restrict__ cc = s.cc;
  const float p0 = p.coef_p[0], p1 = p.coef_p[1], p2 = p.coef_p[2], p3 = p.coef_p[3];
  const float c0 = p.coef_c[0], c1 = p.coef_c[1], c2 = p.coef_c[2], c3 = p.coef_c[3];
  const float tau1 = p.tau1, tau2 = p.tau2, gate = p.gate;  // locals: no aliasing with cp/cc
  const int has_gate = p.has_gate;
  int64_t m1 = 0;
  for (int64_t w = 0; w < W; ++w) {
    const int cls = sau_mask_class(sau_cosine(dot[w], vv[w], dd[w]), a[w], tau1, tau2, has_gate,
                                   gate);
    m1 += cls >> 1;
    // Selects rather than a table lookup: they vectorise.
    cp[w] = cls == 3 ? p3 : (cls == 2 ? p2 : (cls == 1 ? p1 : p0));
    cc[w] = cls == 3 ? c3 : (cls == 2 ? c2 : (cls == 1 ? c1 : c0));
  }

  // y for each channel into a reflect-padded row, then the horizontal taps.
  float* __restrict__ ypad = s.ypad;
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict__ pz = s.zp + c * W;
    const float* __restrict__ qz = s.zc + c * W;
    for (int64_t w = 0; w < W; ++w) ypad[r + w] = cp[w] * pz[w] + cc[w] * qz[w];
    for (int t = 1; t <= r; ++t) {
      ypad[r - t] = ypad[r + sau_reflect(-t, W)];
      ypad[r + W - 1 + t] = ypad[r + sau_reflect(W - 1 + t, W)];
    }
    float* __restrict__ row = hb + c * W;
    const float g0 = p.taps[0];
    for (int64_t w = 0; w < W; ++w) row[w] = g0 * ypad[w];
    for (int t = 1; t <= 2 * r; ++t) {
      const float g = p.taps[t];
      for (int64_t w = 0; w < W; ++w) row[w] += g * ypad[w + t];
    }
  }
  return m1;
}

template <typename scalar_t>
void repair_cpu_kernel(const scalar_t* zp, const scalar_t* zc, const float* delta, const float* act,
                       scalar_t* out, float* cov, const SauRepairParams& p) {
  const int64_t B = p.B, C = p.C, H = p.H, W = p.W;
  const int r = p.radius;
  // Split images into row blocks only as far as needed to feed every thread:
  // each block recomputes 2 * r halo rows.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t splits = std::max<int64_t>(1, (threads + B - 1) / B);
  const int64_t rows = std::min<int64_t>(H, std::max<int64_t>(16, (H + splits - 1) / splits));
  const int64_t nblk = (H + rows - 1) / rows;
  const int64_t ntasks = B * nblk;
  // Below ~32k elements a thread team costs more than it saves.
  const int64_t grain = B * C * H * W < 32768 ? ntasks : 1;

  // Coverage: M2 depends on act alone, the same for every image; M1 counts are
  // added per row block (exact: integers in fp32), then divided once per image.
  if (cov != nullptr) {
    int64_t m2 = 0;
    for (int64_t i = 0; i < H * W; ++i) m2 += act[i] > p.tau2;
    for (int64_t b = 0; b < B; ++b) {
      cov[b * p.cov_stride[0]] = 0.0f;
      cov[b * p.cov_stride[0] + p.cov_stride[1]] = sau_coverage((float)m2, H, W);
    }
  }

  at::parallel_for(0, ntasks, grain, [&](int64_t begin, int64_t end) {
    thread_local Scratch s;
    s.reserve(C, W, rows + 2 * r, r);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk;
      const int64_t h0 = (task % nblk) * rows;
      const int64_t h1 = std::min(H, h0 + rows);
      // hb holds rows h0 - r .. h1 - 1 + r (reflected), each C x W.
      int64_t m1 = 0;
      for (int64_t j = 0; j < h1 - h0 + 2 * r; ++j) {
        const int64_t n = blended_row_hblur(zp, zc, delta, act, p, b, sau_reflect(h0 - r + j, H),
                                            s, s.hb + j * C * W);
        if (j >= r && j < r + h1 - h0) m1 += n;  // the block's own rows only
      }
      if (cov != nullptr)
        std::atomic_ref<float>(cov[b * p.cov_stride[0]]).fetch_add((float)m1);
      float* __restrict__ acc = s.acc;
      for (int64_t i = 0; i < h1 - h0; ++i) {
        for (int64_t c = 0; c < C; ++c) {
          const float* __restrict__ src0 = s.hb + (i * C + c) * W;
          const float g0 = p.taps[0];
          for (int64_t w = 0; w < W; ++w) acc[w] = g0 * src0[w];
          for (int t = 1; t <= 2 * r; ++t) {
            const float* __restrict__ src = s.hb + ((i + t) * C + c) * W;
            const float g = p.taps[t];
            for (int64_t w = 0; w < W; ++w) acc[w] += g * src[w];
          }
          store_row(acc, p.out_stride[3], W,
                    out + b * p.out_stride[0] + c * p.out_stride[1] + (h0 + i) * p.out_stride[2]);
        }
      }
    }
  });
  if (cov != nullptr)
    for (int64_t b = 0; b < B; ++b)
      cov[b * p.cov_stride[0]] = sau_coverage(cov[b * p.cov_stride[0]], H, W);
}

void run_cpu(const at::Tensor& z_p, const at::Tensor& z_c, const at::Tensor& delta,
             const at::Tensor& act, const RepairArgs& args, at::Tensor& out,
             const at::Tensor& coverage) {
  if (z_p.size(0) == 0) return;
  // delta and act are (C,H,W) and (H,W): small, so convert rather than template.
  const at::Tensor d = delta.to(at::kFloat).contiguous();
  const at::Tensor a = act.to(at::kFloat).contiguous();
  const SauRepairParams p = make_params(z_p, z_c, out, coverage, args);
  float* cov = coverage.defined() ? coverage.mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z_p.scalar_type(), "sau_repair_cpu", [&] {
    repair_cpu_kernel<scalar_t>(z_p.const_data_ptr<scalar_t>(), z_c.const_data_ptr<scalar_t>(),
                                d.const_data_ptr<float>(), a.const_data_ptr<float>(),
                                out.mutable_data_ptr<scalar_t>(), cov, p);
  });
}

}  // namespace

}  // namespace sau

// The schema is the single source of truth for every backend's signature.
TORCH_LIBRARY(sau, m) {
  m.def(
      "repair(Tensor z_p, Tensor z_c, Tensor delta, Tensor act, float tau1=0.5, "
      "float tau2=0.3, float k=12.0, float alpha=1.0, float blur_sigma=0.2, "
      "int blur_ksize=5, str blend=\"convex\", str similarity=\"latent\", "
      "float? gate=None) -> Tensor");
  // Writes into a preallocated `out` (any strides, must not alias the inputs)
  // and allocates nothing: the CUDA-graph friendly variant. `coverage`, when
  // given, is a (B, 2) fp32 tensor that receives per image the mean over H x W
  // of M1 (column 0) and of M2 (column 1), counted in the same pass.
  m.def(
      "repair_out(Tensor z_p, Tensor z_c, Tensor delta, Tensor act, float tau1=0.5, "
      "float tau2=0.3, float k=12.0, float alpha=1.0, float blur_sigma=0.2, "
      "int blur_ksize=5, str blend=\"convex\", str similarity=\"latent\", "
      "float? gate=None, *, Tensor(a!) out, Tensor(b!)? coverage=None) -> ()");
}

TORCH_LIBRARY_IMPL(sau, CPU, m) {
  m.impl("repair", &sau::repair_op<&sau::run_cpu>);
  m.impl("repair_out", &sau::repair_out_op<&sau::run_cpu>);
}

// Importing sau_kernels._C registers the ops above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
