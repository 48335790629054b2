// AVX-512 VNNI integer kernels for few input rows (decode): x is quantized to int8 per block of the input
// dim (absmax / 127, one fp32 scale a block, as llama.cpp's Q8 activations), each block's dot products
// with the unsigned weight bytes are summed exactly in int32 by vpdpbusd (64 multiply-adds an
// instruction, twice vdpbf16ps's), then scaled in fp32 (s: fp16, common.h):
//   y[m, n] = sum_b  s[g(b), n] * sx[m, b] * (sum_{k in b} xq[m, k] * u[n, k]  −  zu[g(b), n] * sum_{k in b} xq[m, k])
// with u the stored byte and zu what it is offset by (int4: u = q, zu = z; int8: u = w + 128, zu = 128).
// A block lies in one weight group (XB = 128 when the group is a multiple of 128, else the group).
// Held to the bf16 criterion (the activation rounding is the approximation), not to F.linear's bits.
#pragma once
#include "common.h"

#define QK_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

namespace qk {

// xq (M, K) int8, sx / sm (M, K / XB): each block's scale and the sum of its integers.
QK_VNNI void quantize_rows(const uint16_t* x, int M, int K, int XB, int8_t* xq, float* sx, float* sm) {
    const int nb = K / XB;
    for (int m = 0; m < M; ++m)
        for (int b = 0; b < nb; ++b) {
            const uint16_t* src = x + size_t(m) * K + size_t(b) * XB;
            __m512 amax = _mm512_setzero_ps();
            for (int k = 0; k < XB; k += 16) {
                const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + k))), 16));
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
            }
            const float a = _mm512_reduce_max_ps(amax);
            const __m512 inv = _mm512_set1_ps(a > 0.f ? 127.f / a : 0.f);
            __m512i sum = _mm512_setzero_si512();
            int8_t* dst = xq + size_t(m) * K + size_t(b) * XB;
            for (int k = 0; k < XB; k += 16) {
                const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + k))), 16));
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));     // nearest even, |q| <= 127
                sum = _mm512_add_epi32(sum, q);
                _mm_storeu_si128((__m128i*)(dst + k), _mm512_cvtsepi32_epi8(q));
            }
            sx[size_t(m) * nb + b] = a / 127.f;
            sm[size_t(m) * nb + b] = float(_mm512_reduce_add_epi32(sum));
        }
}

QK_VNNI inline __m512i bcast4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

// NB panels [p0, p0 + NB) x MT rows [m0, m0 + MT); BITS 4 (step 8 columns) or 8 (step 4); z null: zc everywhere.
// The running fp32 sums live in memory (touched once a block), so the registers hold the NB x MT int32
// accumulators and the step's MT broadcast x words, shared by all NB panels.
template <int BITS, int NB, int MT>
QK_VNNI void int_panels(const int8_t* xq, const float* sx, const float* sm, const uint8_t* w, const uint16_t* s,
                        const uint8_t* z, float zc, Out y, int K, int group, int il, int XB, int p0, int m0) {
    constexpr int STEP = BITS == 4 ? 8 : 4, NX = BITS == 4 ? 2 : 1;
    const int G = K / group, nb = K / XB;
    const Blocks blocks{y.N / 16, size_t(K / STEP), il};
    const size_t step = blocks.step_bytes(p0), pb = blocks.panel_bytes();   // the tile's panels share a block
    const __m512i m4 = _mm512_set1_epi8(15);
    alignas(64) float tot[NB][MT][16] = {};
    for (int blk = 0; blk < nb; ++blk) {
        __m512i acc[NB][MT];
        for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_setzero_si512();
        const int g = blk * XB / group;
        prefetch_group(s, z, p0, NB, g, y.N, G);
        const uint8_t* wk = w + blocks.at(p0, size_t(blk) * (XB / STEP));
        const int8_t* xk = xq + size_t(m0) * K + size_t(blk) * XB;
        for (int t = 0; t < XB / STEP; ++t, wk += step, xk += STEP) {
            __m512i xv[MT][NX];
            for (int b = 0; b < MT; ++b)
                for (int j = 0; j < NX; ++j) xv[b][j] = bcast4(xk + size_t(b) * K + 4 * j);
            for (int a = 0; a < NB; ++a) {
                const __m512i v = _mm512_loadu_si512(wk + a * pb);
                if (BITS == 4) {
                    const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                    for (int b = 0; b < MT; ++b)
                        acc[a][b] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[a][b], lo, xv[b][0]), hi, xv[b][NX - 1]);
                } else {
                    for (int b = 0; b < MT; ++b) acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], v, xv[b][0]);
                }
            }
        }
        for (int a = 0; a < NB; ++a) {
            const size_t gi = atg((p0 + a) * 16, g, y.N, G);
            const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + gi)));
            const __m512 zf = z ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(z + gi))))
                                : _mm512_set1_ps(zc);
            for (int b = 0; b < MT; ++b) {
                const size_t i = size_t(m0 + b) * nb + blk;
                const __m512 d = _mm512_fnmadd_ps(zf, _mm512_set1_ps(sm[i]), _mm512_cvtepi32_ps(acc[a][b]));
                _mm512_store_ps(tot[a][b], _mm512_fmadd_ps(d, _mm512_mul_ps(sv, _mm512_set1_ps(sx[i])),
                                                           _mm512_load_ps(tot[a][b])));
            }
        }
    }
    for (int a = 0; a < NB; ++a)
        for (int b = 0; b < MT; ++b)
            for (int i = 0; i < 16; ++i) y.put(m0 + b, (p0 + a) * 16 + i, tot[a][b][i]);
}

}  // namespace qk
