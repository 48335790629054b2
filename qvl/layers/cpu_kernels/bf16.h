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
