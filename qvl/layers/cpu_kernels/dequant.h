// AVX-512 dequantizers of the many-row path: whole panels of W = (q − z)·s written *transposed*, Wᵀ (K, ld)
// bf16, for torch.mm(x, Wᵀ). One panel step's 16 rows are then 16 contiguous outputs of one column, so a
// step of 64 bytes becomes 8 (int4) or 4 (int8) full-vector stores, and every lane of a vector is one row:
// the scales and zeros (a panel's 16 rows side by side per group, common.h) are the vectors as loaded.
//   column j of a step: dword lane r = bytes 4r .. 4r + 3, so `>> 8j` and a mask give lane r's byte 4r + j
//   (int4: low nibble, or `>> 8j + 4` the high one), OR'd into 2^23 (0x4B000000): the float 2^23 + u,
//   exactly; − (2^23 + z) is then exactly u − z, times s rounds once in fp32 (as formats.dequantize), and
//   vcvtneps2bf16 rounds that to bf16, nearest even (as torch). Bit for bit the scalar dequantizers'
//   output (vcvtneps2bf16 flushes |W| < 2^-126 to zero, which no fp16 scale, >= 2^-24, makes).
#pragma once
#include "common.h"

#define QK_DQ __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace qk {

// One column: 16 rows' u (the masked byte or nibble) -> bf16 (u − z)·s, stored at o (32 bytes).
QK_DQ inline void dq_col(__m512i v, int shift, __m512i mask, __m512 zm, __m512 sc, uint16_t* o) {
    const __m512i magic = _mm512_set1_epi32(0x4B000000);
    const __m512i u = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, shift), mask, magic, 0xEA);   // (a & b) | c
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(_mm512_castsi512_ps(u), zm), sc);
    _mm256_storeu_si256((__m256i*)o, (__m256i)_mm512_cvtneps_pbh(f));
}

// NP panels side by side from panel p, all in one block of 8 (p % NP == 0): per step their NP·64 bytes
// are contiguous on il 8 (common.h's Blocks; on il 1 each panel is a stream of its own) and their outputs
// of one column NP·32 contiguous bytes, whole cache lines for even NP (one panel writes each line in two
// halves, a K-long pass apart: two fetches of it).
template <int NP>
QK_DQ inline void dq4_panels(const uint8_t* w, const uint16_t* s, const uint8_t* z, int zc, uint16_t* out,
                             Blocks B, int K, int group, int n0, int ld, int p) {
    const int G = K / group;
    const size_t step = B.step_bytes(p);
    const __m512i m4 = _mm512_set1_epi32(15), magic = _mm512_set1_epi32(0x4B000000);
    uint16_t* col = out + (p * 16 - n0);
    for (int g = 0; g < G; ++g) {
        __m512 sc[NP], zm[NP];
        for (int i = 0; i < NP; ++i) {
            sc[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + atg((p + i) * 16, g, B.P * 16, G))));
            const __m512i zi = z ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(z + atg((p + i) * 16, g, B.P * 16, G))))
                                 : _mm512_set1_epi32(zc);
            zm[i] = _mm512_castsi512_ps(_mm512_or_si512(zi, magic));                            // 2^23 + z
        }
        const uint8_t* src = w + B.at(p, size_t(g) * group / 8);
        for (int k = g * group; k < (g + 1) * group; k += 8, src += step) {
            uint16_t* o = col + size_t(k) * ld;
            for (int i = 0; i < NP; ++i) {
                const __m512i v = _mm512_loadu_si512(src + B.panel_bytes() * i);
                for (int j = 0; j < 4; ++j) {                     // unrolled: the shifts are immediates
                    dq_col(v, 8 * j, m4, zm[i], sc[i], o + size_t(j) * ld + 16 * i);
                    dq_col(v, 8 * j + 4, m4, zm[i], sc[i], o + size_t(j + 4) * ld + 16 * i);
                }
            }
        }
    }
}

template <int NP>
QK_DQ inline void dq8_panels(const uint8_t* w, const uint16_t* s, uint16_t* out, Blocks B, int K, int group, int n0,
                             int ld, int p) {
    const int G = K / group;
    const size_t step = B.step_bytes(p);
    const __m512i m8 = _mm512_set1_epi32(255);
    const __m512 zm = _mm512_set1_ps(8388608.f + 128.f);                                      // 2^23 + 128
    uint16_t* col = out + (p * 16 - n0);
    for (int g = 0; g < G; ++g) {
        __m512 sc[NP];
        for (int i = 0; i < NP; ++i) sc[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + atg((p + i) * 16, g, B.P * 16, G))));
        const uint8_t* src = w + B.at(p, size_t(g) * group / 4);
        for (int k = g * group; k < (g + 1) * group; k += 4, src += step) {
            uint16_t* o = col + size_t(k) * ld;
            for (int i = 0; i < NP; ++i) {
                const __m512i v = _mm512_loadu_si512(src + B.panel_bytes() * i);
                for (int j = 0; j < 4; ++j) dq_col(v, 8 * j, m8, zm, sc[i], o + size_t(j) * ld + 16 * i);
            }
        }
    }
}

// Panels [p0, p1) through `run<NP>(p)`: whole blocks of 8 where they lie in the range (one sequential read
// of the block), pairs up to and after them, single panels to reach an even one and at the end.
template <typename Run>
inline void dq_walk(int p0, int p1, Run run) {
    for (int p = p0; p < p1;) {
        if (p % 8 == 0 && p + 8 <= p1) { run(std::integral_constant<int, 8>{}, p); p += 8; }
        else if (p % 2 == 0 && p + 2 <= p1) { run(std::integral_constant<int, 2>{}, p); p += 2; }
        else { run(std::integral_constant<int, 1>{}, p); p += 1; }
    }
}

// Panels [p0, p1) of the int4 weight (N rows in all) into out (K, ld): out[k, n − n0] = W[n, k].
QK_DQ void dequant4_t(const uint8_t* w, const uint16_t* s, const uint8_t* z, int zc, uint16_t* out, int N, int K,
                      int group, int il, int n0, int ld, int p0, int p1) {
    const Blocks B{N / 16, size_t(K / 8), il};
    dq_walk(p0, p1, [&](auto np, int p) { dq4_panels<decltype(np)::value>(w, s, z, zc, out, B, K, group, n0, ld, p); });
}

// Panels [p0, p1) of the int8 weight (stored w + 128) into out (K, ld).
QK_DQ void dequant8_t(const uint8_t* w, const uint16_t* s, uint16_t* out, int N, int K, int group, int il, int n0,
                      int ld, int p0, int p1) {
    const Blocks B{N / 16, size_t(K / 4), il};
    dq_walk(p0, p1, [&](auto np, int p) { dq8_panels<decltype(np)::value>(w, s, out, B, K, group, n0, ld, p); });
}

}  // namespace qk
