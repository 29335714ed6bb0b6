// NF4 quantize / dequantize on the host (OpenMP), bit-compatible with bitsandbytes' NF4 layout.
// Used when a checkpoint is quantized while it loads: one pass over the weight, no float temporaries.
//
// The float operations copy bitsandbytes' reference exactly (see fastft/quant/nf4_format.py):
// full blocks scale by a reciprocal (x * (1/absmax)), the short tail block divides (x / absmax), absmax is
// clamped to 1e-38 before either (and the tail block stores the clamped value), codes are the count of
// fp32 midpoints strictly below the scaled value. fp16/bf16 are widened exactly, results rounded to nearest-even.
#include "nf4_cpu.h"
#include "nf4_codes.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace fastft {
namespace {

constexpr float kNF4Code[16] = FASTFT_NF4_CODE_VALUES;  // csrc/nf4_codes.h
constexpr float kTiny = 1e-38f;  // bitsandbytes' clamp before the reciprocal

struct Midpoints {
  float m[15];
  Midpoints() {
    for (int i = 0; i < 15; ++i) m[i] = (kNF4Code[i] + kNF4Code[i + 1]) / 2.0f;
  }
};
const Midpoints kMid;

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (man << 13));  // inf / nan
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_bf16(float f) {
  const uint32_t b = float_to_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);  // quiet nan
  const uint32_t rounded = b + 0x7FFFu + ((b >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(rounded >> 16);
}

inline uint16_t float_to_fp16(float f) {
  const uint32_t b = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t abs = b & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u;        // nan
  if (abs >= 0x477FF000u) return sign | 0x7C00u;       // rounds past 65504: inf
  if (abs < 0x38800000u) {                             // below 2^-14: fp16 subnormal or zero
    if (abs < 0x33000000u) return sign;                // below half the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t man = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;                 // value / 2^-24 = man * 2^(exp - 126)
    const uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return sign | static_cast<uint16_t>(r);
  }
  const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);  // nearest-even on the 13 dropped bits
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

inline float load_as_float(const void* x, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(x)[i];
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(x)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
  }
}

inline void store_from_float(void* out, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat32: static_cast<float*>(out)[i] = v; break;
    case kFloat16: static_cast<uint16_t*>(out)[i] = float_to_fp16(v); break;
    default: static_cast<uint16_t*>(out)[i] = float_to_bf16(v); break;
  }
}

inline uint8_t nf4_index(float scaled) {
  uint8_t q = 0;
  for (int i = 0; i < 15; ++i) q += kMid.m[i] < scaled ? 1 : 0;
  return q;
}

inline float clamp1(float v) { return std::min(1.0f, std::max(-1.0f, v)); }

}  // namespace

void nf4_quantize_cpu(const void* x, int dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  if (n <= 0) return;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    const bool tail = end - start < blocksize;
    float am = 0.0f;
    for (int64_t i = start; i < end; ++i) am = std::max(am, std::fabs(load_as_float(x, dtype, i)));
    const float clamped = std::max(am, kTiny);
    absmax[b] = tail ? clamped : am;
    const float inv = 1.0f / clamped;
    // blocksize is even, so a block starts on a byte; only the very last element can be unpaired.
    for (int64_t i = start; i < end; i += 2) {
      const float v0 = load_as_float(x, dtype, i);
      const uint8_t q0 = nf4_index(clamp1(tail ? v0 / clamped : v0 * inv));
      uint8_t q1 = 7;  // an odd numel pads the last low nibble with the zero code
      if (i + 1 < end) {
        const float v1 = load_as_float(x, dtype, i + 1);
        q1 = nf4_index(clamp1(tail ? v1 / clamped : v1 * inv));
      }
      packed[i / 2] = static_cast<uint8_t>((q0 << 4) | q1);
    }
  }
}

void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, void* out,
                        int dtype) {
  if (n <= 0) return;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(n, start + blocksize);
    const float scale = absmax[b];
    for (int64_t i = start; i < end; i += 2) {
      const uint8_t byte = packed[i / 2];
      store_from_float(out, dtype, i, kNF4Code[byte >> 4] * scale);
      if (i + 1 < end) store_from_float(out, dtype, i + 1, kNF4Code[byte & 0xF] * scale);
    }
  }
}

}  // namespace fastft
