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
//     With store_exp it also leaves e = exp(z - max) in the block (whole rows), which the
//     one-pass gradient GEMMs read as it is when the objective has no entropy term.
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
#include <optional>
#include <vector>

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
// fast_exp on 16 lanes for x <= 0 (every caller passes z - max or z - lse): 2^(x log2 e) split
// into 2^n (scalef, exact) and 2^f, |f| <= 1/2, by a degree-6 Taylor polynomial (relative
// error < 2e-7); x log2 e in two parts (hi + lo) so large |x| keeps fp32 accuracy.  Exactly 0
// below -87.3, as fast_exp.
static inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.925963033500011e-08f),
                                   _mm512_fmsub_ps(xc, _mm512_set1_ps(1.44269502162933349609f), n));
  __m512 p = _mm512_set1_ps(1.5403530393381606e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), _mm512_scalef_ps(p, n));
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

// ------------------------------------------------------------------------------ row sweeps

// Online statistics of one row segment of raw logits (c columns starting at vocabulary column
// c0; z = max(raw * scale, -1e30)): m (running max, -inf before the first segment),
// s = sum exp(z - m), t = sum exp(z - m) * z, zy += z[y - c0] when the target is here.
static inline void stats_row(const float* row, int64_t c, int64_t c0, float sc, int64_t y,
                             float& m, float& s, float& t, float& zy, float* e_out = nullptr) {
  const int64_t col = y - c0;   // before the sweep: e_out may overwrite row in place
  if (y >= 0 && col >= 0 && col < c) zy += std::max(row[col] * sc, kNeg);
  float mx = kNeg, se = 0.f, sez = 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vsc = _mm512_set1_ps(sc), vneg = _mm512_set1_ps(kNeg);
  __m512 vmx = vneg;
  for (; j + 16 <= c; j += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(row + j));
  if (j < c)
    vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(vneg, (__mmask16)((1u << (c - j)) - 1),
                                                  row + j));
  mx = std::max(_mm512_reduce_max_ps(vmx) * sc, kNeg);   // max(raw * sc) = sc * max(raw)
  const float m_new = std::max(m, mx);
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 vse = _mm512_setzero_ps(), vsez = _mm512_setzero_ps();
  for (j = 0; j < c; j += 16) {
    const __mmask16 k = c - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (c - j)) - 1);
    const __m512 z = _mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), vsc), vneg);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(z, vm)));
    if (e_out) _mm512_mask_storeu_ps(e_out + j, k, e);
    vse = _mm512_add_ps(vse, e);
    vsez = _mm512_fmadd_ps(e, z, vsez);
  }
  se = _mm512_reduce_add_ps(vse);
  sez = _mm512_reduce_add_ps(vsez);
#else
  for (; j < c; ++j) mx = std::max(mx, row[j] * sc);
  mx = std::max(mx, kNeg);
  const float m_new = std::max(m, mx);
  for (j = 0; j < c; ++j) {
    const float z = std::max(row[j] * sc, kNeg);
    const float e = fast_exp(z - m_new);
    if (e_out) e_out[j] = e;
    se += e;
    sez += e * z;
  }
#endif
  const float keep = std::exp(m - m_new);   // 0 on the first segment (m = -inf)
  s = s * keep + se;
  t = t * keep + sez;
  m = m_new;
}

// dL/dz of one row segment: out = os * (gl * 1[v == y] - p * (a + b * z)), p = exp(z - lse).
// (a = gl - ge * Ez, b = ge: the log-prob and entropy terms.)  `of` (float32, may alias row)
// and / or `ob` (bf16) receive it.
static inline void dz_row(const float* row, int64_t c, int64_t c0, float sc, int64_t y,
                          float l, float a, float b, float gl, float os, float* of,
                          at::BFloat16* ob) {
  const int64_t col = y - c0;
  const bool hit = y >= 0 && col >= 0 && col < c;
  float at_y = 0.f;
  if (hit) {   // before the sweep: it may overwrite row in place
    const float z = std::max(row[col] * sc, kNeg);
    at_y = (gl - fast_exp(z - l) * (a + b * z)) * os;
  }
  const float ai = -a * os, bi = -b * os;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vsc = _mm512_set1_ps(sc), vneg = _mm512_set1_ps(kNeg), vl = _mm512_set1_ps(l),
               va = _mm512_set1_ps(ai), vb = _mm512_set1_ps(bi);
  for (; j < c; j += 16) {
    const __mmask16 k = c - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (c - j)) - 1);
    const __m512 z = _mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), vsc), vneg);
    const __m512 v = _mm512_mul_ps(exp16(_mm512_sub_ps(z, vl)), _mm512_fmadd_ps(vb, z, va));
    if (ob) _mm256_mask_storeu_epi16(ob + j, k, to_bf16(v));
    if (of) _mm512_mask_storeu_ps(of + j, k, v);
  }
#else
  for (; j < c; ++j) {
    const float z = std::max(row[j] * sc, kNeg);
    const float v = fast_exp(z - l) * (ai + bi * z);
    if (ob) ob[j] = c10::BFloat16(v);
    if (of) of[j] = v;
  }
#endif
  if (hit) {
    if (ob) ob[col] = c10::BFloat16(at_y);
    if (of) of[col] = at_y;
  }
}

// ------------------------------------------------------------------------------ bf16 GEMM

#if defined(__AVX512F__)
// out[j * ldo + i] = in[i * ldi + j] for a 16 x 16 block of 32-bit values (four shuffle stages).
static inline void transpose16(const uint32_t* in, int64_t ldi, uint32_t* out, int64_t ldo) {
  __m512i r[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(in + i * ldi);
  for (int i = 0; i < 16; i += 2) {
    u[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    u[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(u[i], u[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(u[i], u[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(u[i + 1], u[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(u[i + 1], u[i + 3]);
  }
  // r[4q + s] now holds, in its 128-bit lane L, column 4L + s of rows 4q..4q+3
  for (int i = 0; i < 8; ++i) {
    const int a = (i / 4) * 8 + (i % 4), b = a + 4;
    u[a] = _mm512_shuffle_i32x4(r[a], r[b], 0x88);
    u[b] = _mm512_shuffle_i32x4(r[a], r[b], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(u[i], u[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(u[i], u[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * ldo, r[i]);   // r[j]: column j
}
#endif

// A packed operand's tensor: a view at the front of `buf` when given (a workspace reused
// across vocabulary slices: no fresh pages to fault in on every slice), else a new tensor.
static at::Tensor pack_target(const std::optional<at::Tensor>& buf, at::IntArrayRef sizes,
                              const at::TensorOptions& opts) {
  if (!buf) return at::empty(sizes, opts);
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  TORCH_CHECK(buf->scalar_type() == at::kBFloat16 && buf->is_contiguous() && buf->numel() >= n,
              "pack: the workspace must be a contiguous bf16 tensor of at least ", n, " elements");
  return buf->view(-1).narrow(0, 0, n).view(sizes);
}

bool brgemm_available() {
  return at::native::cpublas::could_pack(at::kBFloat16);
}

// w [C, D] bf16 -> w^T in the VNNI layout brgemm takes for bf16, in tiles of kTile columns:
// [ceil(C/64), D/2, 64, 2], i.e. per tile the 32-bit pairs (w[n, 2k], w[n, 2k+1]) transposed
// to [k][n] (what cpublas::pack produces; tests/test_native.py checks the products).
at::Tensor pack_bf16(const at::Tensor& w, std::optional<at::Tensor> buf) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.stride(1) == 1,
              "pack_bf16: bf16 [C, D] with unit column stride");
  TORCH_CHECK(w.size(1) % 2 == 0, "pack_bf16: D must be even for the VNNI layout");
  const int64_t c = w.size(0), d = w.size(1), kk = d / 2, tiles = (c + kTile - 1) / kTile;
  const int64_t ldw = w.stride(0) / 2;   // in 32-bit pairs
  auto out = pack_target(buf, {tiles, d, kTile}, w.options());
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint32_t* o = dst + t * kk * kTile;
      const int64_t nb = std::min(kTile, c - t * kTile);
      int64_t k0 = 0;
#if defined(__AVX512F__)
      if (nb == kTile)                                  // 16 x 16 pairs per register transpose
        for (; k0 + 16 <= kk; k0 += 16)
          for (int64_t n0 = 0; n0 < kTile; n0 += 16)
            transpose16(src + (t * kTile + n0) * ldw + k0, ldw, o + k0 * kTile + n0, kTile);
#endif
      for (; k0 < kk; k0 += 16)                         // 16 x 64 pairs at a time: in cache
        for (int64_t n = 0; n < kTile; ++n) {
          const uint32_t* in = src + (t * kTile + n) * ldw;
          for (int64_t k = k0; k < std::min(kk, k0 + 16); ++k)
            o[k * kTile + n] = n < nb ? in[k] : 0u;
        }
    }
  });
  return out;
}

namespace {

// Columns per group: the packed weight of a group (G * D * 2 bytes) stays in L2 while every
// row tile of a thread passes over it.
int64_t group_cols(int64_t d, int64_t c, int64_t budget = 512 * 1024) {
  const int64_t g = std::max<int64_t>(1, budget / (d * 2 * kTile)) * kTile;
  return std::min<int64_t>(std::min<int64_t>(g, 1024), ((c + kTile - 1) / kTile) * kTile);
}

constexpr int64_t kRows = 64;   // brgemm row tile

// For each (row tile, column group) of h @ w^T (w from pack_bf16, c columns): the raw fp32
// logits of the tile into a per-thread scratch [kRows, G], then fn(row0, rows, col0, cols,
// scratch, ld).  Threads own row ranges, so per-row state needs no synchronization.
template <typename Fn>
void for_logits_tiles(const at::Tensor& h, const at::Tensor& packed, int64_t c, Fn fn) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kBFloat16 && h.stride(1) == 1,
              "h must be bf16 [R, D] with unit column stride");
  const int64_t r = h.size(0), d = h.size(1), ldh = h.stride(0), tiles = packed.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == d && packed.size(2) == kTile &&
              tiles * kTile >= c, "packed weight does not match h / the column count");
  const int64_t g = group_cols(d, c), row_tiles = (r + kRows - 1) / kRows;
  const auto* hp = h.data_ptr<at::BFloat16>();
  const auto* wp = packed.data_ptr<at::BFloat16>();
  at::parallel_for(0, row_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(kRows * g);
    for (int64_t g0 = 0; g0 < c; g0 += g) {
      const int64_t gc = std::min(g, c - g0);
      for (int64_t rt = t0; rt < t1; ++rt) {
        const int64_t r0 = rt * kRows, mb = std::min(kRows, r - r0);
        for (int64_t j = 0; j < gc; j += kTile)
          at::native::cpublas::brgemm(mb, kTile, d, ldh, kTile, g, false, hp + r0 * ldh,
                                      wp + (g0 + j) / kTile * d * kTile, scratch.data() + j,
                                      true);
        fn(r0, mb, g0, gc, scratch.data(), g);
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace

// z[R, C] (float32, into `out`) = h[R, D] @ w^T, w given by pack_bf16.
void logits_bf16(const at::Tensor& h, const at::Tensor& packed, int64_t c, at::Tensor& out) {
  check_block(out, "logits_bf16");
  TORCH_CHECK(out.size(0) == h.size(0) && out.size(1) == c, "logits_bf16: out is not [R, C]");
  float* zp = out.data_ptr<float>();
  const int64_t ldz = out.stride(0);
  for_logits_tiles(h, packed, c, [&](int64_t r0, int64_t mb, int64_t g0, int64_t gc,
                                     const float* z, int64_t ld) {
    for (int64_t a = 0; a < mb; ++a)
      std::memcpy(zp + (r0 + a) * ldz + g0, z + a * ld, gc * sizeof(float));
  });
}

// Row statistics (row_stats_) of h @ w^T * scale computed tile by tile in cache: the logits
// never reach memory, unless `keep` (float32 [R, C]) is given to receive them.
void stats_bf16_(const at::Tensor& h, const at::Tensor& packed, int64_t c, const at::Tensor& y,
                 int64_t c0, double scale, at::Tensor& m, at::Tensor& s, at::Tensor& t,
                 at::Tensor& zy, std::optional<at::Tensor> keep) {
  const int64_t r = h.size(0);
  check_vec(y, r, at::kLong, "stats_bf16_ y");
  for (auto* x : {&m, &s, &t, &zy}) check_vec(*x, r, at::kFloat, "stats_bf16_ state");
  float* kp = nullptr;
  int64_t ldk = 0;
  if (keep.has_value()) {
    check_block(*keep, "stats_bf16_ keep");
    TORCH_CHECK(keep->size(0) == r && keep->size(1) == c, "stats_bf16_: keep is not [R, C]");
    kp = keep->data_ptr<float>();
    ldk = keep->stride(0);
  }
  const int64_t* yp = y.data_ptr<int64_t>();
  float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>(), *tp = t.data_ptr<float>(),
        *yz = zy.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  for_logits_tiles(h, packed, c, [&](int64_t r0, int64_t mb, int64_t g0, int64_t gc,
                                     const float* z, int64_t ld) {
    for (int64_t a = 0; a < mb; ++a) {
      const int64_t i = r0 + a;
      stats_row(z + a * ld, gc, c0 + g0, sc, yp[i], mp[i], sp[i], tp[i], yz[i]);
      if (kp) std::memcpy(kp + i * ldk + g0, z + a * ld, gc * sizeof(float));
    }
  });
}

// dL/dz (grad_logits) of h @ w^T * scale, computed tile by tile in cache, into bf16 `out`.
void grad_bf16(const at::Tensor& h, const at::Tensor& packed, int64_t c, const at::Tensor& y,
               int64_t c0, double scale, const at::Tensor& lse, const at::Tensor& a,
               const at::Tensor& b, const at::Tensor& gl, double out_scale, at::Tensor& out) {
  const int64_t r = h.size(0);
  check_vec(y, r, at::kLong, "grad_bf16 y");
  for (auto* x : {&lse, &a, &b, &gl}) check_vec(*x, r, at::kFloat, "grad_bf16 row vector");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == r && out.size(1) == c && out.stride(1) == 1 &&
              out.scalar_type() == at::kBFloat16, "grad_bf16: out must be bf16 [R, C]");
  const int64_t* yp = y.data_ptr<int64_t>();
  const float *lp = lse.data_ptr<float>(), *ap = a.data_ptr<float>(),
              *bp = b.data_ptr<float>(), *gp = gl.data_ptr<float>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t ldo = out.stride(0);
  const float sc = static_cast<float>(scale), os = static_cast<float>(out_scale);
  for_logits_tiles(h, packed, c, [&](int64_t r0, int64_t mb, int64_t g0, int64_t gc,
                                     const float* z, int64_t ld) {
    for (int64_t k = 0; k < mb; ++k) {
      const int64_t i = r0 + k;
      dz_row(z + k * ld, gc, c0 + g0, sc, yp[i], lp[i], ap[i], bp[i], gp[i], os, nullptr,
             op + i * ldo + g0);
    }
  });
}

// x [K, C] bf16 -> B[k][n] = x[k, n] in the VNNI layout brgemm takes, in tiles of kTile
// columns: [ceil(C/64), K2, 64, 2] with K2 = ceil(K/2) pairs of rows, zero-padded (rows and
// columns).  For the gradient GEMMs: x = h (dW's B, rows = tokens) or x = w (dh's B, rows =
// vocabulary).
at::Tensor pack_kn(const at::Tensor& x, std::optional<at::Tensor> buf) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "pack_kn: bf16 [K, C] with unit column stride");
  const int64_t k = x.size(0), c = x.size(1), k2 = (k + 1) / 2, tiles = (c + kTile - 1) / kTile;
  const int64_t ldx = x.stride(0);
  auto out = pack_target(buf, {tiles, k2 * 2, kTile}, x.options());
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, k2, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* r0 = src + 2 * p * ldx;
      const bool two = 2 * p + 1 < k;
      const uint16_t* r1 = src + (2 * p + 1) * ldx;
      for (int64_t t = 0; t < tiles; ++t) {
        uint16_t* o = dst + (t * k2 + p) * 2 * kTile;
        const int64_t n0 = t * kTile, nb = std::min(kTile, c - n0);
#if defined(__AVX512F__)
        if (nb == kTile && two) {
          const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                              40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                              1, 32, 0);
          const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
          for (int64_t j = 0; j < kTile; j += 32) {
            const __m512i a = _mm512_loadu_si512(r0 + n0 + j), b = _mm512_loadu_si512(r1 + n0 + j);
            _mm512_storeu_si512(o + 2 * j, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(o + 2 * j + 32, _mm512_permutex2var_epi16(a, hi, b));
          }
          continue;
        }
#endif
        for (int64_t j = 0; j < kTile; ++j) {
          o[2 * j] = j < nb ? r0[n0 + j] : 0;
          o[2 * j + 1] = j < nb && two ? r1[n0 + j] : 0;
        }
      }
    }
  });
  return out;
}

// The bf16 backward of one vocabulary slice in one walk, nothing of [R, C] reaching memory:
// per (column group, row tile) the logits tile (brgemm, fp32, in cache), dL/dz in place
// (dz_row), then dz in bf16 into the two gradient GEMMs (brgemm, fp32 accumulators):
//   dh[R, D] += dz [rows, G] @ w_g [G, D]       (wkn = pack_kn(w slice))
//   dw[C, D] = dz^T [G, N] @ h [N, D]          (hkn = pack_kn(h))
// dh accumulates (float32); dw's rows of a group add up over the row tiles in a float32 scratch
// and are written once, in bf16 (rows past dw's own count, a padding row, are dropped).
// Threads own column groups (disjoint dw rows); each thread's dh goes to a private buffer
// added at the end.
void grad_gemms_bf16(const at::Tensor& h, const at::Tensor& packed, const at::Tensor& hkn,
                     const at::Tensor& wkn, int64_t c, const at::Tensor& y, int64_t c0,
                     double scale, const at::Tensor& lse, const at::Tensor& a,
                     const at::Tensor& b, const at::Tensor& gl, double out_scale, at::Tensor& dh,
                     at::Tensor& dw) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kBFloat16 && h.stride(1) == 1,
              "grad_gemms_bf16: h must be bf16 [R, D] with unit column stride");
  const int64_t r = h.size(0), d = h.size(1), ldh = h.stride(0);
  TORCH_CHECK(d % kTile == 0, "grad_gemms_bf16: D must be a multiple of 64");
  TORCH_CHECK(c % 2 == 0, "grad_gemms_bf16: the slice must have an even column count");
  check_vec(y, r, at::kLong, "grad_gemms_bf16 y");
  for (auto* x : {&lse, &a, &b, &gl}) check_vec(*x, r, at::kFloat, "grad_gemms_bf16 row vector");
  TORCH_CHECK(dh.scalar_type() == at::kFloat && dh.is_contiguous() && dh.size(0) == r &&
              dh.size(1) == d, "grad_gemms_bf16: dh must be float32 [R, D], contiguous");
  TORCH_CHECK(dw.scalar_type() == at::kBFloat16 && dw.stride(1) == 1 && dw.size(0) <= c &&
              dw.size(1) == d, "grad_gemms_bf16: dw must be bf16 [<= C, D], unit column stride");
  const int64_t r2 = hkn.size(1), c2 = wkn.size(1);
  TORCH_CHECK(hkn.size(0) == d / kTile && r2 >= r && wkn.size(0) == d / kTile && c2 >= c,
              "grad_gemms_bf16: packed operands do not match");
  // narrower groups than the forward's: a group's logits, dz (twice), packed w (twice) and
  // dw rows share L2 here; at least 256 columns, the K of the dh product
  const int64_t g = std::max<int64_t>(std::min<int64_t>(256, (c + kTile - 1) / kTile * kTile),
                                      group_cols(d, c, 128 * 1024));
  const int64_t groups = (c + g - 1) / g;
  constexpr int64_t rt = 256;   // rows per tile: dw's K
  const auto* hp = h.data_ptr<at::BFloat16>();
  const auto* wp = packed.data_ptr<at::BFloat16>();
  const auto* hk = hkn.data_ptr<at::BFloat16>();
  const auto* wk = wkn.data_ptr<at::BFloat16>();
  const int64_t* yp = y.data_ptr<int64_t>();
  const float *lp = lse.data_ptr<float>(), *ap = a.data_ptr<float>(),
              *bp = b.data_ptr<float>(), *gp = gl.data_ptr<float>();
  const float sc = static_cast<float>(scale), os = static_cast<float>(out_scale);
  at::BFloat16* dwp = dw.data_ptr<at::BFloat16>();
  const int64_t ldw = dw.stride(0), cw = dw.size(0);
  const int64_t ldacc = d + 16;   // the dw accumulator's row stride, off the 4 KiB aliasing
  const int nthreads = at::get_num_threads();
  std::vector<at::Tensor> private_dh(nthreads);
  at::parallel_for(0, groups, 1, [&](int64_t q0, int64_t q1) {
    const int tid = at::get_thread_num();
    float* dhp = dh.data_ptr<float>();
    if (tid != 0) {
      private_dh[tid] = at::zeros_like(dh);
      dhp = private_dh[tid].data_ptr<float>();
    }
    std::vector<float> z(rt * g), acc(g * ldacc);
    std::vector<at::BFloat16> za(rt * g), zt(g * rt);
    alignas(64) float tmp[16 * 16];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t g0 = q * g, gc = std::min(g, c - g0), k2 = (gc + 1) / 2 * 2;
      for (int64_t r0 = 0; r0 < r; r0 += rt) {
        const int64_t mb = std::min(rt, r - r0), mb16 = (mb + 15) / 16 * 16;
        for (int64_t j = 0; j < gc; j += kTile)
          at::native::cpublas::brgemm(mb, kTile, d, ldh, kTile, g, false, hp + r0 * ldh,
                                      wp + (g0 + j) / kTile * d * kTile, z.data() + j, true);
        for (int64_t i = 0; i < mb; ++i) {
          const int64_t row = r0 + i;
          float* zr = z.data() + i * g;
          // dz in bf16 row-major [mb, G] (dh's A) and in float32 in place (for the transpose)
          at::BFloat16* zb = za.data() + i * g;
          dz_row(zr, gc, c0 + g0, sc, yp[row], lp[row], ap[row], bp[row], gp[row], os, zr, zb);
          for (int64_t j = gc; j < k2; ++j) zr[j] = 0.f, zb[j] = c10::BFloat16(0.f);
        }
        for (int64_t i = mb; i < mb16; ++i) std::memset(z.data() + i * g, 0, g * sizeof(float));
        // dz transposed, [G, rt] in bf16 (dw's A)
        for (int64_t i0 = 0; i0 < mb16; i0 += 16)
          for (int64_t j0 = 0; j0 < gc; j0 += 16) {
#if defined(__AVX512F__)
            transpose16(reinterpret_cast<const uint32_t*>(z.data() + i0 * g + j0), g,
                        reinterpret_cast<uint32_t*>(tmp), 16);
            for (int64_t j = 0; j < 16; ++j)
              _mm256_storeu_si256((__m256i*)(zt.data() + (j0 + j) * rt + i0),
                                  to_bf16(_mm512_load_ps(tmp + j * 16)));
#else
            for (int64_t j = 0; j < 16; ++j)
              for (int64_t i = 0; i < 16; ++i)
                zt[(j0 + j) * rt + i0 + i] = c10::BFloat16(z[(i0 + i) * g + j0 + j]);
#endif
          }
        const int64_t kr = (mb + 1) / 2 * 2;   // dw's K: rows, even (zero-padded)
        for (int64_t dt = 0; dt < d / kTile; ++dt)   // same-shaped calls back to back
          at::native::cpublas::brgemm(mb, kTile, k2, g, kTile, d, true, za.data(),
                                      wk + dt * c2 * kTile + g0 * kTile,
                                      dhp + r0 * d + dt * kTile, true);
        for (int64_t dt = 0; dt < d / kTile; ++dt)
          at::native::cpublas::brgemm(gc, kTile, kr, rt, kTile, ldacc, r0 > 0, zt.data(),
                                      hk + dt * r2 * kTile + r0 * kTile, acc.data() + dt * kTile,
                                      true);
      }
      // this group's dw rows are complete: round them to bf16 once
      if (r == 0) std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < std::min(gc, cw - g0); ++i) {
        const float* src = acc.data() + i * ldacc;
        at::BFloat16* o = dwp + (g0 + i) * ldw;
        int64_t j = 0;
#if defined(__AVX512F__)
        for (; j + 16 <= d; j += 16)
          _mm256_storeu_si256((__m256i*)(o + j), to_bf16(_mm512_loadu_ps(src + j)));
#endif
        for (; j < d; ++j) o[j] = c10::BFloat16(src[j]);
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  for (int t = 1; t < nthreads; ++t)
    if (private_dh[t].defined()) dh.add_(private_dh[t]);
}

// ------------------------------------------------------------------------------ float32 blocks

// Online row statistics of a float32 block of raw logits whose vocabulary starts at column c0
// (stats_row on every row).
void row_stats_(const at::Tensor& raw, const at::Tensor& y, int64_t c0, double scale,
                at::Tensor& m, at::Tensor& s, at::Tensor& t, at::Tensor& zy, bool store_exp) {
  check_block(raw, "row_stats_");
  const int64_t r = raw.size(0), c = raw.size(1), ld = raw.stride(0);
  check_vec(y, r, at::kLong, "row_stats_ y");
  for (auto* x : {&m, &s, &t, &zy}) check_vec(*x, r, at::kFloat, "row_stats_ state");
  float* zp = raw.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>(), *tp = t.data_ptr<float>(),
        *yz = zy.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  for (int64_t i = 0; store_exp && i < r; ++i)   // e = exp(z - max) needs the row's final max
    TORCH_CHECK(mp[i] == -std::numeric_limits<float>::infinity(),
                "row_stats_: store_exp takes whole rows (a fresh state)");
  at::parallel_for(0, r, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      stats_row(zp + i * ld, c, c0, sc, yp[i], mp[i], sp[i], tp[i], yz[i],
                store_exp ? zp + i * ld : nullptr);
  });
}

// dL/dz (dz_row on every row) of a float32 block of raw logits into `out`: `raw` itself
// (float32, in place) or a bf16 block of the same shape.
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
  at::parallel_for(0, r, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      dz_row(zp + i * ld, c, c0, sc, yp[i], lp[i], ap[i], bp[i], gp[i], os,
             bf16 ? nullptr : out.data_ptr<float>() + i * ldo,
             bf16 ? out.data_ptr<at::BFloat16>() + i * ldo : nullptr);
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
  mod.def("pack_bf16", &pack_bf16, py::arg("w"), py::arg("buf") = py::none());
  mod.def("logits_bf16", &logits_bf16);
  mod.def("stats_bf16_", &stats_bf16_);
  mod.def("grad_bf16", &grad_bf16);
  mod.def("pack_kn", &pack_kn, py::arg("x"), py::arg("buf") = py::none());
  mod.def("grad_gemms_bf16", &grad_gemms_bf16);
  mod.def("row_stats_", &row_stats_, py::arg("raw"), py::arg("y"), py::arg("c0"),
          py::arg("scale"), py::arg("m"), py::arg("s"), py::arg("t"), py::arg("zy"),
          py::arg("store_exp") = false);
  mod.def("grad_logits", &grad_logits);
  mod.def("add_bf16_", &add_bf16_);
}
