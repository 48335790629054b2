// AVX-512 BF16 kernel for bf16 weights in 16-row panels (common.h): for each column pair the 16 rows'
// pairs lie side by side (64 bytes), so a panel is one sequential stream and one vdpbf16ps makes 16
// outputs x 2 columns from a broadcast pair of x: no horizontal sums, and each weight vector serves every
// input row of the tile. Products of bf16 values are exact in fp32 and summed in fp32.
#pragma once
#include "common.h"

#define QK_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace qk {

template <int NB, int MT>
QK_BF16 void bf16_panels(const uint16_t* x, const uint16_t* w, Out y, int K, int p0, int m0) {
    const size_t stride = size_t(K / 2) * 32;                       // elements per panel
    const uint16_t* wp = w + size_t(p0) * stride;
    __m512 acc[NB][MT];
    for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_setzero_ps();
    for (int kp = 0; kp < K / 2; ++kp) {
        __m512i xb[MT];
        for (int b = 0; b < MT; ++b) {
            int32_t pair;
            std::memcpy(&pair, x + size_t(m0 + b) * K + 2 * kp, 4);
            xb[b] = _mm512_set1_epi32(pair);
        }
        for (int a = 0; a < NB; ++a) {
            const __m512i wv = _mm512_loadu_si512(wp + a * stride + size_t(kp) * 32);
            for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], (__m512bh)wv, (__m512bh)xb[b]);
        }
    }
    for (int a = 0; a < NB; ++a)
        for (int b = 0; b < MT; ++b) {
            alignas(64) float out[16];
            _mm512_store_ps(out, acc[a][b]);
            for (int i = 0; i < 16; ++i) y.put(m0 + b, (p0 + a) * 16 + i, out[i]);
        }
}

template <int NB, int MT>
QK_BF16 void bf16_rows(const uint16_t* x, const uint16_t* w, Out y, int M, int K, int p0, int p1, int& m) {
    for (; m + MT <= M; m += MT) {
        int p = p0;
        for (; p + NB <= p1; p += NB) bf16_panels<NB, MT>(x, w, y, K, p, m);
        for (; p < p1; ++p) bf16_panels<1, MT>(x, w, y, K, p, m);
    }
}

// Panels [p0, p1) in groups of 4 (~200 KB of weight for the 2B head, kept in L2 while every row passes).
QK_BF16 void bf16_mm(const uint16_t* x, const uint16_t* w, Out y, int M, int K, int p0, int p1) {
    for (int pb = p0; pb < p1; pb += 4) {
        const int pe = pb + 4 < p1 ? pb + 4 : p1;
        int m = 0;
        bf16_rows<2, 8>(x, w, y, M, K, pb, pe, m);
        bf16_rows<4, 4>(x, w, y, M, K, pb, pe, m);
        bf16_rows<4, 2>(x, w, y, M, K, pb, pe, m);
        bf16_rows<4, 1>(x, w, y, M, K, pb, pe, m);
    }
}

}  // namespace qk

// The same panels on AVX2 + FMA (no bf16 dot products): a panel step's two 32-byte halves (rows 0-7,
// 8-15) hold per row the pair (w[k], w[k+1]) as one dword; `<< 16` makes w[k] an fp32 and masking the low
// half makes w[k+1] one (bf16 is the top half of an fp32), so two FMAs against x[k], x[k+1] (fp32, converted
// once per call) do a step per half: products exact, summed in fp32, like vdpbf16ps. Tiles: 4 panels x 1
// row (8 accumulators; each panel its own sequential stream, software-prefetched) and 1 panel x 4 rows.
#define QK_BF16_AVX2 __attribute__((target("avx2,fma")))

namespace qk {

template <int NB, int MT>
QK_BF16_AVX2 void bf16_panels_avx2(const float* xf, const uint16_t* w, Out y, int K, int p0, int m0) {
    const size_t stride = size_t(K / 2) * 32;                       // elements per panel
    const uint16_t* wp = w + size_t(p0) * stride;
    const __m256i hi = _mm256_set1_epi32(int(0xFFFF0000u));
    __m256 acc[NB][MT][2];
    for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) acc[a][b][0] = acc[a][b][1] = _mm256_setzero_ps();
    for (int kp = 0; kp < K / 2; ++kp) {
        for (int a = 0; a < NB; ++a) _mm_prefetch((const char*)(wp + a * stride + size_t(kp + 16) * 32), _MM_HINT_T0);
        for (int a = 0; a < NB; ++a)
            for (int h = 0; h < 2; ++h) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(wp + a * stride + size_t(kp) * 32 + 16 * h));
                const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
                for (int b = 0; b < MT; ++b) {
                    const float* xk = xf + size_t(m0 + b) * K + 2 * kp;
                    acc[a][b][h] = _mm256_fmadd_ps(odd, _mm256_broadcast_ss(xk + 1),
                                                   _mm256_fmadd_ps(even, _mm256_broadcast_ss(xk), acc[a][b][h]));
                }
            }
    }
    for (int a = 0; a < NB; ++a)
        for (int b = 0; b < MT; ++b) {
            alignas(32) float out[16];
            _mm256_store_ps(out, acc[a][b][0]);
            _mm256_store_ps(out + 8, acc[a][b][1]);
            for (int i = 0; i < 16; ++i) y.put(m0 + b, (p0 + a) * 16 + i, out[i]);
        }
}

// Panels [p0, p1) in groups of 4; xf (M, K) fp32.
QK_BF16_AVX2 void bf16_mm_avx2(const float* xf, const uint16_t* w, Out y, int M, int K, int p0, int p1) {
    for (int pb = p0; pb < p1; pb += 4) {
        const int pe = pb + 4 < p1 ? pb + 4 : p1;
        int m = 0;
        for (; m + 4 <= M; m += 4)
            for (int p = pb; p < pe; ++p) bf16_panels_avx2<1, 4>(xf, w, y, K, p, m);
        for (; m < M; ++m) {
            int p = pb;
            if (p + 4 <= pe) { bf16_panels_avx2<4, 1>(xf, w, y, K, p, m); p += 4; }
            for (; p < pe; ++p) bf16_panels_avx2<1, 1>(xf, w, y, K, p, m);
        }
    }
}

}  // namespace qk
