// Decode-time NF4 GEMV / small-batch GEMM on CUDA:  y[b, n] = sum_k x[b, k] * W[n, k] (+ bias[n]).
// Host-side declarations only (no CUDA headers), so the pybind11 bindings compile with the C++ compiler.
#pragma once
#include <cstdint>

namespace fastft {

struct Nf4GemvArgs {
  const void* x;            // [batch, k] bf16 or fp16, row stride ldx elements, unit column stride
  int64_t ldx;
  const uint8_t* packed;    // W [n, k] in bitsandbytes NF4 layout, 16-byte aligned
  const void* absmax;       // fp32 [blocks], or uint8 codes when absmax2 != nullptr (double quantization)
  const float* absmax2;     // nested fp32 absmax [ceil(blocks / nested_blocksize)] or nullptr
  const float* code2;       // nested 256-entry code table or nullptr
  float offset;             // nested mean offset
  int nested_blocksize;     // a power of two
  const void* bias;         // [n] in x's dtype, or nullptr
  void* y;                  // [batch, n] in x's dtype, row stride ldy
  int64_t ldy;
  int batch;                // 1..16
  int64_t n;
  int64_t k;                // a multiple of 32
  int blocksize;            // a power of two >= 32
  int dtype;                // 1 = fp16, 2 = bf16 (fastft::FloatType)
  int variant;              // 0: scaled decode; 1: byte table (blocksize >= 64, k % 64 == 0); 2, 3: byte table,
                            // lean loop (as 1, bit-identical results); 4, 5: 3 with K split over 4 or 2 warps
                            // (nf4_gemv.cu)
};

// 0 on success, else an error code for nf4_gemv_error_string.
int nf4_gemv_launch(const Nf4GemvArgs& args, void* stream);
const char* nf4_gemv_error_string(int code);

}  // namespace fastft
