// Decode-time NF4 GEMV / small-batch GEMM:  y[b, n] = sum_k x[b, k] * W[n, k] (+ bias[n]),  batch 1..16.
//
// Memory-bound: W is read once, 0.5 byte an element plus its scales. Each warp owns 16 rows of W and walks K in
// steps of 128; the eight warps of a block split K between them and add their partial sums at the end. The
// dequantized W goes straight into tensor-core MMAs (m16n8k16, W as the 16-row A operand, the batch as the
// 8-column B operand), so the batch dimension costs no extra arithmetic and batch 16 reads W exactly once.
//
// K is permuted inside each 128-wide step (the reduction does not care about its order, only that W and x use
// the same one): lane (g, t) loads 16 contiguous bytes (32 elements) of rows g and g+8 at k = 32t, and the
// MMA of sub-step j takes elements 32t + 4j + {0..3} as the fragment's k = {2t, 2t+1, 2t+8, 2t+9}. Then
// each lane's W and x loads are single 16-byte vectors, and the 32 elements share one absmax (blocksize >= 32).
// Dequantized values are code[nibble] * absmax in fp32, rounded once (bit-identical to bitsandbytes); a
// double-quantized absmax is code2[q] * absmax2 + offset with both operations rounded (no fused multiply-add).
//
// Variant 1, the table kernel (blocksize >= 64, k % 64 == 0), spends fewer instructions an element: the scaled
// decode above costs ~5.5 a W element (shift, mask, address, shared load, multiply, half a convert; 497 SASS
// instructions a warp step on sm_90, 333 here), which caps the GEMV well under the HBM bandwidth. Here the
// absmax leaves the inner loop: each half-step of 64 columns lies in one absmax block, lane (g, t) loads 8 bytes
// of rows g and g+8 at k = 16t of each half, one 32-bit lookup per W byte reads both values of that byte (unscaled
// codes in T, a 256-entry table), the MMAs of a half-step accumulate apart, and the absmax scales that sum
// once (4 multiply-adds per half-step). The table is kept in 32 copies, one per shared-memory bank, so that
// random bytes never conflict. The codes are rounded to T once instead of the products (as bitsandbytes' own
// GEMV does, and fastft's Triton PRMT decode), so the two variants differ in rounding; which one runs is chosen
// by measurement (fastft/kernels/nf4_cuda.py), after a check that they agree.
//
// Variant 2, TABLE_LEAN, is the table kernel with a leaner steady loop and the same arithmetic, bit for bit (the
// same MMAs in the same order, the same absmax scaling): a W byte costs a shift, a mask-and-or and a shared load
// (its table entry's byte offset, lane included, from one SHF and one LOP3: 3 instructions instead of 5), and a
// step's loads have no row, k or batch bounds checks and come from pointers advanced by a constant each step
// (~160 SASS instructions a warp step on sm_90, 166 with a nested absmax; the table kernel's 326). It runs where
// k % 128 == 0 and batch <= 8, for blocks whose 16 rows all exist; the last block of a ragged n runs the table
// kernel's loop, and a launch with k % 128 != 0 or batch > 8 is the table kernel's (launch_lean). Not yet in the
// measured choice.
//
// Variant 3, TABLE_DEEP, is TABLE_LEAN with a ring of 4 fragments a warp: three steps' loads in flight while one
// computes (the other kernels: one), at 96 registers, 2 blocks an SM instead of 3: 48 KB of W in flight an SM
// instead of 24. On the H200 the table kernel reads 23% of HBM at ~55% issue: too few bytes in flight is the
// suspect (4.8 TB/s at ~1 µs of latency wants ~36 KB an SM). Bit-identical to TABLE.
//
// Variants 4 and 5, TABLE_DEEP_K4 and TABLE_DEEP_K2, are TABLE_DEEP with K split over 4 or 2 warps instead of 8: a
// block's warps take 2 or 4 groups of 16 rows (blocks of 32 or 64 rows), each warp walks 4 or 2 times as many steps.
// On the H100 (2026-12-05, ncu) TABLE at 4096->14336 batch 1 ran 896 blocks of 4 steps a warp, 2.26 waves: each
// warp's pipeline never filled (one step in flight, four steps in all, the prologue's 32 KB table fill each time)
// and the third wave was 26% full. With K split over 2 the same shape is 224 blocks, every one resident at once,
// 16 steps a warp with three in flight, and the table filled a quarter as often. The same MMAs per step; the warps'
// partial sums add in another grouping, so not bit-identical to TABLE (within its rounding). Candidates, forced
// only.
#include "nf4_gemv.h"
#include "../nf4_codes.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <climits>
#include <string>

namespace fastft {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerBlock = 16;
constexpr int kStepK = 128;
constexpr int kHalfK = 64;          // the table kernel's half-step: inside one absmax block
constexpr int kTableCopies = 32;    // one copy of the byte table per shared-memory bank
static_assert(kWarps * 32 == 256, "one thread per entry of the 256-entry nested code table");

__constant__ float kNF4Code[16] = FASTFT_NF4_CODE_VALUES;  // csrc/nf4_codes.h

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

// W is streamed once: read-only path, no L1 allocation.
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 load_stream8(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// One warp step's operands: 16 bytes of W for rows g and g+8, their absmax (or its 8-bit code and the nested
// absmax: the code-table lookup waits for compute_step, so no load in load_step depends on another load),
// 32 x-elements per batch tile.
template <int NT>
struct Fragment {
  uint4 w[2];
  float scale[2];   // the absmax, or the nested absmax2 when double-quantized
  uint32_t code[2]; // the absmax's 8-bit code when double-quantized
  uint4 x[NT][4];
};

template <int NT>
__device__ __forceinline__ void load_step(Fragment<NT>& f, const Nf4GemvArgs& p, int64_t step, int g, int t,
                                          int64_t row0, int bs_shift, int nbs_shift) {
  const int64_t k0 = step * kStepK + t * 32;
  const bool k_ok = k0 < p.k;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = row0 + g + 8 * h;
    f.w[h] = make_uint4(0u, 0u, 0u, 0u);
    f.scale[h] = 0.0f;
    f.code[h] = 0u;
    if (k_ok && row < p.n) {
      const int64_t flat = row * p.k + k0;
      f.w[h] = load_stream(p.packed + flat / 2);
      const int64_t block = flat >> bs_shift;
      if (p.absmax2 != nullptr) {
        f.code[h] = __ldg(static_cast<const uint8_t*>(p.absmax) + block);
        f.scale[h] = __ldg(p.absmax2 + (block >> nbs_shift));
      } else {
        f.scale[h] = __ldg(static_cast<const float*>(p.absmax) + block);
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int b = g + 8 * nt;
#pragma unroll
    for (int i = 0; i < 4; ++i) f.x[nt][i] = make_uint4(0u, 0u, 0u, 0u);
    if (k_ok && b < p.batch) {
      const uint4* xp = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.x) + b * p.ldx + k0);
#pragma unroll
      for (int i = 0; i < 4; ++i) f.x[nt][i] = __ldg(xp + i);
    }
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// nested: the block's absmax is code2[q] * absmax2 + offset, both operations rounded (no fused multiply-add)
template <typename T, int NT>
__device__ __forceinline__ void compute_step(float (&acc)[NT][4], const Fragment<NT>& f, const float* code,
                                             const float* code2, bool nested, float offset) {
  float scale[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    scale[h] = nested ? __fadd_rn(__fmul_rn(code2[f.code[h]], f.scale[h]), offset) : f.scale[h];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    uint32_t a[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // bytes 2j and 2j+1 of this row's 16: elements 4j, 4j+1 (byte 2j) and 4j+2, 4j+3 (byte 2j+1)
      const uint32_t word = word_of(f.w[h], j >> 1) >> (16 * (j & 1));
      const uint32_t b_lo = word & 0xFFu, b_hi = (word >> 8) & 0xFFu;
      const float s = scale[h];
      a[h] = Mma<T>::pack(code[b_lo >> 4] * s, code[b_lo & 0xFu] * s);
      a[2 + h] = Mma<T>::pack(code[b_hi >> 4] * s, code[b_hi & 0xFu] * s);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      Mma<T>::run(acc[nt], a, word_of(f.x[nt][j >> 1], 2 * (j & 1)), word_of(f.x[nt][j >> 1], 2 * (j & 1) + 1));
    }
  }
}

// The table kernel's step: two half-steps of 64 columns. w[h] words 0-1 hold row g+8h's 8 bytes of the first
// half, words 2-3 of the second; compute reads x[nt][0..1] and [2..3], the matching 16 x-elements of each half,
// so that sub-step j reads words j>>1 of both, as the scaled kernel does.
// The four absmax of a step (rows g, g+8 × two halves) are loaded once per row group: lane t loads row g+8·(t&1)'s
// of half t>>1, and compute shares them by shuffles.
template <int NT>
struct TableFragment {
  uint4 w[2];
  float scale;     // this lane's absmax, or the nested absmax2 when double-quantized
  uint32_t code;   // its 8-bit code when double-quantized
};

// What a lane reads, fixed for the whole kernel: rows g and g+8 (their first flat index, whether they exist,
// their W bytes at k = 16t) and its batch rows' x at k = 16t.
template <int NT>
struct TableLane {
  int64_t row_first[2];
  bool row_ok[2];
  const uint8_t* w[2];
  const uint16_t* x[NT];
  bool x_ok[NT];
  int64_t scale_first;  // row g+8·(t&1), whose absmax this lane loads: its first flat index,
  bool scale_ok;        // whether it exists,
  int scale_half;       // and the half-step, t >> 1
};

template <int NT>
__device__ __forceinline__ TableLane<NT> table_lane(const Nf4GemvArgs& p, int64_t row0, int g, int t) {
  TableLane<NT> lane;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = row0 + g + 8 * h;
    lane.row_ok[h] = row < p.n;
    lane.row_first[h] = row * p.k;
    lane.w[h] = p.packed + (lane.row_first[h] + 16 * t) / 2;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int b = g + 8 * nt;
    lane.x_ok[nt] = b < p.batch;
    lane.x[nt] = static_cast<const uint16_t*>(p.x) + b * p.ldx + 16 * t;
  }
  lane.scale_first = (t & 1) ? lane.row_first[1] : lane.row_first[0];
  lane.scale_ok = (t & 1) ? lane.row_ok[1] : lane.row_ok[0];
  lane.scale_half = t >> 1;
  return lane;
}

// Step `step` (< ceil(k / 128)): its first half always lies inside k, the second when k - 128·step > 64.
template <int NT>
__device__ __forceinline__ void load_table_step(TableFragment<NT>& f, const Nf4GemvArgs& p, const TableLane<NT>& lane,
                                                int64_t step, int bs_shift, int nbs_shift) {
  f.scale = 0.0f;
  f.code = 0u;
  {
    const int64_t kh = step * kStepK + lane.scale_half * kHalfK;
    if ((lane.scale_half == 0 || kh < p.k) && lane.scale_ok) {
      const int64_t block = (lane.scale_first + kh) >> bs_shift;  // the whole half-step's absmax block
      if (p.absmax2 != nullptr) {
        f.code = __ldg(static_cast<const uint8_t*>(p.absmax) + block);
        f.scale = __ldg(p.absmax2 + (block >> nbs_shift));
      } else {
        f.scale = __ldg(static_cast<const float*>(p.absmax) + block);
      }
    }
  }
  uint2 w[2][2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t kh = step * kStepK + half * kHalfK;
    const bool k_ok = half == 0 || kh < p.k;  // k % 64 == 0: a half-step is wholly inside or outside
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      w[h][half] = make_uint2(0u, 0u);
      if (k_ok && lane.row_ok[h]) w[h][half] = load_stream8(lane.w[h] + kh / 2);
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) f.w[h] = make_uint4(w[h][0].x, w[h][0].y, w[h][1].x, w[h][1].y);
}

// Byte b (0..3) of `word` times kTableCopies, from one shift and one mask: its entry's index in a lane's copy.
__device__ __forceinline__ uint32_t table_index(uint32_t word, int b) {
  static_assert(kTableCopies == 32, "the shifts below multiply by 32");
  return (b == 0 ? word << 5 : word >> (8 * b - 5)) & (0xFFu << 5);
}

// lane_table: this lane's copy of the byte table, entry v at lane_table[v * kTableCopies]: both unscaled values
// of byte v (high nibble first), packed as the MMA's A operand wants them.
template <typename T, int NT>
__device__ __forceinline__ void compute_table_step(float (&acc)[NT][4], const TableFragment<NT>& f,
                                                   const Nf4GemvArgs& p, const TableLane<NT>& lane, int64_t step,
                                                   const uint32_t* lane_table, const float* code2, bool nested,
                                                   float offset) {
  // x is read here, not prefetched with W: every block reads the same few KB (L1 hits), and 32 fewer registers
  uint4 x[NT][4];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t kh = step * kStepK + half * kHalfK;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      x[nt][2 * half] = make_uint4(0u, 0u, 0u, 0u);
      x[nt][2 * half + 1] = make_uint4(0u, 0u, 0u, 0u);
      if ((half == 0 || kh < p.k) && lane.x_ok[nt]) {
        const uint4* xp = reinterpret_cast<const uint4*>(lane.x[nt] + kh);
        x[nt][2 * half] = __ldg(xp);
        x[nt][2 * half + 1] = __ldg(xp + 1);
      }
    }
  }
  const float mine = nested ? __fadd_rn(__fmul_rn(code2[f.code], f.scale), offset) : f.scale;
  const int group_lane0 = (threadIdx.x & 31) & ~3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float scale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) scale[h] = __shfl_sync(0xFFFFFFFFu, mine, group_lane0 | h | (half << 1));
    float c[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[nt][i] = 0.0f;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * half + jj;
      uint32_t a[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t word = word_of(f.w[h], j >> 1);  // bytes 2(j&1), 2(j&1)+1: elements 4j..4j+3 of the half
        a[h] = lane_table[table_index(word, 2 * (j & 1))];
        a[2 + h] = lane_table[table_index(word, 2 * (j & 1) + 1)];
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        Mma<T>::run(c[nt], a, word_of(x[nt][j >> 1], 2 * (j & 1)), word_of(x[nt][j >> 1], 2 * (j & 1) + 1));
      }
    }
    // accumulator fragment: c0, c1 -> row g, c2, c3 -> row g+8
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = fmaf(scale[i >> 1], c[nt][i], acc[nt][i]);
  }
}

// The kernels' shared prologue: the code tables in shared memory (code; code2 when double-quantized; the byte
// table's 32 copies when kTable).
template <typename T, bool kTable>
__device__ __forceinline__ void fill_tables(float* code, float* code2, uint32_t* table, const Nf4GemvArgs& p,
                                            bool nested) {
  if (threadIdx.x < 16) code[threadIdx.x] = kNF4Code[threadIdx.x];
  if (nested) code2[threadIdx.x] = __ldg(p.code2 + threadIdx.x);  // kWarps * 32 == 256 threads
  __syncthreads();
  if constexpr (kTable) {
    // 16-byte stores: words 4i..4i+3 are four copies of the same entry (4i) / kTableCopies
    uint4* table4 = reinterpret_cast<uint4*>(table);
#pragma unroll
    for (int r = 0; r < 256 * kTableCopies / (4 * kWarps * 32); ++r) {
      const int i = r * kWarps * 32 + threadIdx.x;
      const int v = 4 * i / kTableCopies;
      const uint32_t pair = Mma<T>::pack(code[v >> 4], code[v & 15]);
      table4[i] = make_uint4(pair, pair, pair, pair);
    }
    __syncthreads();
  }
}

// The table kernel's K loop over this block's rows; two steps in flight: the next step's loads are issued before
// this step's math. TABLE_LEAN's ragged last block runs it; nf4_gemv_kernel keeps its own inline copy (calling this
// reschedules its SASS).
template <typename T, int NT>
__device__ __forceinline__ void table_loop(float (&acc)[NT][4], const Nf4GemvArgs& p, int64_t row0, int64_t steps,
                                           int first, int stride, int lane, int g, int t, const uint32_t* table,
                                           const float* code2, bool nested, int bs_shift, int nbs_shift) {
  const uint32_t* lane_table = table + lane;
  const TableLane<NT> reads = table_lane<NT>(p, row0, g, t);
  TableFragment<NT> cur, next;
  if (first < steps) load_table_step(cur, p, reads, first, bs_shift, nbs_shift);
  for (int64_t s = first; s < steps; s += stride) {
    if (s + stride < steps) load_table_step(next, p, reads, s + stride, bs_shift, nbs_shift);
    compute_table_step<T, NT>(acc, cur, p, reads, s, lane_table, code2, nested, p.offset);
    cur = next;
  }
}

// The kernels' shared epilogue: the eight warps' partial sums added, bias, y stored.
template <typename T, int NT>
__device__ __forceinline__ void reduce_store(const float (&acc)[NT][4], float (*partial)[NT * 4][32],
                                             const Nf4GemvArgs& p, int64_t row0, int warp, int lane, int g, int t) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][nt * 4 + i][lane] = acc[nt][i];
  __syncthreads();
  if (warp != 0) return;
  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += partial[w][nt * 4 + i][lane];
      // accumulator fragment: c0, c1 -> row g, columns 2t, 2t+1; c2, c3 -> row g+8
      const int64_t row = row0 + g + (i >= 2 ? 8 : 0);
      const int b = 8 * nt + 2 * t + (i & 1);
      if (row < p.n && b < p.batch) {
        if (bias != nullptr) v += Mma<T>::to_float(bias[row]);
        y[b * p.ldy + row] = Mma<T>::from_float(v);
      }
    }
  }
}

// reduce_store for blocks of kWarps / kSplitK groups of 16 rows, kSplitK warps a group (warps group·kSplitK ..
// group·kSplitK + kSplitK - 1): each group's first warp adds its warps' sums in warp order and stores its rows. With
// kSplitK = kWarps it is reduce_store<T, 1>, the same sums in the same order.
template <typename T, int kSplitK>
__device__ __forceinline__ void reduce_store_groups(const float (&acc)[1][4], float (*partial)[4][32],
                                                    const Nf4GemvArgs& p, int64_t row0, int warp, int lane, int g,
                                                    int t) {
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][i][lane] = acc[0][i];
  __syncthreads();
  if (warp % kSplitK != 0) return;
  const int64_t rows0 = row0 + kRowsPerBlock * (warp / kSplitK);
  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kSplitK; ++w) v += partial[warp + w][i][lane];
    // accumulator fragment: c0, c1 -> row g, columns 2t, 2t+1; c2, c3 -> row g+8
    const int64_t row = rows0 + g + (i >= 2 ? 8 : 0);
    const int b = 2 * t + (i & 1);
    if (row < p.n && b < p.batch) {
      if (bias != nullptr) v += Mma<T>::to_float(bias[row]);
      y[b * p.ldy + row] = Mma<T>::from_float(v);
    }
  }
}

template <typename T, int NT, bool kTable>
__global__ void __launch_bounds__(kWarps * 32)
    nf4_gemv_kernel(const Nf4GemvArgs p, int bs_shift, int nbs_shift) {
  __shared__ float code[16];
  __shared__ float code2[256];  // the nested absmax code table, when double-quantized
  __shared__ float partial[kWarps][NT * 4][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const bool nested = p.absmax2 != nullptr;
  // the table kernel's byte table (32 copies: 32 KB); a 16-byte stub in the scaled kernel
  __shared__ __align__(16) uint32_t table[kTable ? 256 * kTableCopies : 4];
  fill_tables<T, kTable>(code, code2, table, p, nested);

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t steps = (p.k + kStepK - 1) / kStepK;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;

  // Two steps in flight: the next step's loads are issued before this step's math.
  if constexpr (kTable) {
    const uint32_t* lane_table = table + lane;
    const TableLane<NT> reads = table_lane<NT>(p, row0, g, t);
    TableFragment<NT> cur, next;
    if (warp < steps) load_table_step(cur, p, reads, warp, bs_shift, nbs_shift);
    for (int64_t s = warp; s < steps; s += kWarps) {
      if (s + kWarps < steps) load_table_step(next, p, reads, s + kWarps, bs_shift, nbs_shift);
      compute_table_step<T, NT>(acc, cur, p, reads, s, lane_table, code2, nested, p.offset);
      cur = next;
    }
  } else {
    Fragment<NT> cur, next;
    if (warp < steps) load_step(cur, p, warp, g, t, row0, bs_shift, nbs_shift);
    for (int64_t s = warp; s < steps; s += kWarps) {
      if (s + kWarps < steps) load_step(next, p, s + kWarps, g, t, row0, bs_shift, nbs_shift);
      compute_step<T, NT>(acc, cur, code, code2, nested, p.offset);
      cur = next;
    }
  }
  reduce_store<T, NT>(acc, partial, p, row0, warp, lane, g, t);
}

// ---- TABLE_LEAN (variant 2): the table kernel's arithmetic with a leaner loop, for a batch tile of 8 (NT = 1),
// k % 128 == 0 (every step has both half-steps), and blocks whose 16 rows all exist.

// What a lane reads in the lean loop, advanced by one step of its warp (kWarps * kStepK columns) at each load:
// rows g and g+8's W bytes at k = 16t of the step's first half (the second half is 32 bytes on), x at k = 16t of
// batch row min(g, batch - 1) (a column past the batch computes a copy of the last one, never stored: the MMA's
// columns are independent), and the flat index of the absmax this lane loads (row g+8·(t&1), half t >> 1).
struct LeanLane {
  const uint8_t* w[2];
  const uint4* x;
  int64_t scale_flat;
};

template <bool kNested, int kSplitK>
__device__ __forceinline__ void load_lean_step(TableFragment<1>& f, const Nf4GemvArgs& p, LeanLane& lane,
                                               int bs_shift, int nbs_shift) {
  const int64_t block = lane.scale_flat >> bs_shift;  // the whole half-step's absmax block
  if constexpr (kNested) {
    f.code = __ldg(static_cast<const uint8_t*>(p.absmax) + block);
    f.scale = __ldg(p.absmax2 + (block >> nbs_shift));
  } else {
    f.code = 0u;
    f.scale = __ldg(static_cast<const float*>(p.absmax) + block);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint2 lo = load_stream8(lane.w[h]);
    const uint2 hi = load_stream8(lane.w[h] + kHalfK / 2);
    f.w[h] = make_uint4(lo.x, lo.y, hi.x, hi.y);
    lane.w[h] += kSplitK * kStepK / 2;
  }
  lane.scale_flat += kSplitK * kStepK;
}

// Byte b (0..3) of `word`: the byte offset of its entry in the lane's copy of the table, lane4 = 4 * lane (entry v
// of copy c is word v * kTableCopies + c, at byte 128 v + 4 c; bits 2-6 hold the copy, 7-14 the entry).
__device__ __forceinline__ uint32_t lean_offset(uint32_t word, int b, uint32_t lane4) {
  static_assert(kTableCopies == 32, "an entry is 128 bytes");
  return ((b == 0 ? word << 7 : word >> (8 * b - 7)) & (0xFFu << 7)) | lane4;
}

__device__ __forceinline__ uint32_t lean_lookup(const uint32_t* table, uint32_t offset) {
  return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(table) + offset);
}

// compute_table_step for NT = 1, every half-step inside k and x's row always loaded: the same MMAs and scaling.
template <typename T, bool kNested>
__device__ __forceinline__ void compute_lean_step(float (&acc)[1][4], const TableFragment<1>& f, const uint4* xp,
                                                  const uint32_t* table, uint32_t lane4, const float* code2,
                                                  float offset) {
  uint4 x[4];
  x[0] = __ldg(xp);
  x[1] = __ldg(xp + 1);
  x[2] = __ldg(xp + kHalfK / 8);  // the second half-step: 64 elements (8 uint4) on
  x[3] = __ldg(xp + kHalfK / 8 + 1);
  const float mine = kNested ? __fadd_rn(__fmul_rn(code2[f.code], f.scale), offset) : f.scale;
  const int group_lane0 = (threadIdx.x & 31) & ~3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float scale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) scale[h] = __shfl_sync(0xFFFFFFFFu, mine, group_lane0 | h | (half << 1));
    float c[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] = 0.0f;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * half + jj;
      uint32_t a[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t word = word_of(f.w[h], j >> 1);
        a[h] = lean_lookup(table, lean_offset(word, 2 * (j & 1), lane4));
        a[2 + h] = lean_lookup(table, lean_offset(word, 2 * (j & 1) + 1, lane4));
      }
      Mma<T>::run(c, a, word_of(x[j >> 1], 2 * (j & 1)), word_of(x[j >> 1], 2 * (j & 1) + 1));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[0][i] = fmaf(scale[i >> 1], c[i], acc[0][i]);
  }
}

// Launched for k % 128 == 0, batch <= 8, absmax2 != nullptr exactly when kNested. kDepth fragments a warp: while
// one step computes, the loads of the next kDepth - 1 are in flight (TABLE_LEAN 2, TABLE_DEEP 4). K is split over
// kSplitK warps: a block holds kWarps / kSplitK groups of 16 rows (TABLE_LEAN, TABLE_DEEP: 8, one group; the _K4 and
// _K2 candidates 4 and 2).
template <typename T, bool kNested, int kDepth, int kSplitK>
__global__ void __launch_bounds__(kWarps * 32, kDepth == 2 ? 3 : 2)  // 3 blocks an SM (<= 80 registers) at depth 2
    nf4_gemv_lean_kernel(const Nf4GemvArgs p, int bs_shift, int nbs_shift) {
  static_assert(kWarps % kSplitK == 0, "whole groups of warps");
  __shared__ float code[16];
  __shared__ float code2[256];
  __shared__ float partial[kWarps][4][32];
  __shared__ __align__(16) uint32_t table[256 * kTableCopies];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  fill_tables<T, true>(code, code2, table, p, kNested);

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock * (kWarps / kSplitK);
  const int64_t rows0 = row0 + kRowsPerBlock * (warp / kSplitK);  // this warp's group of 16 rows
  const int part = warp % kSplitK;                                 // and its part of K: steps part, part + kSplitK, ..
  const int64_t steps = p.k / kStepK;
  float acc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
  if (rows0 + kRowsPerBlock <= p.n) {
    const int64_t row = rows0 + g;
    const int64_t k_first = static_cast<int64_t>(part) * kStepK;  // this warp's first step
    LeanLane reads;
    reads.w[0] = p.packed + (row * p.k + k_first + 16 * t) / 2;
    reads.w[1] = reads.w[0] + 8 * (p.k / 2);
    const int b = min(g, p.batch - 1);
    reads.x = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.x) + b * p.ldx + k_first + 16 * t);
    reads.scale_flat = (row + 8 * (t & 1)) * p.k + k_first + (t >> 1) * kHalfK;
    // opaque to the compiler: knowing lane4 = (threadIdx & 31) << 2, it re-derived it in every table offset of the
    // unrolled ring (an extra LOP3 a lookup: 200 instead of 174 SASS instructions a nested step)
    uint32_t lane4;
    asm("mov.b32 %0, %1;" : "=r"(lane4) : "r"(4u * static_cast<uint32_t>(lane)));
    // launched for k / 128 <= INT_MAX - kMaxDepth * kWarps: every step index below fits an int
    const int steps32 = static_cast<int>(steps);
    // a ring of fragments, unrolled so each has its own registers: slot d holds this warp's steps d, d + kDepth, ...
    // Before a step computes, the slot freed by the step before it takes the step kDepth - 1 on (loads advance
    // `reads` in step order), so kDepth - 1 steps are in flight during each step's math
    TableFragment<1> f[kDepth];
#pragma unroll
    for (int d = 0; d + 1 < kDepth; ++d)
      if (part + d * kSplitK < steps32) load_lean_step<kNested, kSplitK>(f[d], p, reads, bs_shift, nbs_shift);
    for (int s = part; s < steps32; s += kDepth * kSplitK) {
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        const int sd = s + d * kSplitK;
        if (sd < steps32) {
          if (sd + (kDepth - 1) * kSplitK < steps32)
            load_lean_step<kNested, kSplitK>(f[(d + kDepth - 1) % kDepth], p, reads, bs_shift, nbs_shift);
          compute_lean_step<T, kNested>(acc, f[d], reads.x, table, lane4, code2, p.offset);
          reads.x += kSplitK * kStepK / 8;
        }
      }
    }
  } else {
    // a ragged group of rows (in the last block): the table kernel's loop
    table_loop<T, 1>(acc, p, rows0, (p.k + kStepK - 1) / kStepK, part, kSplitK, lane, g, t, table, code2, kNested,
                     bs_shift, nbs_shift);
  }
  reduce_store_groups<T, kSplitK>(acc, partial, p, row0, warp, lane, g, t);
}

int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

template <typename T, bool kTable>
void launch_variant(const Nf4GemvArgs& p, int bs_shift, int nbs_shift, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 block(kWarps * 32);
  if (p.batch <= 8) {
    nf4_gemv_kernel<T, 1, kTable><<<grid, block, 0, stream>>>(p, bs_shift, nbs_shift);
  } else {
    nf4_gemv_kernel<T, 2, kTable><<<grid, block, 0, stream>>>(p, bs_shift, nbs_shift);
  }
}

constexpr int kMaxDepth = 4;

// The lean loop (kDepth steps a warp in flight) where k % 128 == 0 and batch <= 8; the table kernel elsewhere (the
// same results).
template <typename T, int kDepth, int kSplitK = kWarps>
void launch_lean(const Nf4GemvArgs& p, int bs_shift, int nbs_shift, cudaStream_t stream) {
  static_assert(kDepth <= kMaxDepth, "the launch's step-index bound");
  if (p.k % kStepK != 0 || p.batch > 8 || p.k / kStepK > INT_MAX - kMaxDepth * kWarps) {
    launch_variant<T, true>(p, bs_shift, nbs_shift, stream);
    return;
  }
  const int64_t rows_per_block = kRowsPerBlock * (kWarps / kSplitK);
  const dim3 grid(static_cast<unsigned>((p.n + rows_per_block - 1) / rows_per_block));
  const dim3 block(kWarps * 32);
  if (p.absmax2 != nullptr) {
    nf4_gemv_lean_kernel<T, true, kDepth, kSplitK><<<grid, block, 0, stream>>>(p, bs_shift, nbs_shift);
  } else {
    nf4_gemv_lean_kernel<T, false, kDepth, kSplitK><<<grid, block, 0, stream>>>(p, bs_shift, nbs_shift);
  }
}

template <typename T>
void launch_typed(const Nf4GemvArgs& p, int bs_shift, int nbs_shift, cudaStream_t stream) {
  if (p.variant == 5) {
    launch_lean<T, 4, 2>(p, bs_shift, nbs_shift, stream);
  } else if (p.variant == 4) {
    launch_lean<T, 4, 4>(p, bs_shift, nbs_shift, stream);
  } else if (p.variant == 3) {
    launch_lean<T, 4>(p, bs_shift, nbs_shift, stream);
  } else if (p.variant == 2) {
    launch_lean<T, 2>(p, bs_shift, nbs_shift, stream);
  } else if (p.variant == 1) {
    launch_variant<T, true>(p, bs_shift, nbs_shift, stream);
  } else {
    launch_variant<T, false>(p, bs_shift, nbs_shift, stream);
  }
}

enum Error : int { kOk = 0, kBadBatch, kBadK, kBadBlocksize, kBadDtype, kMisaligned, kCudaError, kBadVariant };

thread_local cudaError_t last_launch_error = cudaSuccess;  // what kCudaError stood for, for its message
thread_local std::string launch_error_message;

}  // namespace

const char* nf4_gemv_error_string(int code) {
  if (code == kCudaError) {
    // cudaGetLastError (in nf4_gemv_launch) cleared the error: its text is kept for the message
    launch_error_message = std::string("nf4_gemv_cuda: the kernel launch failed: ") +
                           cudaGetErrorString(last_launch_error) +
                           " (a GPU older than sm_80, or a driver older than the CUDA runtime the extension was built"
                           " with)";
    return launch_error_message.c_str();
  }
  switch (code) {
    case kBadBatch: return "nf4_gemv_cuda: batch must be 1..16";
    case kBadK: return "nf4_gemv_cuda: k must be a positive multiple of 32";
    case kBadBlocksize: return "nf4_gemv_cuda: blocksize must be a power of two >= 32 (and nested_blocksize a power of two)";
    case kBadDtype: return "nf4_gemv_cuda: dtype must be 1 (fp16) or 2 (bf16)";
    case kMisaligned: return "nf4_gemv_cuda: x, packed and ldx must be 16-byte aligned";
    case kBadVariant:
      return "nf4_gemv_cuda: variant must be 0 (scaled decode), 1 (byte table), 2 (byte table, lean loop), 3 (lean"
             " loop, 3 steps in flight), 4 or 5 (3 in flight, K split over 4 or 2 warps); 1 to 5 need blocksize >= 64"
             " and k a multiple of 64";
    default: return "nf4_gemv_cuda: unknown error";
  }
}

int nf4_gemv_launch(const Nf4GemvArgs& p, void* stream_handle) {
  if (p.batch < 1 || p.batch > 16) return kBadBatch;
  if (p.k <= 0 || p.k % 32 != 0) return kBadK;
  const int bs_shift = log2_exact(p.blocksize);
  const int nbs_shift = p.absmax2 != nullptr ? log2_exact(p.nested_blocksize) : 0;
  if (bs_shift < 5 || nbs_shift < 0) return kBadBlocksize;
  if (p.variant != 0 && (p.variant < 1 || p.variant > 5 || bs_shift < 6 || p.k % kHalfK != 0)) return kBadVariant;
  if (reinterpret_cast<uintptr_t>(p.x) % 16 != 0 || reinterpret_cast<uintptr_t>(p.packed) % 16 != 0 ||
      p.ldx % 8 != 0)
    return kMisaligned;
  if (p.n == 0) return kOk;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  if (p.dtype == 2) {
    launch_typed<__nv_bfloat16>(p, bs_shift, nbs_shift, stream);
  } else if (p.dtype == 1) {
    launch_typed<__half>(p, bs_shift, nbs_shift, stream);
  } else {
    return kBadDtype;
  }
  last_launch_error = cudaGetLastError();
  return last_launch_error == cudaSuccess ? kOk : kCudaError;
}

}  // namespace fastft
