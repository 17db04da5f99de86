// Hand-written CPU kernels for the few-row products of decoding with the GGUF file's own weights
// (AVX-512 with BF16; built and loaded by cpu_kernels.py, which falls back to PyTorch's kernels elsewhere).
//
// A decoding step at batch 1 reads every weight once for one row of activations: it is bound by how fast
// the weights stream in. PyTorch's 4-bit CPU kernel decodes ~18 G weights/s per core here, under the
// memory's rate; these kernels read the file's codes as they are stored:
//   q4_linear: Q4_1 blocks of 32 weights, w = d * code + m (code in 0..15; d, m fp16)
//   q8_linear: Q8_0 blocks of 32 weights, w = d * code (code in -128..127; d fp16), the tied LM head
// Both compute y (M, out) = x (M, in) @ W^T with fp32 sums of the exact products, rounded once to bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)

namespace {

inline uint16_t float_to_bf16(float f) {                         // round to nearest even
  uint32_t u; std::memcpy(&u, &f, 4); return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// The Q4_1 codes as bf16 without a lookup: 0x4300 | code is the bf16 of 128 + code (exact), so
// x . (128 + code) = x . code + 128 sum(x); the 128 sum(x) is taken back with the block's m term.
// A 16-bit lane of the codes holds bytes 2p, 2p+1 of a block: codes 2p, 2p+16 (low, high nibble of
// byte 2p), 2p+1, 2p+17. Shifting the lane by 0, 4, 8, 12 puts each in the low nibble: four vectors of
// bf16, whose matching x is arranged once per call (arrange_x).
inline void q4_to_bf16(__m512i v, __m512i w[4]) {
  const __m512i low = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  w[0] = _mm512_ternarylogic_epi32(v, low, bias, 0xEA);                       // (a & b) | c
  w[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low, bias, 0xEA);
  w[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low, bias, 0xEA);
  w[3] = _mm512_or_si512(_mm512_srli_epi16(v, 12), bias);
}
inline void q4_to_bf16(__m256i v, __m256i w[4]) {                             // the same for 2 blocks
  const __m256i low = _mm256_set1_epi16(0x000F), bias = _mm256_set1_epi16(0x4300);
  w[0] = _mm256_ternarylogic_epi32(v, low, bias, 0xEA);
  w[1] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(v, 4), low, bias, 0xEA);
  w[2] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(v, 8), low, bias, 0xEA);
  w[3] = _mm256_or_si256(_mm256_srli_epi16(v, 12), bias);
}

// x (M, in) bf16 -> the order q4_to_bf16's vectors take, per group of 4 blocks (2 in a last group of 64
// inputs): vector k of a group holds, for each of its blocks, the 8 elements 2p + {0, 16, 1, 17}[k];
// and each block's sum of x (fp32).
void arrange_x(const uint16_t* x, int64_t M, int64_t in, uint16_t* xr, float* xsum) {
  const int64_t nb = in / 32, full = in / 128;
  static const int kOffset[4] = {0, 16, 1, 17};
  for (int64_t r = 0; r < M; r++)
    for (int64_t b = 0; b < nb; b++) {
      const int64_t len = (b / 4 < full) ? 32 : 16;             // one vector's length in this group
      const uint16_t* src = x + r * in + b * 32;
      uint16_t* dst = xr + r * in + (b / 4) * 128 + (b % 4) * 8;
      for (int k = 0; k < 4; k++)
        for (int p = 0; p < 8; p++) dst[k * len + p] = src[2 * p + kOffset[k]];
      __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)src)), 16));
      __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + 16))), 16));
      xsum[r * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
}

// rows [r0, r0 + R) of y for output o: sum over blocks of d (x . (128 + code)) + (m - 128 d) sum(x)
template <int R>
void q4_row(const uint8_t* codes, const uint16_t* d16, const uint16_t* m16, const uint16_t* xr, const float* xsum,
            int64_t in, int64_t r0, int64_t out, int64_t o, uint16_t* y) {
  const int64_t nb = in / 32, full = in / 128;
  // each group's 4 scales d to 16 lanes: the dot products' lanes 4j..4j+3 hold block j's sums
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < full; g++) {
    __m512i w[4];
    q4_to_bf16(_mm512_loadu_si512(codes + g * 64), w);
    const __m512 d = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(d16 + g * 4)))));
    for (int r = 0; r < R; r++) {
      const uint16_t* xg = xr + (r0 + r) * in + g * 128;
      __m512 s0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[0], (__m512bh)_mm512_loadu_si512(xg));
      __m512 s1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[1], (__m512bh)_mm512_loadu_si512(xg + 32));
      s0 = _mm512_dpbf16_ps(s0, (__m512bh)w[2], (__m512bh)_mm512_loadu_si512(xg + 64));
      s1 = _mm512_dpbf16_ps(s1, (__m512bh)w[3], (__m512bh)_mm512_loadu_si512(xg + 96));
      acc[r] = _mm512_fmadd_ps(_mm512_add_ps(s0, s1), d, acc[r]);
    }
  }
  if (in % 128) {                                                 // a last group of 2 blocks
    __m256i w[4];
    q4_to_bf16(_mm256_loadu_si256((const __m256i*)(codes + full * 64)), w);
    const __m256 d = _mm256_permutexvar_ps(_mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0),
        _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t*)(d16 + full * 4)))));
    for (int r = 0; r < R; r++) {
      const uint16_t* xg = xr + (r0 + r) * in + full * 128;
      __m256 s = _mm256_setzero_ps();
      for (int k = 0; k < 4; k++) s = _mm256_dpbf16_ps(s, (__m256bh)w[k], (__m256bh)_mm256_loadu_si256((const __m256i*)(xg + 16 * k)));
      acc[r] = _mm512_add_ps(acc[r], _mm512_castps256_ps512(_mm256_mul_ps(s, d)));
    }
  }
  for (int r = 0; r < R; r++) {                                   // + the m terms, 16 blocks at a time
    const float* xs = xsum + (r0 + r) * nb;
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 valid = nb - b >= 16 ? 0xFFFF : __mmask16((1u << (nb - b)) - 1);
      const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, d16 + b));
      const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, m16 + b));
      acc[r] = _mm512_fmadd_ps(_mm512_fmadd_ps(d, _mm512_set1_ps(-128.f), m), _mm512_maskz_loadu_ps(valid, xs + b), acc[r]);
    }
    y[(r0 + r) * out + o] = float_to_bf16(_mm512_reduce_add_ps(acc[r]));
  }
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& dm) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "q4_linear: x must be (rows, in) bf16");
  const int64_t M = x.size(0), in = x.size(1), out = codes.size(0), nb = in / 32;
  TORCH_CHECK(in % 64 == 0 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(1) == in / 2,
              "q4_linear: codes must be contiguous (out, in/2) uint8, in a multiple of 64");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 3 && dm.size(0) == out &&
              dm.size(1) == 2 && dm.size(2) == nb, "q4_linear: dm must be contiguous (out, 2, in/32) fp16");
  const at::Tensor xc = x.contiguous();
  std::vector<uint16_t> xr(M * in);
  std::vector<float> xsum(M * nb);
  arrange_x(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, in, xr.data(), xsum.data());
  at::Tensor y = at::empty({M, out}, x.options());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dm.data_ptr());
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++) {
      const uint8_t* c = cp + o * (in / 2);
      const uint16_t* d16 = dp + o * 2 * nb;
      int64_t r = 0;                                            // rows by 4, then 2, then 1
      for (; r + 4 <= M; r += 4) q4_row<4>(c, d16, d16 + nb, xr.data(), xsum.data(), in, r, out, o, yp);
      for (; r + 2 <= M; r += 2) q4_row<2>(c, d16, d16 + nb, xr.data(), xsum.data(), in, r, out, o, yp);
      for (; r < M; r++) q4_row<1>(c, d16, d16 + nb, xr.data(), xsum.data(), in, r, out, o, yp);
    }
  });
  return y;
}

// rows [r0, r0 + R) of y for output o of the Q8_0 product: x in fp32, codes widened to fp32
template <int R>
void q8_row(const int8_t* codes, const uint16_t* d16, const float* xf, int64_t in, int64_t r0, int64_t out,
            int64_t o, uint16_t* y) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < in / 32; b++) {
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(codes + b * 32))));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(codes + b * 32 + 16))));
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(d16[b]));
    for (int r = 0; r < R; r++) {
      const float* xb = xf + (r0 + r) * in + b * 32;
      acc[r] = _mm512_fmadd_ps(_mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb))), d, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) y[(r0 + r) * out + o] = float_to_bf16(_mm512_reduce_add_ps(acc[r]));
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "q8_linear: x must be (rows, in) bf16");
  const int64_t M = x.size(0), in = x.size(1), out = codes.size(0);
  TORCH_CHECK(in % 32 == 0 && codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.size(1) == in,
              "q8_linear: codes must be contiguous (out, in) int8, in a multiple of 32");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(0) == out && d.size(1) == in / 32,
              "q8_linear: d must be contiguous (out, in/32) fp16");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, out}, x.options());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int8_t* cp = codes.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++) {
      int64_t r = 0;
      for (; r + 4 <= M; r += 4) q8_row<4>(cp + o * in, dp + o * (in / 32), xp, in, r, out, o, yp);
      for (; r + 2 <= M; r += 2) q8_row<2>(cp + o * in, dp + o * (in / 32), xp, in, r, out, o, yp);
      for (; r < M; r++) q8_row<1>(cp + o * in, dp + o * (in / 32), xp, in, r, out, o, yp);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(genpi_cpu, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor dm) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor codes, Tensor d) -> Tensor");
}
TORCH_LIBRARY_IMPL(genpi_cpu, CPU, m) {
  m.impl("q4_linear", q4_linear);
  m.impl("q8_linear", q8_linear);
}

#endif
