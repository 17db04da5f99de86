// Hand-written CPU kernels for the few-row products of decoding with the GGUF file's own weights, and for two
// pieces of the QLoRA training step: dropout's keep mask and the causal attention's softmax
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

#include <cmath>
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

// e^x for x <= 0 in fp32 (relative error ~1e-7 above the underflow, 0 below -87.3): x log2(e) = k + f with
// f in [-1/2, 1/2], 2^f by its Taylor polynomial of degree 6, times 2^k by vscalefps.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(1.44269504088896f));
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);             // (ln 2)^6 / 6!, then down to 1
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428441e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022650695910071f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718055994531f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {        // 16 bf16 (masked lanes 0) -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// Softmax of a block of causal attention scores (model.causal_attention_by_blocks): scores (..., n*g, end) bf16,
// rows ordered (query, head) for n queries of g heads each, the queries' own keys the last n. Row r sees the keys up
// to end - n + r / g; the rest get probability 0, with no mask added first. fp32 inside, rounded once to bf16.
at::Tensor causal_softmax(const at::Tensor& scores, int64_t n, int64_t g) {
  TORCH_CHECK(scores.scalar_type() == at::kBFloat16 && scores.is_contiguous() && scores.dim() >= 2,
              "causal_softmax: scores must be contiguous bf16 (..., n*g, end)");
  const int64_t end = scores.size(-1), rows_per_block = scores.size(-2), rows = scores.numel() / end;
  TORCH_CHECK(rows_per_block == n * g && n <= end, "causal_softmax: scores must have n*g rows of at least n keys");
  at::Tensor probs = at::empty_like(scores);
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scores.data_ptr());
  uint16_t* pp = reinterpret_cast<uint16_t*>(probs.data_ptr());
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> e(end);
    for (int64_t r = r0; r < r1; r++) {
      const uint16_t* row = sp + r * end;
      uint16_t* out = pp + r * end;
      const int64_t seen = end - n + (r % rows_per_block) / g + 1;  // keys this row may attend to
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < seen; j += 16) {
        const __mmask16 m = lanes(seen - j);
        mx = _mm512_mask_max_ps(mx, m, mx, load_bf16(row + j, m));
      }
      const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < seen; j += 16) {
        const __mmask16 m = lanes(seen - j);
        const __m512 x = exp_nonpositive(_mm512_sub_ps(load_bf16(row + j, m), top));
        sum = _mm512_mask_add_ps(sum, m, sum, x);
        _mm512_mask_storeu_ps(e.data() + j, m, x);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
      for (int64_t j = 0; j < end; j += 16) {
        const __mmask16 m = lanes(end - j);
        const __mmask16 kept = j < seen ? lanes(seen - j) : __mmask16(0);
        const __m512 x = _mm512_maskz_mul_ps(kept, _mm512_maskz_loadu_ps(kept, e.data() + j), inv);
        _mm256_mask_storeu_epi16(out + j, m, (__m256i)_mm512_cvtneps_pbh(x));
      }
    }
  });
  return probs;
}

// Dropout's keep mask for LoRA training (the bits of lora.hashed_keep): element i is dropped when the low 16 bits
// of fmix32(i * 0x9E3779B1 + seed) fall below `drop`. Plain C++ that g++ vectorizes with unsigned 32-bit
// arithmetic; the same hash in PyTorch's int32 ops, fused by inductor, costs ~6x as much per element.
at::Tensor keep_mask(int64_t n, int64_t seed, int64_t drop) {
  TORCH_CHECK(n >= 0 && n <= (int64_t(1) << 32), "keep_mask: n must fit in 32 bits");
  at::Tensor keep = at::empty({n}, at::TensorOptions().dtype(at::kChar));
  int8_t* kp = keep.data_ptr<int8_t>();
  const uint32_t s = uint32_t(seed), t = uint32_t(drop);
  at::parallel_for(0, n, 1 << 16, [kp, s, t](int64_t i0, int64_t i1) {   // by value: no aliasing for g++
    int8_t* out = kp + i0;
    const uint32_t first = uint32_t(i0);
    for (int64_t j = 0; j < i1 - i0; j++) {            // this form g++ vectorizes (64-byte vectors)
      uint32_t h = (first + uint32_t(j)) * 0x9E3779B1u + s;
      h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
      out[j] = (h & 0xFFFFu) >= t;
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY(genpi_cpu, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor dm) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor codes, Tensor d) -> Tensor");
  m.def("keep_mask(int n, int seed, int drop) -> Tensor");
  m.def("causal_softmax(Tensor scores, int n, int g) -> Tensor");
}
TORCH_LIBRARY_IMPL(genpi_cpu, CPU, m) {
  m.impl("q4_linear", q4_linear);
  m.impl("q8_linear", q8_linear);
  m.impl("causal_softmax", causal_softmax);
}
TORCH_LIBRARY_IMPL(genpi_cpu, CompositeExplicitAutograd, m) {   // no tensor input to dispatch on
  m.impl("keep_mask", keep_mask);
}

#endif
