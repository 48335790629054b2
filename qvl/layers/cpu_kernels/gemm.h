// Many-row bf16 linears on AVX2 + FMA (CPUs without bf16 dot products): y (M, N) bf16 = x (M, K) bf16 ·
// Wᵀ + bias, with W (N, K) bf16 in its plain row-major layout (no copy kept), computed in fp32. BLIS's
// blocking, per thread over its own 16-row panels of W:
//   for each block of MC rows of x, each chunk of NCP panels, each KC columns of the input dim:
//     x's block [MC x KC] is packed into fp32 micro-panels of 6 rows ([k][8]: lanes 6, 7 and rows past M
//     zero; in L2), each panel's [16 x KC] of W is converted into an fp32 micro-panel [k][16] (in L1;
//     both packs widen and transpose 8 x 8 blocks in registers: 1.00-1.04x a scalar x pack), and every
//     6-row micro-panel of the block multiplies it: a 6 x 16 tile, 12 ymm accumulators, per k 2 loads,
//     6 broadcasts and 12 FMAs. The tile adds into the chunk's fp32 sums [MC x 16·NCP], which are rounded
//     to bf16 (+ bias, in fp32) once at the end.
// Scratch per thread (kept for the next call): x's block 256 KiB, the W block 16 KiB, the sums 576 KiB.
// Products of bf16 values are exact in fp32; each output sums its k in one fixed order (KC chunks in
// turn, k in turn within them), so its bits depend on neither the thread count nor the other rows.
#pragma once
#include <vector>
#include "avx2.h"                    // bf16x8

#define QK_GEMM __attribute__((target("avx2,fma")))

namespace qk {

constexpr int GEMM_MR = 6, GEMM_KC = 256, GEMM_MC = 192, GEMM_NCP = 48;

// c[6][16] (row stride ldc) += a [k][8] (lanes 0-5) · b [k][16] over kc steps; first: c = the product
// instead. The 12 accumulators are named variables: as an array, g++ 12 kept them on the stack (a store
// per FMA); `unroll 4` took the tile from 68-70 to 75-88 GFLOP/s with both operands in cache (Zen 3).
QK_GEMM inline void gemm_tile(int kc, const float* a, const float* b, float* c, int ldc, bool first) {
#define QK_ACC(r) __m256 c##r##0 = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc), \
                         c##r##1 = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8);
    QK_ACC(0) QK_ACC(1) QK_ACC(2) QK_ACC(3) QK_ACC(4) QK_ACC(5)
#undef QK_ACC
#pragma GCC unroll 4
    for (int k = 0; k < kc; ++k, a += 8, b += 16) {
        const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#define QK_FMA(r) { const __m256 av = _mm256_broadcast_ss(a + r); \
                    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0); c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1); }
        QK_FMA(0) QK_FMA(1) QK_FMA(2) QK_FMA(3) QK_FMA(4) QK_FMA(5)
#undef QK_FMA
    }
#define QK_STORE(r) _mm256_storeu_ps(c + r * ldc, c##r##0); _mm256_storeu_ps(c + r * ldc + 8, c##r##1);
    QK_STORE(0) QK_STORE(1) QK_STORE(2) QK_STORE(3) QK_STORE(4) QK_STORE(5)
#undef QK_STORE
}

// 8 x 8 widened and transposed in registers: dst[c * ld + i] = rows[i][c] (c, i < 8), dst 32-byte aligned.
QK_GEMM inline void gemm_transpose8(const uint16_t* const* rows, float* dst, int ld) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = bf16x8(rows[i]);
    for (int i = 0; i < 8; i += 2) {                  // t[i]: rows i, i+1 at cols 0,1 | 4,5; t[i+1]: 2,3 | 6,7
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 8; g += 4)                    // u[g + c]: rows g..g+3 at col c | c + 4
        for (int j = 0; j < 2; ++j) {
            u[g + 2 * j] = _mm256_shuffle_ps(t[g + j], t[g + j + 2], 0x44);
            u[g + 2 * j + 1] = _mm256_shuffle_ps(t[g + j], t[g + j + 2], 0xEE);
        }
    for (int c = 0; c < 4; ++c) {                     // col c: rows 0-3 and 4-7; col c + 4 likewise
        _mm256_store_ps(dst + c * ld, _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
        _mm256_store_ps(dst + (c + 4) * ld, _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
    }
}

// dst [kc][ld] fp32 (ld 8 or 16, the first `n` values of each k) = the n rows `rows[i]` (each kc bf16;
// zeros where null), rows past n zero-filled up to ld.
QK_GEMM inline void gemm_pack(const uint16_t* const* rows, int n, int kc, float* dst, int ld) {
    alignas(32) static const uint16_t zeros[GEMM_KC] = {};
    for (int h = 0; h < ld; h += 8) {
        const uint16_t* r[8];
        for (int i = 0; i < 8; ++i) r[i] = h + i < n && rows[h + i] ? rows[h + i] : zeros;
        int k = 0;
        for (; k + 8 <= kc; k += 8) {
            const uint16_t* rk[8];
            for (int i = 0; i < 8; ++i) rk[i] = r[i] == zeros ? zeros : r[i] + k;
            gemm_transpose8(rk, dst + size_t(k) * ld + h, ld);
        }
        for (; k < kc; ++k)
            for (int i = 0; i < 8; ++i) dst[size_t(k) * ld + h + i] = r[i] == zeros ? 0.f : bf16_to_f32(r[i][k]);
    }
}

// b [kc][16] = W rows [n0, n0 + 16) (zeros past N), columns [k0, k0 + kc).
QK_GEMM inline void gemm_pack_b(const uint16_t* w, int N, int K, int n0, int k0, int kc, float* b) {
    const uint16_t* rows[16];
    for (int j = 0; j < 16; ++j) rows[j] = n0 + j < N ? w + size_t(n0 + j) * K + k0 : nullptr;
    gemm_pack(rows, 16, kc, b, 16);
}

// a [tiles][kc][8] fp32 = x rows [m0, m0 + 6·tiles) (zeros past M and in lanes 6, 7), columns [k0, k0 + kc).
QK_GEMM inline void gemm_pack_a(const uint16_t* x, int M, int K, int m0, int tiles, int k0, int kc, float* a) {
    for (int t = 0; t < tiles; ++t) {
        const uint16_t* rows[GEMM_MR];
        for (int r = 0; r < GEMM_MR; ++r) {
            const int m = m0 + GEMM_MR * t + r;
            rows[r] = m < M ? x + size_t(m) * K + k0 : nullptr;
        }
        gemm_pack(rows, GEMM_MR, kc, a + size_t(t) * kc * 8, 8);
    }
}

// Panels [p0, p1) of W (16 rows each, the last may be partial), every row of x.
QK_GEMM inline void gemm_bf16(const uint16_t* x, const uint16_t* w, Out y, int M, int N, int K, int p0, int p1) {
    thread_local std::vector<float> abuf, bbuf, cbuf;
    abuf.resize(size_t(GEMM_MC) / GEMM_MR * 8 * GEMM_KC + 8);
    bbuf.resize(size_t(16) * GEMM_KC + 8);
    cbuf.resize(size_t(GEMM_MC) * 16 * GEMM_NCP);
    float* b = bbuf.data() + (8 - (uintptr_t(bbuf.data()) / 4) % 8) % 8;       // 32-byte aligned
    float* a = abuf.data() + (8 - (uintptr_t(abuf.data()) / 4) % 8) % 8;
    // Blocks of equal size (whole tiles, at most GEMM_MC rows): every block's tiles share W's conversion.
    const int nblk = (M + GEMM_MC - 1) / GEMM_MC, per = ((M + nblk - 1) / nblk + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
    for (int m0 = 0; m0 < M; m0 += per) {
        const int mc = M - m0 < per ? M - m0 : per, tiles = (mc + GEMM_MR - 1) / GEMM_MR;
        for (int q0 = p0; q0 < p1; q0 += GEMM_NCP) {
            const int q1 = q0 + GEMM_NCP < p1 ? q0 + GEMM_NCP : p1, ldc = 16 * (q1 - q0);
            for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
                const int kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
                gemm_pack_a(x, M, K, m0, tiles, k0, kc, a);
                for (int p = q0; p < q1; ++p) {
                    gemm_pack_b(w, N, K, 16 * p, k0, kc, b);
                    for (int t = 0; t < tiles; ++t)
                        gemm_tile(kc, a + size_t(t) * kc * 8, b,
                                  cbuf.data() + size_t(t) * GEMM_MR * ldc + 16 * (p - q0), ldc, k0 == 0);
                }
            }
            for (int r = 0; r < mc; ++r)
                for (int n = 16 * q0; n < 16 * q1 && n < N; ++n) y.put(m0 + r, n, cbuf[size_t(r) * ldc + n - 16 * q0]);
        }
    }
}

}  // namespace qk
