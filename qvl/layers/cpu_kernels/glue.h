// The small ops between a decoder layer's linears, for CPU bf16 activations on AVX2 + FMA (qvl.layers.cpu_ops).
// At batch 1 each torch op there costs a dispatch and the cache misses of its own code after a linear has
// streamed megabytes of weight through the caches; one call here replaces 4 to 14 of them. Every function
// takes and returns bf16 and computes in fp32, rounding where the torch expression it replaces rounds:
//   rms_norm   y = bf16(w · bf16(x · rsqrt(mean(x²) + eps)))         (the mean's sum order is not torch's)
//   rotary     y = bf16(bf16(x · cos) + bf16(swap_halves(x) · sin))  (the same bits as torch's three ops)
//   silu_mul   y = bf16(bf16(silu(g)) · u)                           (exp: a polynomial, ~1 ulp of fp32)
//   attention  one query per sequence over its keys: fp32 scores, softmax, fp32 weighted sum of values
// Only called after qk_glue_ok() (AVX2 + FMA present).
#pragma once
#include <cmath>
#include <vector>
#include "avx2.h"                    // bf16x8, QK_AVX2

namespace qk {

QK_AVX2 inline __m256 round_bf16x8(__m256 v) {              // to the nearest bf16, kept as fp32 (no NaNs here)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(int(0xFFFF0000u))));
}

QK_AVX2 inline void store_bf16x8(uint16_t* p, __m256 v) {   // v already a bf16 value (round_bf16x8)
    const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

QK_AVX2 inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// e^x: 2^n · e^r with n = round(x · log2 e), r = x − n · ln 2 (ln 2 in two parts), e^r by the degree-6
// polynomial of Cephes' expf; x clamped to [-87.3, 88.4] (e^x of a smaller x is 2^-126, not 0).
QK_AVX2 inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// rows of H: x row r at x + r * sx, y row r at y + r * sy; w (H,). H % 8 == 0.
QK_AVX2 void rms_norm(const uint16_t* x, long sx, const uint16_t* w, uint16_t* y, long sy, int rows, int H, float eps) {
    for (int r = 0; r < rows; ++r) {
        const uint16_t* xr = x + r * sx;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int k = 0;
        for (; k + 16 <= H; k += 16) {
            const __m256 u = bf16x8(xr + k), v = bf16x8(xr + k + 8);
            a0 = _mm256_fmadd_ps(u, u, a0);
            a1 = _mm256_fmadd_ps(v, v, a1);
        }
        for (; k < H; k += 8) { const __m256 u = bf16x8(xr + k); a0 = _mm256_fmadd_ps(u, u, a0); }
        const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(hsum_ps(_mm256_add_ps(a0, a1)) / float(H) + eps));
        for (k = 0; k < H; k += 8) {
            const __m256 n = round_bf16x8(_mm256_mul_ps(bf16x8(xr + k), inv));
            store_bf16x8(y + r * sy + k, round_bf16x8(_mm256_mul_ps(bf16x8(w + k), n)));
        }
    }
}

// x (N, heads, D): token n's heads at x + n * sx (heads · D contiguous); cos, sin (N, D) contiguous; y the
// same shape at y + n * sy. D % 16 == 0.
QK_AVX2 void rotary(const uint16_t* x, long sx, const uint16_t* cs, const uint16_t* sn, uint16_t* y, long sy,
                    int N, int heads, int D) {
    const int half = D / 2;
    for (int n = 0; n < N; ++n)
        for (int h = 0; h < heads; ++h) {
            const uint16_t* xh = x + n * sx + h * D;
            uint16_t* yh = y + n * sy + h * D;
            for (int d = 0; d < D; d += 8) {
                const int o = d < half ? d + half : d - half;
                const __m256 a = round_bf16x8(_mm256_mul_ps(bf16x8(xh + d), bf16x8(cs + size_t(n) * D + d)));
                const __m256 b = round_bf16x8(_mm256_mul_ps(bf16x8(xh + o), bf16x8(sn + size_t(n) * D + d)));
                store_bf16x8(yh + d, round_bf16x8(_mm256_add_ps(a, b)));
            }
        }
}

// g, u rows of I at g + r * sg, u + r * su; y row r at y + r * sy (may be g). I % 8 == 0.
QK_AVX2 void silu_mul(const uint16_t* g, long sg, const uint16_t* u, long su, uint16_t* y, long sy, int rows, int I) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (int r = 0; r < rows; ++r)
        for (int k = 0; k < I; k += 8) {
            const __m256 x = bf16x8(g + r * sg + k);
            const __m256 s = round_bf16x8(_mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x)))));
            store_bf16x8(y + r * sy + k, round_bf16x8(_mm256_mul_ps(s, bf16x8(u + r * su + k))));
        }
}

// One query row qh (D) over L keys: key l's head at k + ko(l), its value at v + vo(l) (element offsets);
// skip(l) true = not attended. fp32 scores, softmax, fp32 weighted sum of values, rounded once into out
// (D). No key attended gives 0. The order of every sum depends only on L and the attended keys' values,
// so any layout of the same keys (a gathered, padded copy or the paged cache) gives the same bits.
template <typename KO, typename VO, typename Skip>
QK_AVX2 void attend_row(const uint16_t* qh, const uint16_t* k, const uint16_t* v, KO ko, VO vo, Skip skip, int L,
                        int D, float scale, uint16_t* out) {
    std::vector<float> qf(D), p((L + 7) / 8 * 8, -INFINITY), acc(D, 0.f);
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(&qf[d], bf16x8(qh + d));
    float mx = -INFINITY;
    for (int l = 0; l < L; ++l) {
        if (skip(l)) continue;                                             // p[l] stays -inf
        const uint16_t* kl = k + ko(l);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[d]), bf16x8(kl + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[d + 8]), bf16x8(kl + d + 8), a1);
        }
        p[l] = hsum_ps(_mm256_add_ps(a0, a1)) * scale;
        mx = p[l] > mx ? p[l] : mx;
    }
    float sum = 0.f;
    if (mx != -INFINITY) {
        const __m256 m8 = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
        for (int l = 0; l < L; l += 8) {                                   // p is padded with -inf to 8
            const __m256 s = _mm256_loadu_ps(&p[l]);
            const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(s, m8)), _mm256_cmp_ps(s, ninf, _CMP_NEQ_OQ));
            _mm256_storeu_ps(&p[l], e);                                     // masked (-inf) -> 0
            sum += hsum_ps(e);
        }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int l = 0; l < L; ++l) {
        if (!(p[l] > 0.f)) continue;                                       // masked, underflowed, or no key
        const __m256 w = _mm256_set1_ps(p[l] * inv);
        const uint16_t* vl = v + vo(l);
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(&acc[d], _mm256_fmadd_ps(w, bf16x8(vl + d), _mm256_loadu_ps(&acc[d])));
    }
    for (int d = 0; d < D; d += 8) store_bf16x8(out + d, round_bf16x8(_mm256_loadu_ps(&acc[d])));
}

// q (B, nH, D) at q + b * sq (nH · D contiguous); k, v (B, L, nKV, D): sequence b's key l at
// k + b * skb + l * skl (nKV · D contiguous), the same for v; mask (B, L) bytes (1 = attend) or null; out
// (B, nH, D) contiguous. Query head i reads kv head i / (nH / nKV). A row with no key attended gives 0.
QK_AVX2 void decode_attention(const uint16_t* q, long sq, const uint16_t* k, long skb, long skl, const uint16_t* v,
                              long svb, long svl, const uint8_t* mask, uint16_t* out, int B, int L, int nH, int nKV,
                              int D, float scale, int nthreads) {
    const int g = nH / nKV;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && B * nH > 1)
    for (int bh = 0; bh < B * nH; ++bh) {
        const int b = bh / nH, h = bh % nH, j = h / g;
        attend_row(q + b * sq + h * D, k + b * skb + j * D, v + b * svb + j * D, [&](int l) { return l * skl; },
                   [&](int l) { return l * svl; }, [&](int l) { return mask && !mask[size_t(b) * L + l]; }, L, D,
                   scale, out + size_t(bh) * D);
    }
}

}  // namespace qk
