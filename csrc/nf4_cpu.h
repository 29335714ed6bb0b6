// NF4 (bitsandbytes layout) quantize / dequantize on the host. Pointers are to contiguous memory.
#pragma once
#include <cstdint>

namespace fastft {

// Element types of the float side, as the Python wrapper passes them.
enum FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x[n] (dtype) -> packed[(n + 1) / 2] (two codes a byte, even element in the high nibble), absmax[ceil(n / blocksize)].
void nf4_quantize_cpu(const void* x, int dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax);

// packed + fp32 absmax -> out[n] in dtype: code[nibble] * absmax[block], rounded once.
void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, void* out,
                        int dtype);

}  // namespace fastft
