// AVX2 integer kernels for few input rows, for CPUs without AVX-512 VNNI: vnni.h's math, on the same
// panels (common.h), with vpmaddubsw + vpmaddwd for vpdpbusd. A 64-byte panel step is two 256-bit
// halves (rows 0-7, 8-15). vpmaddubsw adds pairs of u8 x s8 products in int16 with saturation, so:
//   int4: u = q in [0, 16) against xq in [-127, 127]: a pair is at most 2·15·127, the two nibble halves of
//         a step 7620, far from 2^15; then vpmaddwd by 1 widens to int32. Exact, as vpdpbusd.
//   int8: the stored u = w + 128 would overflow a pair (2·255·127); the kernel flips it back to w (int8)
//         and multiplies |w| by xq carrying w's sign (vpsignb, llama.cpp's trick): a pair is at most
//         2·128·127 < 2^15. It sums w·xq directly, so the zero term is 0 (vnni.h subtracts 128·Σxq).
// The int32 block sums are the VNNI kernel's exactly (the same quantized x, quantize_rows_avx2 rounding
// as quantize_rows), and so is the fp32 epilogue, op for op: the two ISAs give the same bits.
#pragma once
#include "common.h"

#define QK_AVX2 __attribute__((target("avx2,fma")))
#define QK_AVX2_F16C __attribute__((target("avx2,fma,f16c")))      // + the fp16 scales' widening

namespace qk {

QK_AVX2 inline __m256 bf16x8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

QK_AVX2 inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

QK_AVX2 inline int hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// quantize_rows (vnni.h), 8 lanes at a time; XB % 32 == 0.
QK_AVX2 void quantize_rows_avx2(const uint16_t* x, int M, int K, int XB, int8_t* xq, float* sx, float* sm) {
    const int nb = K / XB;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);   // undo the packs' 128-bit lanes
    for (int m = 0; m < M; ++m)
        for (int b = 0; b < nb; ++b) {
            const uint16_t* src = x + size_t(m) * K + size_t(b) * XB;
            __m256 amax = _mm256_setzero_ps();
            for (int k = 0; k < XB; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(bf16x8(src + k), magnitude));
            const float a = hmax8(amax);
            const __m256 inv = _mm256_set1_ps(a > 0.f ? 127.f / a : 0.f);
            __m256i sum = _mm256_setzero_si256();
            int8_t* dst = xq + size_t(m) * K + size_t(b) * XB;
            for (int k = 0; k < XB; k += 32) {
                __m256i q[4];
                for (int j = 0; j < 4; ++j) {
                    q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(bf16x8(src + k + 8 * j), inv));   // nearest even
                    sum = _mm256_add_epi32(sum, q[j]);
                }
                const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                _mm256_storeu_si256((__m256i*)(dst + k), _mm256_permutevar8x32_epi32(p, order));
            }
            sx[size_t(m) * nb + b] = a / 127.f;
            sm[size_t(m) * nb + b] = float(hsum8(sum));
        }
}

// One 64-byte panel step (rows 0-7, 8-15) of MT input rows: their int32 block sums into acc. x[b][0] is
// the broadcast x word of columns k..k+3, x[b][1] (int4 only) that of k+4..k+7.
template <int BITS, int MT>
QK_AVX2 inline void step_avx2(const uint8_t* wp, const __m256i (&x)[MT][2], __m256i (&acc)[MT][2]) {
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
    for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wp + 32 * h));
        if (BITS == 4) {
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            for (int b = 0; b < MT; ++b) {
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x[b][0]), _mm256_maddubs_epi16(hi, x[b][1]));
                acc[b][h] = _mm256_add_epi32(acc[b][h], _mm256_madd_epi16(p, ones));
            }
        } else {
            const __m256i ws = _mm256_xor_si256(v, flip), aw = _mm256_abs_epi8(ws);
            for (int b = 0; b < MT; ++b) {
                const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x[b][0], ws));
                acc[b][h] = _mm256_add_epi32(acc[b][h], _mm256_madd_epi16(p, ones));
            }
        }
    }
}

// The broadcast x words of one step from xk (one row's quantized x): int4 columns k..k+7, int8 k..k+3.
template <int BITS>
QK_AVX2 inline void xwords_avx2(const int8_t* xk, __m256i (&x)[2]) {
    int32_t v[2] = {0, 0};
    std::memcpy(v, xk, BITS == 4 ? 8 : 4);
    x[0] = _mm256_set1_epi32(v[0]);
    x[1] = _mm256_set1_epi32(v[1]);
}

// Block blk's int32 sums of one half panel (8 rows from gi) -> d = sum − z·Σxq, vnni.h's op.
QK_AVX2 inline __m256 block_d_avx2(__m256i acc, const uint8_t* z, float zc, size_t gi, float smi) {
    const __m256 zf = z ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(z + gi))))
                        : _mm256_set1_ps(zc);
    return _mm256_fnmadd_ps(zf, _mm256_set1_ps(smi), _mm256_cvtepi32_ps(acc));
}

// int_panels (vnni.h) on AVX2: NB panels x MT rows, each panel two halves of 8 rows, in tiles of 2 rows x
// 2 panels (their 8 accumulators and 4 broadcast x words fit the 16 ymm registers) and 1 row x 4 panels.
// On panels in order (il 1, what the packer picks for this kernel) each panel of a tile is a sequential
// stream. Zen 3, 1 thread, weights from DRAM, against one sequential stream read by a plain loop: four
// interleaved streams read 1.38-1.51x as fast, eight 1.08x, four in chunks of 2 KiB or more 1.0x, and a
// software prefetch ahead of one stream 0.84-0.96x, so the tiles leave prefetching to the hardware. The
// one-row tile on il 1 against a whole interleaved block (il 8, one stream, prefetched): 1.07-1.13x on
// 17920 x 1536 int4, 1.22-1.29x on 1536 x 8960, int8 1.28x; at 16 rows 1.05-1.21x.
template <int BITS, int NB, int MT>
QK_AVX2_F16C void int_panels_avx2(const int8_t* xq, const float* sx, const float* sm, const uint8_t* w, const uint16_t* s,
                             const uint8_t* z, float zc, Out y, int K, int group, int il, int XB, int p0, int m0) {
    constexpr int STEP = BITS == 4 ? 8 : 4;
    const int G = K / group, nb = K / XB;
    const Blocks blocks{y.N / 16, size_t(K / STEP), il};
    const size_t step = blocks.step_bytes(p0), pb = blocks.panel_bytes();
    alignas(32) float tot[NB][MT][16] = {};
    for (int blk = 0; blk < nb; ++blk) {
        __m256i acc[NB][MT][2];
        for (int a = 0; a < NB; ++a) for (int b = 0; b < MT; ++b) acc[a][b][0] = acc[a][b][1] = _mm256_setzero_si256();
        const int g = blk * XB / group;
        prefetch_group(s, z, p0, NB, g, y.N, G);
        const uint8_t* wk = w + blocks.at(p0, size_t(blk) * (XB / STEP));
        const int8_t* xk = xq + size_t(m0) * K + size_t(blk) * XB;
        for (int t = 0; t < XB / STEP; ++t, wk += step, xk += STEP) {
            __m256i xv[MT][2];
            for (int b = 0; b < MT; ++b) xwords_avx2<BITS>(xk + size_t(b) * K, xv[b]);
            for (int a = 0; a < NB; ++a) step_avx2<BITS, MT>(wk + a * pb, xv, acc[a]);
        }
        for (int a = 0; a < NB; ++a)
            for (int h = 0; h < 2; ++h) {
                const size_t gi = atg((p0 + a) * 16, g, y.N, G) + 8 * h;
                const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + gi)));
                for (int b = 0; b < MT; ++b) {
                    const size_t i = size_t(m0 + b) * nb + blk;
                    const __m256 d = block_d_avx2(acc[a][b][h], z, zc, gi, sm[i]);
                    _mm256_store_ps(tot[a][b] + 8 * h, _mm256_fmadd_ps(d, _mm256_mul_ps(sv, _mm256_set1_ps(sx[i])),
                                                                       _mm256_load_ps(tot[a][b] + 8 * h)));
                }
            }
    }
    for (int a = 0; a < NB; ++a)
        for (int b = 0; b < MT; ++b)
            for (int i = 0; i < 16; ++i) y.put(m0 + b, (p0 + a) * 16 + i, tot[a][b][i]);
}

}  // namespace qk
