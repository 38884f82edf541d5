// Fused contrastive loss (InfoNCE over cosine similarities) for a frozen teacher; see kernels/__init__.py.
//
// Inputs are the normalised student rows q (n x c) and teacher rows k (m x c) in fp16 or bf16 (c padded to a size of
// the tile table by the caller). One pass over column tiles computes, per row i, the online log-sum-exp of
// z_ij = q_i.k_j / tau over the allowed columns and O_i = sum_j softmax_ij k_j; the combine kernel then writes
//   lse_i,  loss_i = w_i (lse_i - z_{i,pos(i)}),  grad_i = w_i / (n tau) (O_i - k_pos(i))   (= dL/dq_i, L = sum loss / n)
// so that the backward pass is an elementwise scale. Nothing n x m is stored.
//
// Partial kernel (grid: row blocks x column splits; each block owns BM = 16 * MT * WARPS rows and one column split):
//   * The Q tile and a ring of STAGES K tiles (BN rows each) are copied to shared memory with cp.async (one barrier
//     per K tile: the buffer refilled after it is the one every warp finished in the previous step); rows past the
//     end are zero-filled and their columns masked with -inf.
//   * S = Q K^T and O += P K with mma.sync m16n8k16 (fp16/bf16 operands, fp32 accumulation); P is rounded to the
//     operand type for the second product, the row sums use the fp32 P (as FlashAttention-2 does).
//   * Online softmax in the log2 domain: running max m (of z log2 e), running sum l, O rescaled by 2^(m_old - m_new).
//     With LAZY > 0 the running max is only raised when a tile exceeds it by more than LAZY (log2 units), so O is
//     rescaled (warp-wide) only on those rare tiles; P then stays <= 2^LAZY, harmless for fp32 sums and fp16/bf16 P.
//   * Column mask: with rows_per_image R > 0, column j is excluded from row i when j / R == i / R and j != pos(i).
// Each split writes its unnormalised (m, l, O); split 0 writes O straight into the gradient buffer, which the combine
// kernel (one warp per row, splits added in order) finishes in place. No atomics: results are bit-reproducible.
//
// Two small row kernels (one warp per row) can replace the PyTorch elementwise work around it (kernels/cuda.py,
// FUSED_PRE_POST): facd_prepare (row norms, x / max(||x||, eps) rounded to the operand type, zero channel padding)
// and facd_scale_backward (dL/ds = g (dq - q (q . dq)) / max(||s||, eps), the projection dropped where ||s|| <= eps).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

// Tile table, one entry per line: X(C, MT, WARPS, BN, MINB, QREG, STAGES, LAZY) =
//   C       channels (operands are zero-padded to the next entry)
//   MT      16-row MMA tiles per warp (block rows BM = 16 * MT * WARPS)
//   WARPS   warps per block
//   BN      columns per K tile
//   MINB    minimum resident blocks per SM promised to the compiler (__launch_bounds__; caps registers per thread)
//   QREG    1: the warp's Q fragments stay in registers; 0: re-read from shared memory every K tile
//   STAGES  K tiles in flight in shared memory (2 = double buffering)
//   LAZY    0: exact online max; > 0: raise the running max (and rescale O) only when a tile exceeds it by > LAZY
// kernels/build.py parses these lines (the PyTorch emulation and the split heuristic use the same tiles), so keep
// the format. benchmarks/kernel_tune.sh (benchmarks/kernel_tune.py) times alternatives for a row on a GPU.
#define FACD_TILES(X)                 \
    X(16, 2, 4, 64, 1, 1, 2, 0)       \
    X(32, 2, 4, 64, 1, 1, 2, 0)       \
    X(64, 2, 4, 64, 1, 1, 2, 8)       \
    X(128, 1, 4, 64, 1, 1, 2, 0)      \
    X(256, 1, 4, 32, 1, 0, 3, 8)

namespace {

constexpr int kPad = 8;  // shared-memory row padding (elements): consecutive rows shift by 16 bytes, no bank conflicts
constexpr int kCombineWarps = 4;
constexpr int kRowWarps = 8;  // warps (rows) per block of the prepare / backward row kernels
constexpr int kUnsupported = -1;  // error code: no tile configuration for this (dtype, channels)
constexpr int kBadArgument = -2;  // error code: inconsistent sizes or split layout
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

// Two floats -> one 32-bit MMA operand register (the lower column in the low half).
__device__ __forceinline__ uint32_t pack2(__half, float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16, float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
}

// d += a b for one m16n8k16 tile (a: 16x16 row-major fragment, b: 16x8 column fragment), fp32 accumulators.
__device__ __forceinline__ void mma(__half, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(__nv_bfloat16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(p)));
}

// 16-byte global -> shared copy; when !valid nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x, ~2 ulp; 2^-inf = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Copies rows [first, first + kRows) of a row-major (limit x C) matrix into shared rows of stride C + kPad; rows at or
// past `limit` are zero-filled.
template <typename T, int C, int kRows, int kThreads>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int first, int limit) {
    constexpr int kChunks = C / 8;  // 16-byte chunks per row
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
        const int r = idx / kChunks, col = (idx % kChunks) * 8;
        const bool valid = first + r < limit;
        const T* from = valid ? src + static_cast<size_t>(first + r) * C + col : src;
        cp_async16(dst + r * (C + kPad) + col, from, valid);
    }
}

// Template parameters after T and C: see the FACD_TILES table.
#define FACD_CONFIG_PARAMS int MT, int WARPS, int BN, int MINB, int QREG, int STAGES, int LAZY
#define FACD_CONFIG MT, WARPS, BN, MINB, QREG, STAGES, LAZY

template <typename T, int C, FACD_CONFIG_PARAMS>
__global__ void __launch_bounds__(WARPS * 32, MINB)
    partial_kernel(const T* __restrict__ q, const T* __restrict__ k, const int64_t* __restrict__ pos, int n,
                   int rows_per_image, float scale_log2, int cols_per_split, int m, float* __restrict__ o_first,
                   float* __restrict__ o_rest, float* __restrict__ part_max, float* __restrict__ part_sum) {
    constexpr int kThreads = WARPS * 32;
    constexpr int BM = 16 * MT * WARPS;
    constexpr int LD = C + kPad;
    constexpr int KSTEPS = C / 16;  // k-steps of S = Q K^T (over channels)
    constexpr int NT = BN / 8;      // 8-column accumulator tiles of S
    constexpr int CT = C / 8;       // 8-channel accumulator tiles of O
    constexpr bool kQInRegisters = QREG != 0;
    static_assert(C % 16 == 0 && BN % 16 == 0, "tile sizes must be multiples of 16");
    static_assert(STAGES >= 2 && MINB >= 1 && LAZY >= 0, "bad tile configuration");

    extern __shared__ __align__(16) unsigned char smem[];
    T* sq = reinterpret_cast<T*>(smem);  // [BM][LD]
    T* sk = sq + BM * LD;                // [STAGES][BN][LD]

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t4 = lane % 4;  // MMA fragment row group and column pair
    const int row0 = blockIdx.x * BM;
    const int warp_row0 = row0 + warp * 16 * MT;
    const int split = blockIdx.y;
    const int col_begin = split * cols_per_split;
    const int col_end = min(m, col_begin + cols_per_split);
    const int ntiles = (col_end - col_begin + BN - 1) / BN;

    // Per-thread rows: mt-th 16-row tile of this warp, h = 0 (row g) or 1 (row g + 8).
    int my_pos[MT][2], my_image[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp_row0 + mt * 16 + g + 8 * h;
            my_pos[mt][h] = row < n ? static_cast<int>(pos[row]) : -1;
            my_image[mt][h] = rows_per_image > 0 ? row / rows_per_image : 0;
        }
    // Image range of this block's rows: column tiles outside it need no same-image mask.
    const int block_image_lo = rows_per_image > 0 ? row0 / rows_per_image : 0;
    const int block_image_hi = rows_per_image > 0 ? (min(row0 + BM, n) - 1) / rows_per_image : 0;

    float row_max[MT][2], row_sum[MT][2], acc[MT][CT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_max[mt][h] = -INFINITY;
            row_sum[mt][h] = 0.f;
        }
#pragma unroll
        for (int ct = 0; ct < CT; ++ct)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][ct][e] = 0.f;
    }
    uint32_t qfrag[kQInRegisters ? MT : 1][kQInRegisters ? KSTEPS : 1][4];

    // Prologue: Q with K tile 0 in the first copy group, then tiles 1 .. STAGES - 2, one group each.
    load_tile<T, C, BM, kThreads>(sq, q, row0, n);
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < ntiles) load_tile<T, C, BN, kThreads>(sk + st * BN * LD, k, col_begin + st * BN, col_end);
        cp_async_commit();
    }

    for (int tile = 0; tile < ntiles; ++tile) {
        const int c0 = col_begin + tile * BN;
        // Groups committed so far: tiles 0 .. tile + STAGES - 2; this thread's copies of `tile` are done once at
        // most STAGES - 2 groups are pending. The barrier then makes every thread's copies visible and guarantees
        // that every warp has finished tile - 1, whose buffer is refilled with tile + STAGES - 1 (an empty group
        // past the end keeps the count).
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int next = tile + STAGES - 1;
            if (next < ntiles) load_tile<T, C, BN, kThreads>(sk + (next % STAGES) * BN * LD, k, c0 + (STAGES - 1) * BN,
                                                              col_end);
            cp_async_commit();
        }
        const T* kt = sk + (tile % STAGES) * BN * LD;

        if constexpr (kQInRegisters) {
            if (tile == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int kk = 0; kk < KSTEPS; ++kk)
                        ldmatrix_x4(qfrag[mt][kk], sq + (warp_row0 - row0 + mt * 16 + lane % 16) * LD + kk * 16 +
                                                       (lane / 16) * 8);
            }
        }

        // S = Q K^T for this warp's rows and the BN columns of the tile.
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (kQInRegisters) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) a[mt][e] = qfrag[mt][kk][e];
                } else {
                    ldmatrix_x4(a[mt], sq + (warp_row0 - row0 + mt * 16 + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
                }
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                uint32_t b[4];  // b0, b1 of column tiles nt and nt + 1
                ldmatrix_x4(b, kt + (nt * 8 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma(T(), s[mt][nt], a[mt], b[0], b[1]);
                    mma(T(), s[mt][nt + 1], a[mt], b[2], b[3]);
                }
            }
        }

        // Mask (only tiles that reach past the split end or share an image with this block's rows).
        const int tile_end = min(c0 + BN, col_end);
        const bool partial_tile = c0 + BN > col_end;
        const bool same_image_possible = rows_per_image > 0 && c0 / rows_per_image <= block_image_hi &&
                                         (tile_end - 1) / rows_per_image >= block_image_lo;
        if (partial_tile || same_image_possible) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = c0 + nt * 8 + 2 * t4 + (e & 1);
                        const int h = e >> 1;
                        const bool excluded = col >= col_end || (rows_per_image > 0 && col != my_pos[mt][h] &&
                                                                 col / rows_per_image == my_image[mt][h]);
                        if (excluded) s[mt][nt][e] = -INFINITY;
                    }
        }

        // Online softmax (log2 domain): new running max and O rescale first (so that nothing but P stands between
        // the exponentials and the P K products, which the compiler interleaves), then P overwrites S.
        float alpha[MT][2], base[MT][2];
        bool raised = false;  // LAZY: some running max of this thread changed
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float tile_max = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    tile_max = fmaxf(tile_max, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
                tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
                const float old_max = row_max[mt][h];
                float new_max;
                if constexpr (LAZY > 0) {  // (-inf + LAZY = -inf: the first tile with an allowed column raises it)
                    new_max = tile_max * scale_log2 > old_max + static_cast<float>(LAZY) ? tile_max * scale_log2
                                                                                        : old_max;
                    raised |= new_max != old_max;
                } else {
                    new_max = fmaxf(old_max, tile_max * scale_log2);
                }
                base[mt][h] = new_max == -INFINITY ? 0.f : new_max;  // a row with nothing allowed yet
                alpha[mt][h] = fast_exp2(old_max - base[mt][h]);
                row_max[mt][h] = new_max;
            }
        if (LAZY == 0 || __any_sync(kFullMask, raised)) {  // (alpha = 1 exactly for rows whose max stayed)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int ct = 0; ct < CT; ++ct)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][ct][e] *= alpha[mt][e >> 1];
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float tile_sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        s[mt][nt][e] = fast_exp2(fmaf(s[mt][nt][e], scale_log2, -base[mt][h]));
                        tile_sum += s[mt][nt][e];
                    }
                row_sum[mt][h] = row_sum[mt][h] * alpha[mt][h] + tile_sum;  // per-thread partial, quad-reduced later
            }

        // O += P K: the S accumulators of column tiles 2kk, 2kk + 1 form the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = pack2(T(), s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack2(T(), s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack2(T(), s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack2(T(), s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int ct = 0; ct < CT; ct += 2) {
                uint32_t b[4];  // b0, b1 of channel tiles ct and ct + 1 (K read transposed)
                ldmatrix_x4_trans(b, kt + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + ct * 8 + (lane / 16) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma(T(), acc[mt][ct], a[mt], b[0], b[1]);
                    mma(T(), acc[mt][ct + 1], a[mt], b[2], b[3]);
                }
            }
        }
    }

    // Unnormalised partial results of this split.
    float* o_split = split == 0 ? o_first : o_rest + static_cast<size_t>(split - 1) * n * C;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = row_sum[mt][h];
            sum += __shfl_xor_sync(kFullMask, sum, 1);
            sum += __shfl_xor_sync(kFullMask, sum, 2);
            const int row = warp_row0 + mt * 16 + g + 8 * h;
            if (row < n) {
                float* o_row = o_split + static_cast<size_t>(row) * C;
#pragma unroll
                for (int ct = 0; ct < CT; ++ct)
                    *reinterpret_cast<float2*>(o_row + ct * 8 + 2 * t4) =
                        make_float2(acc[mt][ct][2 * h], acc[mt][ct][2 * h + 1]);
                if (t4 == 0) {
                    part_max[static_cast<size_t>(split) * n + row] = row_max[mt][h];
                    part_sum[static_cast<size_t>(split) * n + row] = sum;
                }
            }
        }
}

// One warp per row: merge the splits in order, then lse, the weighted loss and the gradient (in place over o_first).
template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_kernel(const T* __restrict__ q, const T* __restrict__ k, const int64_t* __restrict__ pos,
                   const float* __restrict__ weight, int n, int c, int splits, float inv_tau, float grad_scale,
                   const float* __restrict__ o_rest, const float* __restrict__ part_max,
                   const float* __restrict__ part_sum, float* __restrict__ o_first, float* __restrict__ lse,
                   float* __restrict__ loss) {
    const int row = blockIdx.x * kCombineWarps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= n) return;  // the whole warp leaves together

    float mx = -INFINITY;
    for (int sp = 0; sp < splits; ++sp) mx = fmaxf(mx, part_max[static_cast<size_t>(sp) * n + row]);
    float l = 0.f;
    for (int sp = 0; sp < splits; ++sp)
        l += part_sum[static_cast<size_t>(sp) * n + row] * exp2f(part_max[static_cast<size_t>(sp) * n + row] - mx);
    const float row_lse = (mx + log2f(l)) * kLn2;

    const T* q_row = q + static_cast<size_t>(row) * c;
    const T* k_pos = k + static_cast<size_t>(pos[row]) * c;
    float dot = 0.f;
    for (int ch = lane; ch < c; ch += 32) dot = fmaf(to_float(q_row[ch]), to_float(k_pos[ch]), dot);
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFullMask, dot, offset);

    const float w = weight ? weight[row] : 1.f;
    float* g_row = o_first + static_cast<size_t>(row) * c;
    for (int ch = lane; ch < c; ch += 32) {
        float o = g_row[ch] * exp2f(part_max[row] - mx);
        for (int sp = 1; sp < splits; ++sp)
            o += o_rest[(static_cast<size_t>(sp - 1) * n + row) * c + ch] *
                 exp2f(part_max[static_cast<size_t>(sp) * n + row] - mx);
        g_row[ch] = w * grad_scale * (o / l - to_float(k_pos[ch]));
    }
    if (lane == 0) {
        lse[row] = row_lse;
        loss[row] = w * (row_lse - dot * inv_tau);
    }
}

// One warp per row: norm_i = ||x_i|| (fp32), out_i = x_i / max(norm_i, eps) in the operand type, zero-padded from c_in
// to c_pad channels (as PyTorch's x * (1 / norm.clamp_min(eps)) followed by .to(operand type)).
template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kRowWarps * 32)
    prepare_kernel(const Tin* __restrict__ x, int n, int c_in, int c_pad, float eps, Tout* __restrict__ out,
                   float* __restrict__ norm_out) {
    const int row = blockIdx.x * kRowWarps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= n) return;
    const Tin* x_row = x + static_cast<size_t>(row) * c_in;
    float ss = 0.f;
    for (int ch = lane; ch < c_in; ch += 32) {
        const float v = to_float(x_row[ch]);
        ss = fmaf(v, v, ss);
    }
    for (int offset = 16; offset > 0; offset /= 2) ss += __shfl_xor_sync(kFullMask, ss, offset);
    const float norm = sqrtf(ss);
    const float inv = 1.f / fmaxf(norm, eps);
    Tout* out_row = out + static_cast<size_t>(row) * c_pad;
    for (int ch = lane; ch < c_pad; ch += 32)
        out_row[ch] = from_float<Tout>(ch < c_in ? to_float(x_row[ch]) * inv : 0.f);
    if (norm_out != nullptr && lane == 0) norm_out[row] = norm;
}

// One warp per row: dq = g * grad_q[:, :c], q = s / max(norm, eps),
// ds = (dq - q (q . dq) [norm > eps]) / max(norm, eps) (RowGradLoss.backward of kernels/contrastive.py); g is the
// upstream gradient (a device scalar).
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    scale_backward_kernel(const T* __restrict__ s, const float* __restrict__ norm, const float* __restrict__ grad_q,
                          const float* __restrict__ grad_out, int n, int c, int c_pad, float eps, T* __restrict__ ds) {
    const int row = blockIdx.x * kRowWarps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= n) return;
    const float row_norm = norm[row];
    const float inv = 1.f / fmaxf(row_norm, eps);
    const float g = *grad_out;
    const T* s_row = s + static_cast<size_t>(row) * c;
    const float* gq_row = grad_q + static_cast<size_t>(row) * c_pad;
    float dot = 0.f;
    for (int ch = lane; ch < c; ch += 32) dot = fmaf(to_float(s_row[ch]) * inv, gq_row[ch] * g, dot);
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFullMask, dot, offset);
    const float proj = row_norm > eps ? dot : 0.f;
    T* ds_row = ds + static_cast<size_t>(row) * c;
    for (int ch = lane; ch < c; ch += 32) {
        const float q = to_float(s_row[ch]) * inv;
        ds_row[ch] = from_float<T>((gq_row[ch] * g - q * proj) * inv);
    }
}

struct Args {
    const void* q;
    const void* k;
    const int64_t* pos;
    const float* weight;
    int n, m, rows_per_image, splits, cols_per_split;
    float tau;
    float *o_rest, *part_max, *part_sum, *grad, *lse, *loss;
    cudaStream_t stream;
};

template <typename T, int C, FACD_CONFIG_PARAMS>
constexpr size_t smem_bytes() {
    return static_cast<size_t>(16 * MT * WARPS + STAGES * BN) * (C + kPad) * sizeof(T);
}

// Allows the partial kernel's dynamic shared memory beyond the default 48 KB where it needs more.
template <typename T, int C, FACD_CONFIG_PARAMS>
cudaError_t allow_shared_memory() {
    constexpr size_t smem = smem_bytes<T, C, FACD_CONFIG>();
    if (smem <= 48 * 1024) return cudaSuccess;
    return cudaFuncSetAttribute(partial_kernel<T, C, FACD_CONFIG>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(smem));
}

template <typename T, int C, FACD_CONFIG_PARAMS>
int launch(const Args& a) {
    constexpr int BM = 16 * MT * WARPS;
    if (a.cols_per_split % BN != 0 || a.cols_per_split <= 0 ||
        static_cast<int64_t>(a.splits - 1) * a.cols_per_split >= a.m ||
        static_cast<int64_t>(a.splits) * a.cols_per_split < a.m)
        return kBadArgument;
    cudaError_t err = allow_shared_memory<T, C, FACD_CONFIG>();
    if (err != cudaSuccess) return err;
    const dim3 grid((a.n + BM - 1) / BM, a.splits);
    partial_kernel<T, C, FACD_CONFIG><<<grid, WARPS * 32, smem_bytes<T, C, FACD_CONFIG>(), a.stream>>>(
        static_cast<const T*>(a.q), static_cast<const T*>(a.k), a.pos, a.n, a.rows_per_image, kLog2e / a.tau,
        a.cols_per_split, a.m, a.grad, a.o_rest, a.part_max, a.part_sum);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    combine_kernel<T><<<(a.n + kCombineWarps - 1) / kCombineWarps, kCombineWarps * 32, 0, a.stream>>>(
        static_cast<const T*>(a.q), static_cast<const T*>(a.k), a.pos, a.weight, a.n, C, a.splits, 1.f / a.tau,
        1.f / (static_cast<float>(a.n) * a.tau), a.o_rest, a.part_max, a.part_sum, a.grad, a.lse, a.loss);
    return cudaGetLastError();
}

template <typename T, int C, FACD_CONFIG_PARAMS>
int occupancy(int* blocks) {
    const cudaError_t err = allow_shared_memory<T, C, FACD_CONFIG>();
    if (err != cudaSuccess) return err;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, partial_kernel<T, C, FACD_CONFIG>, WARPS * 32,
                                                         smem_bytes<T, C, FACD_CONFIG>());
}

// The compiled partial kernel as the device sees it (see facd_kernel_info).
template <typename T, int C, FACD_CONFIG_PARAMS>
int kernel_info(int* info) {
    cudaFuncAttributes attr;
    cudaError_t err = cudaFuncGetAttributes(&attr, partial_kernel<T, C, FACD_CONFIG>);
    if (err != cudaSuccess) return err;
    int blocks = 0;
    const int code = occupancy<T, C, FACD_CONFIG>(&blocks);
    if (code != 0) return code;
    const int values[] = {attr.numRegs, static_cast<int>(attr.localSizeBytes), blocks,
                          static_cast<int>(smem_bytes<T, C, FACD_CONFIG>()), 16 * MT * WARPS, BN, WARPS * 32,
                          MINB, QREG, STAGES, LAZY, attr.binaryVersion};
    memcpy(info, values, sizeof(values));
    return 0;
}

}  // namespace

extern "C" {

// dtype: 0 = fp16, 1 = bf16. Returns 0 (cudaSuccess), a cudaError_t, kUnsupported or kBadArgument.
int facd_forward(int dtype, int c, int device, const void* q, const void* k, const int64_t* pos, const float* weight,
                 int n, int m, int rows_per_image, float tau, int splits, int cols_per_split, float* o_rest,
                 float* part_max, float* part_sum, float* grad, float* lse, float* loss, void* stream) {
    if (n <= 0 || m <= 0 || splits <= 0 || rows_per_image < 0 || !(tau > 0.f)) return kBadArgument;
    const cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
    const Args a{q,      k,  pos, weight, n, m, rows_per_image, splits, cols_per_split, tau, o_rest, part_max,
                 part_sum, grad, lse, loss, static_cast<cudaStream_t>(stream)};
#define FACD_LAUNCH(C_, ...)                                                       \
    if (c == C_ && dtype == 0) return launch<__half, C_, __VA_ARGS__>(a);         \
    if (c == C_ && dtype == 1) return launch<__nv_bfloat16, C_, __VA_ARGS__>(a);
    FACD_TILES(FACD_LAUNCH)
#undef FACD_LAUNCH
    return kUnsupported;
}

// Resident blocks per SM of the partial kernel (used to choose the number of column splits).
int facd_blocks_per_sm(int dtype, int c, int device, int* blocks) {
    const cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
#define FACD_OCCUPANCY(C_, ...)                                                           \
    if (c == C_ && dtype == 0) return occupancy<__half, C_, __VA_ARGS__>(blocks);        \
    if (c == C_ && dtype == 1) return occupancy<__nv_bfloat16, C_, __VA_ARGS__>(blocks);
    FACD_TILES(FACD_OCCUPANCY)
#undef FACD_OCCUPANCY
    return kUnsupported;
}

// info[0..11] = registers per thread, local (spill) bytes per thread, resident blocks per SM, dynamic shared memory
// bytes, block rows, block columns, threads per block, MINB, QREG, STAGES, LAZY, binary (SASS) version of the partial
// kernel for this dtype and channel count on `device`.
int facd_kernel_info(int dtype, int c, int device, int* info) {
    const cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
#define FACD_INFO(C_, ...)                                                              \
    if (c == C_ && dtype == 0) return kernel_info<__half, C_, __VA_ARGS__>(info);      \
    if (c == C_ && dtype == 1) return kernel_info<__nv_bfloat16, C_, __VA_ARGS__>(info);
    FACD_TILES(FACD_INFO)
#undef FACD_INFO
    return kUnsupported;
}

// Operand preparation: in_dtype 0 = fp16, 1 = bf16, 2 = fp32 (x: n x c_in); out_dtype 0 = fp16, 1 = bf16 (out:
// n x c_pad); norm (n floats) may be null.
int facd_prepare(int in_dtype, int out_dtype, int device, const void* x, int n, int c_in, int c_pad, float eps,
                 void* out, float* norm, void* stream) {
    if (n <= 0 || c_in <= 0 || c_pad < c_in) return kBadArgument;
    const cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
    const dim3 grid((n + kRowWarps - 1) / kRowWarps), block(kRowWarps * 32);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
#define FACD_PREPARE(IN_CODE, TIN, OUT_CODE, TOUT)                                                                  \
    if (in_dtype == IN_CODE && out_dtype == OUT_CODE) {                                                             \
        prepare_kernel<TIN, TOUT><<<grid, block, 0, st>>>(static_cast<const TIN*>(x), n, c_in, c_pad, eps,          \
                                                          static_cast<TOUT*>(out), norm);                          \
        return cudaGetLastError();                                                                                  \
    }
    FACD_PREPARE(0, __half, 0, __half)
    FACD_PREPARE(1, __nv_bfloat16, 0, __half)
    FACD_PREPARE(2, float, 0, __half)
    FACD_PREPARE(0, __half, 1, __nv_bfloat16)
    FACD_PREPARE(1, __nv_bfloat16, 1, __nv_bfloat16)
    FACD_PREPARE(2, float, 1, __nv_bfloat16)
#undef FACD_PREPARE
    return kUnsupported;
}

// Normalisation backward: dtype (of s and ds, n x c) 0 = fp16, 1 = bf16, 2 = fp32; grad_q: n x c_pad floats;
// grad_out: one float on the device.
int facd_scale_backward(int dtype, int device, const void* s, const float* norm, const float* grad_q,
                        const float* grad_out, int n, int c, int c_pad, float eps, void* ds, void* stream) {
    if (n <= 0 || c <= 0 || c_pad < c) return kBadArgument;
    const cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
    const dim3 grid((n + kRowWarps - 1) / kRowWarps), block(kRowWarps * 32);
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
#define FACD_BACKWARD(CODE, T)                                                                                      \
    if (dtype == CODE) {                                                                                            \
        scale_backward_kernel<T><<<grid, block, 0, st>>>(static_cast<const T*>(s), norm, grad_q, grad_out, n, c,    \
                                                         c_pad, eps, static_cast<T*>(ds));                          \
        return cudaGetLastError();                                                                                  \
    }
    FACD_BACKWARD(0, __half)
    FACD_BACKWARD(1, __nv_bfloat16)
    FACD_BACKWARD(2, float)
#undef FACD_BACKWARD
    return kUnsupported;
}

const char* facd_error_string(int code) {
    if (code == kUnsupported) return "no tile configuration for this dtype / channel count";
    if (code == kBadArgument) return "inconsistent sizes or column-split layout";
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
