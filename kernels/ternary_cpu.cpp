// Ternary (BitNet b1.58) matrix-vector product on the 2-bit packed codes, for decode on the CPU.
//
// codes c in {-1, 0, +1} are stored as u = c + 1 in 2 bits, code k of a row at bits 2 * (k % 4) of byte k / 4
// (kernels/ternary.py, format "2bit"); activations are int8 per token.  sum_k c_k x_k = sum_k u_k x_k - sum_k x_k:
// the unsigned 2-bit fields times the signed activations is what AVX-512 VNNI's vpdpbusd multiplies (u8 x s8,
// four products summed per int32 lane), and sum_k x_k is one number per token.  The activations are split into
// four planes once per token (plane j holds x[4 i + j]), so that field j of packed byte i meets plane j's byte i.
// Integer arithmetic throughout: the result equals torch._int_mm on the unpacked int8 codes exactly.
// Without AVX-512 VNNI/BW the portable loop computes the same sums.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QB_TERNARY_VNNI 1
#endif

namespace {

// one output: sum over the row's kp packed bytes of u(field j of byte i) * planes[j][i]
inline int32_t row_dot(const uint8_t* w, const int8_t* planes, int64_t kp) {
#ifdef QB_TERNARY_VNNI
  const __m512i m3 = _mm512_set1_epi8(3);
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i < kp; i += 64) {
    const int64_t left = kp - i;
    const __mmask64 m = left >= 64 ? ~0ULL : ((1ULL << left) - 1);
    const __m512i b = _mm512_maskz_loadu_epi8(m, w + i);
    for (int j = 0; j < 4; ++j) {
      const __m512i u = _mm512_and_si512(_mm512_srli_epi16(b, 2 * j), m3);
      const __m512i x = _mm512_maskz_loadu_epi8(m, planes + j * kp + i);
      acc = _mm512_dpbusd_epi32(acc, u, x);
    }
  }
  return _mm512_reduce_add_epi32(acc);
#else
  int32_t acc = 0;
  for (int64_t i = 0; i < kp; ++i) {
    const int32_t b = w[i];
    for (int j = 0; j < 4; ++j) acc += ((b >> (2 * j)) & 3) * static_cast<int32_t>(planes[j * kp + i]);
  }
  return acc;
#endif
}

}  // namespace

// xq int8 [M, K] (K <= 4 * kp; missing columns count as 0), packed uint8 [N, kp] -> int32 [M, N]
at::Tensor ternary_mm_2bit(const at::Tensor& xq, const at::Tensor& packed) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar, "ternary_mm_2bit: xq must be int8 [M, K]");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte, "ternary_mm_2bit: packed must be uint8 [N, K/4]");
  TORCH_CHECK(xq.device().is_cpu() && packed.device().is_cpu(), "ternary_mm_2bit: CPU tensors only");
  const int64_t M = xq.size(0), K = xq.size(1), N = packed.size(0), kp = packed.size(1);
  TORCH_CHECK(K <= 4 * kp && K > 4 * (kp - 1), "ternary_mm_2bit: ", K, " activations for rows of ", kp, " packed bytes");
  auto x = xq.contiguous();
  auto w = packed.contiguous();
  auto out = at::empty({M, N}, xq.options().dtype(at::kInt));
  const int8_t* xp = x.data_ptr<int8_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  std::vector<int8_t> planes(static_cast<size_t>(M * 4 * kp), 0);
  std::vector<int32_t> sums(static_cast<size_t>(M), 0);
  for (int64_t r = 0; r < M; ++r) {
    int8_t* pl = planes.data() + r * 4 * kp;
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) {
      pl[(k % 4) * kp + k / 4] = xp[r * K + k];
      s += xp[r * K + k];
    }
    sums[r] = s;
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = wp + n * kp;
      for (int64_t r = 0; r < M; ++r) op[r * N + n] = row_dot(row, planes.data() + r * 4 * kp, kp) - sums[r];
    }
  });
  return out;
}

// an operator namespace per build (QB_TERNARY_NS, set by the loader): two builds never clash in one process; a CPU
// kernel (not a composite one), so that torch.compile traces it through the shape function the loader registers
TORCH_LIBRARY(QB_TERNARY_NS, m) { m.def("ternary_mm_2bit(Tensor xq, Tensor packed) -> Tensor"); }
TORCH_LIBRARY_IMPL(QB_TERNARY_NS, CPU, m) { m.impl("ternary_mm_2bit", &ternary_mm_2bit); }
