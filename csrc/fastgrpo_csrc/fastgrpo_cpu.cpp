// Native CPU blocks of fastgrpo's torch backend (fastgrpo/ops/logprobs.py; built on first use by
// fastgrpo/ops/_native.py, falling back to plain torch when no compiler is present).
//
// Three pieces, each replacing a chain of torch ops on one [rows x vocab] logits block:
//
//   * pack_bf16 / logits_bf16: the logits GEMM with bf16 operands and a float32 result, through
//     oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, the one PyTorch's CPU flash
//     attention uses; AMX or AVX-512-BF16).  torch.mm on bf16 rounds its output to bf16 (7.6e-3
//     nats of log-prob error); this keeps bf16 GEMM rates with fp32 logits.
//   * row_stats_: one sweep over a float32 block updating each row's online max m, sum of
//     exp(z - m), sum of exp(z - m) * z and the target logit (log-sum-exp, log-prob, entropy).
//   * grad_logits: one sweep writing dL/dz = gl * 1[v == y] - p * (A + B z), p = exp(z - lse),
//     in the dtype of the gradient GEMMs that consume it (bf16 or fp32; in place for fp32).
//
// Logits are z = raw * scale (scale = 1 / temperature), clamped below at -1e30 so a -inf
// logit (a masked vocabulary row) contributes exactly nothing and never makes 0 * inf = nan.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr float kNeg = -1e30f;
constexpr int64_t kTile = 64;   // brgemm column tile: the widest oneDNN packs for bf16

// exp(x) in float32, branch-free so loops over it vectorize (Cephes' polynomial, ~1 ulp);
// exactly 0 below -87.3 (exp underflows there anyway), so exp(-1e30) == 0.
static inline float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  // round to nearest by the 1.5 * 2^23 trick (vectorizes, unlike nearbyint)
  const float fx = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return x < -87.3f ? 0.0f : p * two_k;
}

#if defined(__AVX512F__)
// fast_exp on 16 lanes (the same polynomial and clamping).
static inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.3f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i k = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(k));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), e);
}

// 16 floats -> 16 bf16, rounded to nearest even (inputs are never NaN here).
static inline __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
#endif
}
#endif

void check_block(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kFloat && z.stride(1) == 1,
              name, ": expected a float32 [rows, cols] block with unit column stride");
}

void check_vec(const at::Tensor& x, int64_t n, at::ScalarType dt, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.numel() == n && x.scalar_type() == dt && x.is_contiguous(),
              name, ": expected a contiguous [", n, "] vector of ", dt);
}

}  // namespace

// ------------------------------------------------------------------------------ bf16 GEMM

bool brgemm_available() {
  return at::native::cpublas::could_pack(at::kBFloat16);
}

// w [C, D] bf16 -> w^T in oneDNN's VNNI layout, in tiles of kTile columns: [ceil(C/64), D, 64].
at::Tensor pack_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_bf16: bf16 [C, D]");
  TORCH_CHECK(w.size(1) % 2 == 0, "pack_bf16: D must be even for the VNNI layout");
  const int64_t c = w.size(0), d = w.size(1), tiles = (c + kTile - 1) / kTile;
  auto wt = at::zeros({tiles * kTile, d}, w.options());
  wt.narrow(0, 0, c).copy_(w);
  // [tiles, 64, D] -> [tiles, D, 64] row-major: the K x N operand of each tile
  auto kn = wt.view({tiles, kTile, d}).transpose(1, 2).contiguous();
  auto out = at::empty_like(kn);
  const auto* src = kn.data_ptr<at::BFloat16>();
  auto* dst = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      at::native::cpublas::pack(d, kTile, kTile, kTile, at::kBFloat16, at::kBFloat16,
                                src + t * d * kTile, dst + t * d * kTile);
  });
  return out;
}

// z[R, C] (float32, into `out` at column offset 0) = h[R, D] @ w^T, w given by pack_bf16.
void logits_bf16(const at::Tensor& h, const at::Tensor& packed, int64_t c, at::Tensor& out) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kBFloat16 && h.stride(1) == 1,
              "logits_bf16: h must be bf16 [R, D] with unit column stride");
  check_block(out, "logits_bf16");
  const int64_t r = h.size(0), d = h.size(1), tiles = packed.size(0), ldh = h.stride(0);
  TORCH_CHECK(packed.size(1) == d && packed.size(2) == kTile && tiles * kTile >= c,
              "logits_bf16: packed weight does not match");
  TORCH_CHECK(out.size(0) == r && out.size(1) >= c, "logits_bf16: out too small");
  const int64_t ldz = out.stride(0);
  const auto* hp = h.data_ptr<at::BFloat16>();
  const auto* wp = packed.data_ptr<at::BFloat16>();
  float* zp = out.data_ptr<float>();
  constexpr int64_t kRows = 32;          // brgemm row tile
  constexpr int64_t kGroup = 16;         // column tiles per group: 1024 columns stay in L2
  const int64_t row_tiles = (r + kRows - 1) / kRows;
  const int64_t groups = (tiles + kGroup - 1) / kGroup;
  at::parallel_for(0, row_tiles * groups, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float tail[kRows * kTile];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / row_tiles, rt = i % row_tiles;
      const int64_t r0 = rt * kRows, mb = std::min(kRows, r - r0);
      for (int64_t t = g * kGroup; t < std::min(tiles, (g + 1) * kGroup); ++t) {
        const int64_t c0 = t * kTile, nb = std::min(kTile, c - c0);
        const auto* bp = wp + t * d * kTile;
        if (nb == kTile) {
          at::native::cpublas::brgemm(mb, kTile, d, ldh, kTile, ldz, false, hp + r0 * ldh, bp,
                                      zp + r0 * ldz + c0, true);
        } else {   // ragged last tile: a full tile into a scratch, then the valid columns
          at::native::cpublas::brgemm(mb, kTile, d, ldh, kTile, kTile, false, hp + r0 * ldh,
                                      bp, tail, true);
          for (int64_t a = 0; a < mb; ++a)
            std::memcpy(zp + (r0 + a) * ldz + c0, tail + a * kTile, nb * sizeof(float));
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// ------------------------------------------------------------------------------ sweeps

// Online row statistics of z = max(raw * scale, -1e30) over one block whose vocabulary starts
// at column c0: m (running max, -inf before the first block), s = sum exp(z - m),
// t = sum exp(z - m) * z, zy += z[y - c0] where the target falls in this block.
void row_stats_(const at::Tensor& raw, const at::Tensor& y, int64_t c0, double scale,
                at::Tensor& m, at::Tensor& s, at::Tensor& t, at::Tensor& zy) {
  check_block(raw, "row_stats_");
  const int64_t r = raw.size(0), c = raw.size(1), ld = raw.stride(0);
  check_vec(y, r, at::kLong, "row_stats_ y");
  for (auto* x : {&m, &s, &t, &zy}) check_vec(*x, r, at::kFloat, "row_stats_ state");
  const float* zp = raw.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>(), *tp = t.data_ptr<float>(),
        *yz = zy.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, r, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* row = zp + i * ld;
      float mx = kNeg, se = 0.f, sez = 0.f;
      int64_t j = 0;
#if defined(__AVX512F__)
      const __m512 vsc = _mm512_set1_ps(sc), vneg = _mm512_set1_ps(kNeg);
      __m512 vmx = vneg;
      for (; j + 16 <= c; j += 16)
        vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(row + j));
      if (j < c) {
        const __mmask16 k = (__mmask16)((1u << (c - j)) - 1);
        vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(vneg, k, row + j));
      }
      // the max of raw * scale is scale * max(raw) (scale > 0)
      mx = std::max(_mm512_reduce_max_ps(vmx) * sc, kNeg);
#else
      for (; j < c; ++j) mx = std::max(mx, row[j] * sc);
      mx = std::max(mx, kNeg);
#endif
      const float m_new = std::max(mp[i], mx);
      j = 0;
#if defined(__AVX512F__)
      const __m512 vm = _mm512_set1_ps(m_new);
      __m512 vse = _mm512_setzero_ps(), vsez = _mm512_setzero_ps();
      for (; j < c; j += 16) {
        const __mmask16 k = c - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (c - j)) - 1);
        const __m512 z = _mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), vsc),
                                       vneg);
        const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(z, vm)));
        vse = _mm512_add_ps(vse, e);
        vsez = _mm512_fmadd_ps(e, z, vsez);
      }
      se = _mm512_reduce_add_ps(vse);
      sez = _mm512_reduce_add_ps(vsez);
#else
      for (; j < c; ++j) {
        const float z = std::max(row[j] * sc, kNeg);
        const float e = fast_exp(z - m_new);
        se += e;
        sez += e * z;
      }
#endif
      const float keep = std::exp(mp[i] - m_new);   // 0 on the first block (m = -inf)
      sp[i] = sp[i] * keep + se;
      tp[i] = tp[i] * keep + sez;
      mp[i] = m_new;
      const int64_t col = yp[i] - c0;
      if (yp[i] >= 0 && col >= 0 && col < c) yz[i] += std::max(row[col] * sc, kNeg);
    }
  });
}

// dL/dz for one block: out = out_scale * (gl * 1[v == y] - p * (a + b * z)), p = exp(z - lse),
// z = max(raw * scale, -1e30).  (a = gl - ge * Ez, b = ge: the log-prob and entropy terms.)
// `out` may be `raw` itself (float32) or a bf16 block of the same shape.
void grad_logits(const at::Tensor& raw, const at::Tensor& y, int64_t c0, double scale,
                 const at::Tensor& lse, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& gl, double out_scale, at::Tensor& out) {
  check_block(raw, "grad_logits");
  const int64_t r = raw.size(0), c = raw.size(1), ld = raw.stride(0);
  check_vec(y, r, at::kLong, "grad_logits y");
  for (auto* x : {&lse, &a, &b, &gl}) check_vec(*x, r, at::kFloat, "grad_logits row vector");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == r && out.size(1) == c && out.stride(1) == 1 &&
              (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "grad_logits: out must be a float32 or bf16 [rows, cols] block");
  const float* zp = raw.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  const float *lp = lse.data_ptr<float>(), *ap = a.data_ptr<float>(),
              *bp = b.data_ptr<float>(), *gp = gl.data_ptr<float>();
  const float sc = static_cast<float>(scale), os = static_cast<float>(out_scale);
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  const int64_t ldo = out.stride(0);
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  at::BFloat16* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, r, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* row = zp + i * ld;
      const float l = lp[i], ai = -ap[i] * os, bi = -bp[i] * os;
      const int64_t col = yp[i] - c0;
      const bool hit = yp[i] >= 0 && col >= 0 && col < c;
      float at_y = 0.f;
      if (hit) {   // before the sweep: it may overwrite raw in place
        const float z = std::max(row[col] * sc, kNeg);
        at_y = gp[i] * os - fast_exp(z - l) * (ap[i] + bp[i] * z) * os;
      }
      int64_t j = 0;
#if defined(__AVX512F__)
      const __m512 vsc = _mm512_set1_ps(sc), vneg = _mm512_set1_ps(kNeg),
                   vl = _mm512_set1_ps(l), va = _mm512_set1_ps(ai), vb = _mm512_set1_ps(bi);
      for (; j < c; j += 16) {
        const __mmask16 k = c - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (c - j)) - 1);
        const __m512 z = _mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), vsc),
                                       vneg);
        const __m512 v = _mm512_mul_ps(exp16(_mm512_sub_ps(z, vl)), _mm512_fmadd_ps(vb, z, va));
        if (bf16)
          _mm256_mask_storeu_epi16(ob + i * ldo + j, k, to_bf16(v));
        else
          _mm512_mask_storeu_ps(of + i * ldo + j, k, v);
      }
#else
      for (; j < c; ++j) {
        const float z = std::max(row[j] * sc, kNeg);
        const float v = fast_exp(z - l) * (ai + bi * z);
        if (bf16) ob[i * ldo + j] = c10::BFloat16(v);
        else of[i * ldo + j] = v;
      }
#endif
      if (hit) {
        if (bf16) ob[i * ldo + col] = c10::BFloat16(at_y);
        else of[i * ldo + col] = at_y;
      }
    }
  });
}

// acc (float32) += x (bf16), elementwise over equal-shaped contiguous tensors: folds a bf16
// gradient GEMM's output into its float32 accumulator (torch's mixed-dtype add_ is ~4x slower).
void add_bf16_(at::Tensor& acc, const at::Tensor& x) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && x.scalar_type() == at::kBFloat16 &&
              acc.is_contiguous() && x.is_contiguous() && acc.numel() == x.numel(),
              "add_bf16_: float32 accumulator and bf16 addend of one shape, contiguous");
  float* ap = acc.data_ptr<float>();
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, acc.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if defined(__AVX512F__)
    for (; i + 16 <= i1; i += 16) {
      const __m512i u = _mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(xp + i))), 16);
      _mm512_storeu_ps(ap + i, _mm512_add_ps(_mm512_loadu_ps(ap + i), _mm512_castsi512_ps(u)));
    }
#endif
    for (; i < i1; ++i) {
      const uint32_t u = static_cast<uint32_t>(xp[i]) << 16;
      float f;
      std::memcpy(&f, &u, sizeof(f));
      ap[i] += f;
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("brgemm_available", &brgemm_available);
  mod.def("pack_bf16", &pack_bf16);
  mod.def("logits_bf16", &logits_bf16);
  mod.def("row_stats_", &row_stats_);
  mod.def("grad_logits", &grad_logits);
  mod.def("add_bf16_", &add_bf16_);
}
